"""Model loading: every model from a local path in its public release format."""

from .config import ClipVisionPaths, GroundingDinoPaths, ModelsConfig, SamPaths
from .errors import CheckpointError

__all__ = ["ModelsConfig", "ClipVisionPaths", "GroundingDinoPaths", "SamPaths", "CheckpointError"]
