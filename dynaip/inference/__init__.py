"""Inference: `DynaIPFluxPipeline` (single subject, multi-subject with given or automatic masks)."""

from .pipeline import DynaIPFluxPipeline, DynaIPOutput, adapter_config_for

__all__ = ["DynaIPFluxPipeline", "DynaIPOutput", "adapter_config_for"]
