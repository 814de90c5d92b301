"""FLUX.1-dev's sampling defaults, defined once for every command that generates: ``dynaip generate``,
``DynaIPFluxPipeline.__call__``, ``dynaip eval generate``, the browser app and the training run's
sample images (docs/ARCHITECTURE.md, "Configuration").

They are diffusers' ``FluxPipeline`` defaults for FLUX.1-dev (28 Euler steps, distilled guidance 3.5)
at the model's native 1024 × 1024.
"""

STEPS = 28
"""Denoising steps."""
GUIDANCE = 3.5
"""FLUX.1-dev's distilled text guidance (fed to its guidance embedding)."""
SIZE = 1024
"""Image height and width in pixels."""
