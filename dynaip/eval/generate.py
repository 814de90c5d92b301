"""Generating every case of a benchmark: resumable, sequential in-process or spread over Ray GPU workers.

Output directory::

    OUT/run.json                 # the settings of this run (a rerun with other settings is refused)
    OUT/images/<case_id>.png     # the generated image (RGB), written atomically
    OUT/images/<case_id>.json    # sidecar = done marker, written atomically *after* the PNG:
                                 # {"case_id", "prompt", "seed", "seconds", "settings"}

A case is finished when both files exist; a rerun skips finished cases, so an interrupted run
(crash, preemption, Ctrl-C) continues where it stopped. The only model call is ``generate_case``;
the runner takes any ``generate_fn(pipe, case, settings) -> PIL.Image`` so tests use a cheap fake.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from dynaip.models import sampling
from dynaip.progress import Progress

from .cases import Case, atomic_write_bytes, image_path, preset_masks  # noqa: F401  (both re-exported)

log = logging.getLogger(__name__)

GenerateFn = Callable[[Any, Case, "GenerateSettings"], Image.Image]
PipeFactory = Callable[[], Any]


@dataclass(kw_only=True)
class GenerateSettings:
    """Sampling settings shared by every case of a run (the seed comes from each case)."""

    steps: int = sampling.STEPS
    """Denoising steps (FLUX.1-dev default 28)."""
    height: int = sampling.SIZE
    """Output height in pixels (multiple of 16)."""
    width: int = sampling.SIZE
    """Output width in pixels (multiple of 16)."""
    guidance: float = sampling.GUIDANCE
    """FLUX distilled guidance scale."""
    scale: float = 1.0
    """Image cross-attention weight λ (the same for every subject)."""
    granularity: tuple[float, float, float] | None = None
    """Override of the HMoE-FFM weights (low, mid, high); None = the router decides."""
    auto_mask: bool = False
    """Multi-subject: masks from Grounding DINO + SAM on the subject names instead of the preset bands."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be ≥ 1")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(
                    f"{name}={v} must be a positive multiple of 16 (FLUX packs 2×2 latent patches of 8 px)"
                )
        if self.granularity is not None:
            self.granularity = tuple(float(g) for g in self.granularity)
            if len(self.granularity) != 3:
                raise ValueError(f"granularity {self.granularity} needs three weights (low, mid, high)")


def load_pipeline(models_yaml: str, adapter_dir: str, device: str | None = None, auto_mask: bool = False) -> Any:
    """``DynaIPFluxPipeline.from_local`` on ``device`` (default: cuda when available; bfloat16 there, float32 on CPU),
    with Grounding DINO + SAM loaded when ``auto_mask``."""
    import torch

    try:
        from dynaip.inference import DynaIPFluxPipeline
    except ImportError as e:
        raise RuntimeError(
            "dynaip.inference.DynaIPFluxPipeline cannot be imported; `eval generate` needs the "
            f"inference pipeline ({type(e).__name__}: {e}); reinstall the package"
        ) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DynaIPFluxPipeline.from_local(models_yaml, adapter_dir, dtype=dtype, device=device, with_auto_mask=auto_mask)


