"""Model loading: every model from a local path in its public release format."""

from .config import AestheticPaths, ClipVisionPaths, GroundingDinoPaths, ModelsConfig, SamPaths
from .errors import CheckpointError

__all__ = ["ModelsConfig", "AestheticPaths", "ClipVisionPaths", "GroundingDinoPaths", "SamPaths", "CheckpointError"]
