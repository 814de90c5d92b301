"""The DynaIP adapter: HMoE-FFM, reference projection, image cross-attention in every FLUX block."""

from .adapter import DynaIPAdapter
from .config import DynaIPConfig

__all__ = ["DynaIPAdapter", "DynaIPConfig"]
