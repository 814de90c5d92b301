"""Inference: `DynaIPFluxPipeline` (single subject, multi-subject with given or automatic masks)."""

from .loading import load_dynaip, unload_dynaip
from .pipeline import DynaIPFluxPipeline, DynaIPOutput, adapter_config_for

__all__ = ["DynaIPFluxPipeline", "DynaIPOutput", "adapter_config_for", "load_dynaip", "unload_dynaip"]
