"""Issue #28's parts of ``benchmarks/gpu_suite.py``: compiled blocks, fused AdamW, SDPA backends.

``gpu_suite.py --parts attention,train,generate --compile`` runs, instead of the eager-only train and
generate parts:

(a) **train** — the trainer's step as ``paper.yaml`` configures it (``flow_matching_loss`` on precomputed
    features, fused AdamW from ``dynaip.train.optim``, the SDPA backend of ``parallel.attention: auto``)
    with ``parallel.compile`` off and on, at per-rank batch 1 with nothing recomputed and batch 2 with
    every block recomputed (what fits one 80 GB card at world size 1; docs/memory.md). Seconds/step
    (median), MFU and HFU with gpu_suite's FLOP accounting (``train_flops``, unchanged, so the figures
    compare with earlier runs), peak memory, the first step's seconds (for compiled rows: mostly
    compilation; ``compile_overhead_s`` = first step − median step, a difference of two measurements),
    and the host synchronisations one step makes (``torch.cuda.set_sync_debug_mode``).
(b) **generate** — seconds per denoising step bare and with 1/2/3 subjects (as gpu_suite's generate),
    eager and compiled; the ratios to bare are within a mode (compiled DynaIP / compiled bare). The
    adapter stays attached; "bare" is the call without a conditioning (FLUX's own processor path), so
    both modes time the same compiled graphs they would generate with. Graphs compiled while timing
    are counted (0 = the timed loop never recompiled).
(c) **attention** — each SDPA backend checked against the math backend at FLUX.1-dev's attention shape
    (24 heads × 128, 4608 tokens, bf16) and timed forward + backward, each in a process of its own (a
    failing cuDNN kernel can poison its process's CUDA context).

``--smoke`` runs all of it on the tiny sizes on any device (the CPU compiles with ``aot_eager``); its
figures are not measurements.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTENTION_SHAPE = {"batch": 1, "heads": 24, "head_dim": 128, "tokens": 4096 + 512}
"""FLUX.1-dev's joint attention at 1024² with 512 T5 tokens."""