def generate_case(pipe: Any, case: Case, settings: GenerateSettings) -> Image.Image:
    """Generates one case with the DynaIP pipeline: the only place the eval harness calls the model.

    References are loaded as RGB; single-subject cases pass no masks; multi-subject cases pass the
    preset bands of ``case.layout`` or, with ``settings.auto_mask``, no masks and the subject names as
    detection phrases (``auto_mask=[...]``). Returns the first image of the pipeline's output.
    """
    refs = [Image.open(s.path).convert("RGB") for s in case.subjects]
    kwargs: dict[str, Any] = dict(
        prompt=case.prompt,
        references=refs,
        scale=settings.scale,
        granularity=list(settings.granularity) if settings.granularity else None,
        seed=case.seed,
        num_inference_steps=settings.steps,
        height=settings.height,
        width=settings.width,
        guidance_scale=settings.guidance,
    )
    if not case.is_multi:
        kwargs["masks"] = None
    elif settings.auto_mask:
        params = inspect.signature(pipe).parameters
        if "auto_mask" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(
                "--auto-mask: this DynaIPFluxPipeline takes no auto_mask argument; use the preset masks "
                "(drop --auto-mask) or update the pipeline"
            )
        kwargs["masks"] = None
        kwargs["auto_mask"] = [s.name for s in case.subjects]
    else:
        if case.layout is None:
            raise ValueError(
                f"case {case.id!r} has {len(refs)} subjects but no layout; rebuild it with bench-multi "
                "or pass --auto-mask"
            )
        kwargs["masks"] = preset_masks(case.layout, settings.width, settings.height)
    image = pipe(**kwargs)
    if not isinstance(image, Image.Image):  # DynaIPOutput / diffusers output: .images is a list of PIL images
        image = image.images[0]
    return image


@dataclass(kw_only=True)
class GenerationSummary:
    total: int
    """Cases in the cases file (after --limit)."""
    skipped: int
    """Already finished before this run."""
    generated: int
    """Finished by this run."""


def is_done(out_dir: str | Path, case_id: str) -> bool:
    """A case is finished when its PNG and its sidecar both exist (the sidecar is written last)."""
    png = image_path(out_dir, case_id)
    return png.is_file() and png.with_suffix(".json").is_file()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def save_result(out_dir: str | Path, case: Case, png: bytes, settings: GenerateSettings, seconds: float) -> None:
    """PNG first, then the sidecar (the done marker), each atomically."""
    png_path = image_path(out_dir, case.id)
    atomic_write_bytes(png_path, png)
    meta = {
        "case_id": case.id,
        "prompt": case.prompt,
        "seed": case.seed,
        "seconds": round(seconds, 3),
        "settings": asdict(settings),
    }
    atomic_write_bytes(png_path.with_suffix(".json"), json.dumps(meta, sort_keys=True).encode())


def _check_run_settings(out_dir: Path, settings: GenerateSettings, adapter: str | None) -> None:
    run_file = out_dir / "run.json"
    current = json.loads(json.dumps({"settings": asdict(settings), "adapter": adapter}))
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != current:
            diff = {
                k: (previous.get("settings", {}).get(k), v)
                for k, v in current["settings"].items()
                if previous.get("settings", {}).get(k) != v
            }
            if previous.get("adapter") != adapter:
                diff["adapter"] = (previous.get("adapter"), adapter)
            raise ValueError(
                f"'{out_dir}' holds a run with other settings (old, new): {diff}; resume with the same "
                "settings or write to a new --out"
            )
    else:
        atomic_write_bytes(run_file, json.dumps(current, indent=2, sort_keys=True).encode())


class _GenWorker:
    """A Ray actor: loads the pipeline once, returns PNG bytes per case (the driver writes the files)."""

    def __init__(self, pipe_factory: PipeFactory, generate_fn: GenerateFn, settings: GenerateSettings):
        self.pipe_factory, self.generate_fn, self.settings = pipe_factory, generate_fn, settings
        self.pipe = None

    def run(self, case_json: dict) -> tuple[str, bytes, float]:
        if self.pipe is None:
            self.pipe = self.pipe_factory()
        case = Case.from_json(case_json)
        t0 = time.perf_counter()
        image = self.generate_fn(self.pipe, case, self.settings)
        return case.id, _png_bytes(image), time.perf_counter() - t0


