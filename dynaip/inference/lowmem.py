"""Low-memory inference: a weight-quantized frozen FLUX transformer (optimum-quanto).

CPU offload needs nothing here: ``DynaIPFluxPipeline.enable_model_cpu_offload()`` /
``enable_sequential_cpu_offload()`` (diffusers' own, through accelerate) keep the adapter on the
CPU, and each block's reference K/V are computed on the device its queries are on (see
``ReferenceKV.forward``). Expected peak GPU memory per mode: docs/low_memory.md.
"""

from __future__ import annotations

QUANTIZATIONS = ("int8", "fp8")


def quantize_transformer(flux, weights: str = "int8") -> None:
    """Weight-only quantization of ``flux.transformer`` in place (optimum-quanto ``qint8`` / ``qfloat8``;
    activations stay in the pipeline's dtype). The adapter is not quantized; attach it before or after."""
    if weights not in QUANTIZATIONS:
        raise ValueError(f"quantization {weights!r}: choose one of {QUANTIZATIONS}")
    try:
        from optimum.quanto import freeze, qfloat8, qint8, quantize
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ValueError(f"quantizing the transformer needs optimum-quanto (pip install optimum-quanto): {e}") from None
    quantize(flux.transformer, weights={"int8": qint8, "fp8": qfloat8}[weights])
    freeze(flux.transformer)
