"""DynaIP: zero-shot personalized text-to-image adapter for FLUX.1-dev."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import DynaIPAdapter, DynaIPConfig
    from .inference import DynaIPFluxPipeline, load_dynaip, unload_dynaip

# Lazy exports keep `import dynaip` light (no torch/diffusers import until an export is used).
_LAZY = {
    "DynaIPConfig": "dynaip.adapter",
    "DynaIPAdapter": "dynaip.adapter",
    "DynaIPFluxPipeline": "dynaip.inference",
    "load_dynaip": "dynaip.inference",
    "unload_dynaip": "dynaip.inference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynaip' has no attribute {name!r}")


__all__ = ["DynaIPAdapter", "DynaIPConfig", "DynaIPFluxPipeline", "load_dynaip", "unload_dynaip"]