def run_generation(
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    settings: GenerateSettings,
    pipe_factory: PipeFactory,
    generate_fn: GenerateFn = generate_case,
    ray_address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 1.0,
    adapter: str | None = None,
) -> GenerationSummary:
    """Generates every unfinished case into ``out_dir`` (layout in the module docstring).

    Without ``ray_address`` cases run one after another in this process (the pipeline is built only
    if something is left to do). With it (``auto``, ``ray://host:10001``, or ``local`` to start one),
    ``num_workers`` actors (default: one per cluster GPU) each hold a pipeline and results stream back
    to this process, which writes them — so the output directory needs no shared file system.
    """
    from dynaip.dataset.store import Store
    from dynaip.run_lock import RunLock

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(Store(str(out_dir)), what="eval generation"):  # two generations into one --out would race
        return _run_generation(
            cases,
            out_dir,
            settings=settings,
            pipe_factory=pipe_factory,
            generate_fn=generate_fn,
            ray_address=ray_address,
            num_workers=num_workers,
            gpus_per_worker=gpus_per_worker,
            adapter=adapter,
        )


def _run_generation(
    cases: Sequence[Case],
    out_dir: Path,
    *,
    settings: GenerateSettings,
    pipe_factory: PipeFactory,
    generate_fn: GenerateFn,
    ray_address: str | None,
    num_workers: int | None,
    gpus_per_worker: float,
    adapter: str | None,
) -> GenerationSummary:
    _check_run_settings(out_dir, settings, adapter)
    pending = [c for c in cases if not is_done(out_dir, c.id)]
    summary = GenerationSummary(total=len(cases), skipped=len(cases) - len(pending), generated=0)
    log.info("generate: %d cases, %d already finished, %d to do", summary.total, summary.skipped, len(pending))
    if not pending:
        return summary
    by_id = {c.id: c for c in pending}
    # a bar on a terminal, else a line every 5 s: cases done / to do, cases/s, ETA (hours on a benchmark)
    bar = Progress("generate", len(pending), "case")

    def done(case_id: str, png: bytes, seconds: float) -> None:
        save_result(out_dir, by_id[case_id], png, settings, seconds)
        summary.generated += 1
        bar.update(summary.generated)

    try:
        _generate_all(
            pending,
            done,
            settings=settings,
            pipe_factory=pipe_factory,
            generate_fn=generate_fn,
            ray_address=ray_address,
            num_workers=num_workers,
            gpus_per_worker=gpus_per_worker,
        )
    finally:
        bar.close()
    return summary


def _generate_all(
    pending: list[Case],
    done: Callable[[str, bytes, float], None],
    *,
    settings: GenerateSettings,
    pipe_factory: PipeFactory,
    generate_fn: GenerateFn,
    ray_address: str | None,
    num_workers: int | None,
    gpus_per_worker: float,
) -> None:
    if ray_address is None:
        worker = _GenWorker(pipe_factory, generate_fn, settings)
        for case in pending:
            done(*worker.run(case.to_json()))
        return

    import ray
    from ray.util import ActorPool

    from dynaip.cluster import connect

    connect(None if ray_address == "local" else ray_address)
    if num_workers is None:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        num_workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else 1
        if num_workers < 1:
            raise ValueError(
                f"the Ray cluster at {ray_address!r} has {gpus:g} GPUs, fewer than --gpus-per-worker "
                f"{gpus_per_worker:g}; add GPU nodes, or pass --workers N --gpus-per-worker 0 for CPU"
            )
    num_workers = min(num_workers, len(pending))
    actor_cls = ray.remote(num_gpus=gpus_per_worker)(_GenWorker)
    actors = [actor_cls.remote(pipe_factory, generate_fn, settings) for _ in range(num_workers)]
    log.info("generate: %d Ray workers (%g GPU each)", num_workers, gpus_per_worker)
    pool = ActorPool(actors)
    for result in pool.map_unordered(lambda a, c: a.run.remote(c.to_json()), pending):
        done(*result)


def real_pipe_factory(
    models_yaml: str, adapter_dir: str, device: str | None = None, auto_mask: bool = False
) -> PipeFactory:
    """A picklable factory for ``load_pipeline`` (sent to Ray workers, where device None picks their GPU)."""
    return functools.partial(load_pipeline, models_yaml, adapter_dir, device, auto_mask)