def _compile(transformer, device, on: bool) -> None:
    from dynaip.models.compiled import COMPILED_ATTR, compile_blocks, flux_blocks

    if on:
        compile_blocks(transformer, device)
        return
    for block in flux_blocks(transformer):  # back to eager
        if getattr(block, COMPILED_ATTR, None) is not None:
            block.__dict__.pop("forward", None)
            setattr(block, COMPILED_ATTR, None)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def host_syncs(fn, device: torch.device) -> int | None:
    """Synchronising CUDA calls ``fn`` makes (PyTorch's sync debug mode warns once per call)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ----------------------------------------------------------------------------- (a) training
def bench_train_compile(sizes, device: torch.device, repeats: int) -> list[dict]:
    from gpu_suite import (
        build_adapter,
        build_clip_vision,
        build_transformer,
        reset_peak,
        step_figures,
        timed,
        train_flops,
        train_step,
    )

    from dynaip.train.config import OptimConfig
    from dynaip.train.optim import make_optimizer
    from dynaip.train.step import (
        configure_attention_backends,
        disable_checkpointing,
        enable_checkpointing,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.bfloat16 if device.type == "cuda" else None
    transformer = build_transformer(sizes, device, dtype)
    attention = configure_attention_backends(device, "auto", dtype, transformer)  # as the trainer does
    adapter = build_adapter(sizes, device, torch.float32).train()
    adapter.attach(transformer)
    clip = build_clip_vision(sizes, device, dtype, adapter.config.clip_layers)
    clip_params = sum(p.numel() for p in clip.parameters())
    optimizer = make_optimizer(adapter.parameters(), OptimConfig(lr=2e-5, weight_decay=1e-4))
    n_blocks = adapter.config.num_blocks
    rows = []
    for compiled in (False, True):
        disable_checkpointing(transformer)
        _compile(transformer, device, compiled)
        for batch, keep in ((1, n_blocks), (2, 0)):
            disable_checkpointing(transformer)
            recomputed = enable_checkpointing(transformer, keep)
            step = train_step(transformer, adapter, clip, optimizer, sizes, batch, device, dtype, autocast)

            row = {
                "compile": compiled,
                "batch_per_rank": batch,
                "blocks_recomputed": recomputed,
                "attention": attention,
                "fused_adamw": bool(optimizer.defaults.get("fused")),
            }
            try:
                reset_peak(device)
                first = timed(step, device)  # compiled: traces and compiles the block classes
                timed(step, device)  # warm-up (the AdamW state exists from the first)
                graphs = _graphs()
                times = [timed(step, device) for _ in range(repeats)]
                row["graphs_compiled_while_timing"] = _graphs() - graphs
                row["host_syncs_per_step"] = host_syncs(step, device)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                row["error"] = "out of memory"
                rows.append(row)
                print(f"train compile={compiled} batch {batch}: out of memory", flush=True)
                continue
            row.update(
                step_figures(
                    times, train_flops(sizes, batch, adapter.config, clip_params, recomputed / n_blocks), device
                )
            )
            sec = row["seconds_per_step"]
            row["compile_overhead_s"] = first - sec
            row["first_step_s"] = first
            rows.append(row)
            print(
                f"train compile={compiled} batch {batch}, {recomputed} recomputed: {sec:.3f} s/step, first "
                f"{first:.1f} s, peak {row['peak_memory_gib']} GiB, MFU {row['mfu']}",
                flush=True,
            )
    disable_checkpointing(transformer)
    _compile(transformer, device, False)
    adapter.detach(transformer)
    return rows


# ----------------------------------------------------------------------------- (b) generation
@torch.no_grad()
def bench_generate_compile(sizes, device: torch.device, repeats: int) -> dict:
    import random

    from gpu_suite import generate_setup, timed

    transformer, adapter, _, call, conds = generate_setup(sizes, device)
    adapter.attach(transformer)

    def run(name: str) -> float:
        adapter.set_conditioning(conds[name])
        try:
            return timed(lambda: transformer(**call), device)
        finally:
            adapter.set_conditioning(None)

    result: dict = {}
    for compiled in (False, True):
        _compile(transformer, device, compiled)
        first = {name: run(name) for name in conds}  # warm-up: compiles each variant, caches the reference K/V
        run("bare")
        graphs = _graphs()
        samples: dict[str, list[float]] = {name: [] for name in conds}
        order = list(conds)
        rnd = random.Random(0)
        for _ in range(repeats):
            rnd.shuffle(order)
            for name in order:
                samples[name].append(run(name))
        med = {name: statistics.median(v) for name, v in samples.items()}
        mode = "compiled" if compiled else "eager"
        result[mode] = {
            "seconds_per_step": med,
            "seconds_all": samples,
            "first_call_s": first,
            "ratio_to_bare": {name: med[name] / med["bare"] for name in med},
            "graphs_compiled_while_timing": _graphs() - graphs,
        }
        print(f"generate {mode}:", {k: round(v, 4) for k, v in med.items()}, flush=True)
    result["compiled_over_eager"] = {
        name: result["compiled"]["seconds_per_step"][name] / result["eager"]["seconds_per_step"][name] for name in conds
    }
    _compile(transformer, device, False)
    adapter.detach(transformer)
    return result


# ----------------------------------------------------------------------------- (c) attention backends
def probe_attention(name: str, smoke: bool, repeats: int) -> dict:
    """One backend at FLUX's attention shape (smoke: a small one): the check against math, then
    forward + backward timed (median of ``repeats``)."""
    from gpu_suite import timed

    from dynaip.models.attention_backend import SDP, check_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = {"batch": 1, "heads": 2, "head_dim": 16, "tokens": 64} if smoke else ATTENTION_SHAPE
    row: dict = {"backend": name, **shape}
    why = check_backend(
        name, device, dtype, shape["heads"], shape["head_dim"], tokens=shape["tokens"], batch=shape["batch"]
    )
    row["check"] = "passed" if why is None else why
    if why is not None:
        return row
    from torch.nn.attention import sdpa_kernel

    q, k, v = (
        torch.randn(
            shape["batch"],
            shape["heads"],
            shape["tokens"],
            shape["head_dim"],
            device=device,
            dtype=dtype,
            requires_grad=True,
        )
        for _ in range(3)
    )

    def fwd_bwd():
        with sdpa_kernel([SDP[name]]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    fwd_bwd()
    sec = statistics.median(timed(fwd_bwd, device) for _ in range(repeats))
    b, h, n, d = shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"]
    flops = 4 * b * h * n * n * d * 3.5  # forward 2 matmuls (4·n²·d); backward 2.5× forward
    row.update({"seconds_fwd_bwd": sec, "tflops": flops / sec / 1e12})
    return row


def bench_attention(sizes, device: torch.device, repeats: int) -> list[dict]:
    from dynaip.models.attention_backend import SDP

    rows = []
    for name in SDP:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--attention-probe", name, "--repeats", str(repeats)]
        if sizes.smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        root = str(Path(__file__).resolve().parent.parent)  # the probe imports dynaip as this process does
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row = {"backend": name, "check": f"process failed (status {proc.returncode}): {tail[:300]}"}
        row["process_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"attention {name}: {row.get('check')} {row.get('seconds_fwd_bwd', '')}", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> list[str]:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    lines: list[str] = []
    if "attention" in report:
        lines += [
            "## SDPA backends (FLUX attention shape, forward + backward, checked against math)",
            "",
            "| backend | check | s fwd+bwd | TFLOP/s |",
            "|---|---|---|---|",
        ]
        for r in report["attention"]:
            lines.append(
                f"| {r['backend']} | {r['check']} | {f(r.get('seconds_fwd_bwd'), '{:.4f}')} | "
                f"{f(r.get('tflops'), '{:.0f}')} |"
            )
        lines.append("")
    if isinstance(report.get("train"), list) and report["train"] and "compile" in report["train"][0]:
        lines += [
            f"## Training step, compile off/on ({report['resolution']}², world size 1, fused AdamW)",
            "",
            "| compile | batch/rank | blocks recomputed | s/step | first step s | peak GiB | MFU | HFU | "
            "host syncs/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["train"]:
            if "error" in r:
                lines.append(
                    f"| {r['compile']} | {r['batch_per_rank']} | {r['blocks_recomputed']} | {r['error']} | | | | | |"
                )
                continue
            lines.append(
                f"| {r['compile']} | {r['batch_per_rank']} | {r['blocks_recomputed']} | "
                f"{f(r['seconds_per_step'])} | {f(r['first_step_s'], '{:.1f}')} | "
                f"{f(r['peak_memory_gib'], '{:.1f}')} | {f(r['mfu'], '{:.1%}')} | {f(r['hfu'], '{:.1%}')} | "
                f"{r['host_syncs_per_step'] if r['host_syncs_per_step'] is not None else 'n/a'} |"
            )
        lines.append("")
    gen = report.get("generate")
    if isinstance(gen, dict) and "compiled" in gen:
        lines += [
            f"## Generation, eager and compiled ({report['resolution']}², per denoising step, batch 1)",
            "",
            "| conditioning | eager s/step | × bare | compiled s/step | × bare (compiled) | compiled/eager |",
            "|---|---|---|---|---|---|",
        ]
        for name in gen["eager"]["seconds_per_step"]:
            e, c = gen["eager"], gen["compiled"]
            lines.append(
                f"| {name} | {f(e['seconds_per_step'][name], '{:.4f}')} | {f(e['ratio_to_bare'][name])} | "
                f"{f(c['seconds_per_step'][name], '{:.4f}')} | {f(c['ratio_to_bare'][name])} | "
                f"{f(gen['compiled_over_eager'][name])} |"
            )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="one SDPA backend probe (run by gpu_suite.py --parts attention)")
    ap.add_argument("--attention-probe", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(probe_attention(args.attention_probe, args.smoke, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
