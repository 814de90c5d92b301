"""``parallel.attention``: SDPA backends checked against the math backend, chosen process-wide.

On the CPU PyTorch has the flash and math kernels; the efficient and cuDNN kernels are CUDA-only, so
here they must be refused with the reason (benchmarks/gpu_suite.py --parts attention checks them on a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynaip.models.attention_backend import (
    AttentionBackendError,
    apply_backend,
    check_backend,
    restore_flags,
    select_backend,
)

CPU = torch.device("cpu")


def _kernels() -> set[str]:
    """The aten attention kernels one SDPA call runs."""
    q = torch.randn(1, 2, 32, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, q, q)
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_math_and_auto_picks_flash(dtype):
    assert check_backend("flash", CPU, dtype, heads=2, head_dim=16) is None
    assert check_backend("math", CPU, dtype, heads=2, head_dim=16) is None
    assert select_backend("auto", CPU, dtype, heads=2, head_dim=16) == "flash"


@pytest.mark.parametrize("name", ["efficient", "cudnn"])
def test_a_backend_the_device_lacks_is_refused_with_the_reason(name):
    with pytest.raises(AttentionBackendError, match=rf"parallel.attention='{name}' on cpu .*{name}: RuntimeError"):
        select_backend(name, CPU, torch.float32, heads=2, head_dim=16)


def test_the_chosen_backend_is_the_kernel_sdpa_runs_and_flags_restore():
    before = apply_backend("math")
    try:
        assert _kernels() == {"aten::_scaled_dot_product_attention_math"}
        apply_backend("flash")
        assert _kernels() == {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    finally:
        restore_flags(before)
    assert torch.backends.cuda.math_sdp_enabled() == before["math"]
    assert torch.backends.cuda.mem_efficient_sdp_enabled() == before["efficient"]


def test_config_refuses_an_unknown_backend():
    from dynaip.configs import ConfigError
    from dynaip.train.config import TrainConfig

    with pytest.raises((ConfigError, ValueError), match="parallel.attention='fast'"):
        TrainConfig.from_dict({"stages": [{"name": "a", "steps": 1}], "parallel": {"attention": "fast"}})
