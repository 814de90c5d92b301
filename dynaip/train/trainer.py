"""The streaming distributed trainer: Ray Train ``TorchTrainer`` around ``train_worker``.

``run_training`` starts (or joins) Ray and runs ``train_worker`` on ``workers`` processes with
torch.distributed underneath (gloo on the CPU, nccl on GPUs). Each worker loads the frozen
FLUX + CLIP from local paths, builds the adapter, streams its share of the shards, and runs
``step.training_loss``. Rank 0 writes everything under RUN::

    RUN/metrics.jsonl                         one JSON object per log line / eval / stage switch
    RUN/checkpoints/step-NNNNNN/              adapter.safetensors + config.json (DynaIPAdapter.from_pretrained)
        resume/state.json                     step, stage, config, every rank's data position
        resume/optimizer.pt                   AdamW state (tensors and numbers; loads with weights_only=True)
        resume/rng.pt                         every rank's RNG states (uint8 tensors)
    RUN/samples/step-NNNNNN/NN.png            sample images with the fixed validation prompts/references
    RUN/tb/                                   TensorBoard events: the metrics.jsonl scalars, grad norm,
                                              per-stage progress, the sample grids (tensorboard --logdir RUN/tb)

Under Ray Train every worker also reports the logged metrics with ``ray.train.report``; Ray Train's
controller receives them and a controller callback appends rank 0's to RUN/ray/reported.jsonl
(``run_training`` returns the last ones).

RUN must be visible to every worker (local disk for one machine, a shared filesystem for a
cluster): rank 0 writes checkpoints, every rank reads them on ``--resume``.

Exactness: the adapter is initialised from ``seed`` on every rank (DDP also broadcasts rank
0's), every random draw of a step goes through per-rank generators or the global RNG whose
states are checkpointed, the data position is saved per rank and loader worker, and nothing
between steps (checkpoints, eval, samples) touches those RNGs. So a run stopped with
``--max-steps k`` and resumed reaches step n with bit-identical weights on the same hardware.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoints import SHARDED_ADAPTER, latest_checkpoint
from .config import QUALITY_FILTERS, TrainConfig, saved_strategy

log = logging.getLogger(__name__)

RESUME_FORMAT = "dynaip-train-state/1"
DROP_REASONS = ("pair", *QUALITY_FILTERS)
"""Keys of the ``filtered_by`` metric (``dynaip.train.data.rejected_by``)."""


@dataclass(kw_only=True)
class RunSpec:
    """Everything a worker needs, JSON-serialisable (it crosses process boundaries)."""

    config: dict[str, Any]
    """``TrainConfig.to_dict()``."""
    data: list[str]
    """Dataset directories from ``--data`` (stages with their own ``data`` ignore it)."""
    out: str
    """RUN directory (absolute)."""
    models: str
    """``models.yaml`` with the local checkpoint paths."""
    resume: bool = False
    """Continue from the newest checkpoint in RUN/checkpoints."""
    max_steps: int | None = None
    """Stop after this step (overrides the config's)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form switches for benchmarks (e.g. ``{"no_save": true}``)."""
    allow_data_change: bool = False
    """``--allow-data-change``: resume even though the checkpoint was trained on other datasets."""
    run_id: str = ""
    """Id of this invocation, stored in its checkpoints: when Ray restarts a failed worker group,
    the workers find checkpoints with their own run_id and resume from them instead of step 0."""


# ----------------------------------------------------------------------------- small helpers

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.parallel.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but this worker sees no CUDA device; drop --use-gpu or run on GPU nodes")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        try:
            import ray.train

            local = ray.train.get_context().get_local_rank()
        except Exception:  # not inside a Ray Train session
            pass
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def lr_lambda(cfg: TrainConfig):
    """Multiplier of ``lr`` after ``step`` optimizer steps: linear warmup, then cosine or constant."""
    total = max(1, cfg.total_steps)

    def f(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.optim.warmup_steps) / max(1, total - cfg.optim.warmup_steps))
        return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (pickled only in transit, never on disk)."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rng_state(gen: torch.Generator, cpu_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state(), "cpu_generator": cpu_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], gen: torch.Generator, cpu_gen: torch.Generator,
                   device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    cpu_gen.set_state(state["cpu_generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class MetricsWriter:
    """Appends JSON lines to RUN/metrics.jsonl and the same numbers to TensorBoard under ``tb_dir``
    (rank 0 only; other ranks hold a no-op)."""

    TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "samples_per_s": "train/samples_per_s",
               "data_wait": "train/data_wait_fraction", "grad_norm": "train/grad_norm", "skipped": "data/skipped",
               "corrupt_shards": "data/corrupt_shards",
               "filtered": "data/filtered", "val_loss": "val/loss", "stage_progress": "progress/stage",
               "progress": "progress/total", "stage_index": "progress/stage_index"}

    def __init__(self, path: Path | None, tb_dir: Path | None = None):
        self.f = open(path, "a", buffering=1) if path is not None else None
        self.tb = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tb_dir))

    def write(self, **row: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        if self.tb is not None and "step" in row:
            for key, tag in self.TB_TAGS.items():
                if isinstance(row.get(key), (int, float)):
                    self.tb.add_scalar(tag, row[key], row["step"])
            for i, (name, n) in enumerate((row.get("samples_per_dataset") or {}).items()):
                self.tb.add_scalar(f"data/samples_per_dataset/{i}_{name.rstrip('/').rsplit('/', 1)[-1]}", n, row["step"])
            for reason, n in (row.get("filtered_by") or {}).items():
                self.tb.add_scalar(f"data/filtered_by/{reason}", n, row["step"])
            if row.get("event") == "stage":
                self.tb.add_text("stage", f"stage '{row['stage']}' starts", row["step"])

    def image(self, tag: str, image, step: int) -> None:
        """``image``: an (H, W, 3) uint8 array."""
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- the worker

class _Worker:
    """State of one training process; ``run`` is the loop."""

    def __init__(self, spec: RunSpec):
        from dynaip import DynaIPAdapter, DynaIPConfig
        from dynaip.models import ModelsConfig

        from .parallel import apply_strategy
        from .step import configure_attention_backends, load_frozen

        self.spec = spec
        self.cfg = cfg = TrainConfig.from_dict(spec.config)
        self.out = Path(spec.out)
        self.rank, self.world = _rank_world()
        if self.world != cfg.parallel.workers and dist.is_initialized():
            log.warning("config says workers=%d, running with world_size=%d", cfg.parallel.workers, self.world)
        self.device = _device(cfg)
        configure_attention_backends(self.device)
        self.dtype = _dtype(cfg, self.device)
        self.autocast = torch.bfloat16 if self.dtype == torch.bfloat16 else None
        self.max_steps = spec.max_steps or cfg.max_steps or cfg.total_steps
        self.settings = cfg.loss

        models = ModelsConfig.from_yaml(spec.models)
        self.clip_vision = asdict(models.clip_vision)  # named in every checkpoint's config.json (load_dynaip)
        preset = DynaIPConfig.full if cfg.model.adapter_preset == "full" else DynaIPConfig.tiny
        # The adapter's config is the one source of truth for its CLIP layers; models.yaml only
        # seeds a fresh adapter that does not name them.
        adapter_config = preset(**{"clip_layers": models.clip_vision.layers, **cfg.model.adapter})
        self.features = self._resolve_features(models.flux)
        self.frozen = load_frozen(models, self.device, self.dtype, cfg.parallel.gradient_checkpointing,
                                  encoders=self.features.encoders, vae_decoder=cfg.logging.sample_every > 0,
                                  clip_layers=adapter_config.clip_layers,
                                  checkpoint_keep_blocks=cfg.parallel.checkpoint_keep_blocks)
        torch.manual_seed(cfg.seed)  # same initial adapter on every rank
        self.adapter = DynaIPAdapter(adapter_config).to(self.device)
        self.adapter.attach(self.frozen.transformer)
        self.adapter.train()
        if self.rank == 0:  # a Ray restart after a crash mid-save does not pass through run_training
            from .checkpoint_files import recover

            recover(self.out / "checkpoints")
        if self.world > 1:
            dist.barrier()
        ckpt = latest_checkpoint(self.out)
        own = ckpt is not None and spec.run_id and json.loads(
            (ckpt / "resume" / "state.json").read_text()).get("run_id") == spec.run_id
        resume_from = ckpt if (spec.resume or own) else None  # own: Ray restarted this run's workers
        if spec.resume and ckpt is None:
            log.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", self.out)
        if resume_from is not None:  # whole weights first: sharding then splits them like a fresh adapter
            self.adapter.load_weights(resume_from)
        self.encode = apply_strategy(cfg.parallel.strategy, self.frozen.transformer, self.adapter, self.device,
                                     cfg.parallel.find_unused_parameters)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # per-rank streams of randomness: noise/t/VAE posterior on the device, CFG dropout on the CPU
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 100_003 + self.rank + 1)
        self.cpu_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 50_000 + self.rank)
        torch.manual_seed(cfg.seed * 100_003 + 90_000 + self.rank)  # expert dropout differs per rank

        from .dataset_identity import run_datasets

        self.datasets = run_datasets(cfg, spec.data)  # every checkpoint names the data it was trained on
        self.step = 0
        self.data_state: dict[str, Any] | None = None
        if resume_from is not None:
            self._load_resume_state(resume_from)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl" if self.rank == 0 else None,
                                     self.out / "tb" if self.rank == 0 else None)
        self._eval_batch: dict[str, Any] | None = None

    # ------------------------------------------------------------------ data
    def _resolve_features(self, flux_dir: str):
        """Which stages read precomputed features (``TrainConfig.data.features``); decides what load_frozen loads."""
        from .features import resolve_run

        found = resolve_run(self.cfg, self.spec.data, flux_dir)
        if self.rank == 0:
            for line in found.notes:
                log.info("%s", line)
        return found

    def _stage_dirs(self, stage_index: int) -> list[str]:
        stage = self.cfg.stages[stage_index]
        dirs = stage.paths or self.spec.data
        if not dirs:
            raise ValueError(f"stage '{stage.name}' has no data: pass --data DIR[,DIR] or set the stage's 'data'")
        return dirs

    def _stream_spec(self, stage_index: int, batch_size: int):
        from .data import StreamSpec, read_manifests

        shards = self.features.attach(stage_index, read_manifests(self._stage_dirs(stage_index)))
        return StreamSpec(shards=shards, batch_size=batch_size,
                          seed=self.cfg.seed + 7919 * stage_index, shuffle_block=self.cfg.data.shuffle_block,
                          pair=self.cfg.stages[stage_index].pair, ref_size=self.frozen.clip.image_size,
                          buckets=[tuple(b) for b in self.cfg.data.buckets],
                          weights=self.cfg.stages[stage_index].weights,
                          filters=self.cfg.stages[stage_index].filters.active(),
                          on_corrupt_shard=self.cfg.data.on_corrupt_shard)

    def _loader(self, stage_index: int):
        from .data import StreamingLoader

        return StreamingLoader(self._stream_spec(stage_index, self.cfg.per_worker_batch_size), self.rank, self.world,
                               workers=self.cfg.data.data_workers, pin_memory=self.device.type == "cuda")

    def eval_batch(self) -> dict[str, Any]:
        """The first ``eval_samples`` samples of the first stage, the same on every rank and every run."""
        from .data import StreamingLoader

        if self._eval_batch is None:
            spec = self._stream_spec(0, self.cfg.logging.eval_samples)
            spec.shuffle_block = 1
            self._eval_batch = next(iter(StreamingLoader(spec, 0, 1, workers=0)))
        return self._eval_batch

    # ------------------------------------------------------------------ checkpoints
    def _load_resume_state(self, ckpt: Path) -> None:
        """Optimizer, scheduler, RNG and data position of ``ckpt`` (its weights are already loaded)."""
        try:
            self._load_resume_files(ckpt)
        except (RuntimeError, OSError, EOFError, KeyError, json.JSONDecodeError, pickle.UnpicklingError,
                zipfile.BadZipFile) as e:
            # preflight checks the files' framing; this catches damage inside them, in one line
            raise ValueError(f"checkpoint {ckpt} cannot be resumed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); remove it and resume from the one "
                             "before it") from None

    def _load_resume_files(self, ckpt: Path) -> None:
        from .parallel import is_sharded, load_local_optimizer_state

        state = json.loads((ckpt / "resume" / "state.json").read_text())
        if state.get("format") != RESUME_FORMAT:
            raise ValueError(f"{ckpt}: resume state format {state.get('format')!r}, expected {RESUME_FORMAT!r}")
        if state["world_size"] != self.world:
            raise ValueError(f"{ckpt} was written by {state['world_size']} workers, this run has {self.world}; "
                             "exact resume needs the same --workers")
        saved = saved_strategy(state.get("config", {}))
        if is_sharded(self.adapter) != (saved in SHARDED_ADAPTER):
            raise ValueError(f"{ckpt} was written with strategy={saved}, this run uses "
                             f"strategy={self.cfg.parallel.strategy}; resume with the same strategy (its optimizer "
                             "state is laid out for it)")
        if is_sharded(self.adapter):
            shard = ckpt / "resume" / f"optimizer-rank{self.rank:03d}.pt"
            load_local_optimizer_state(self.optimizer, torch.load(shard, map_location="cpu", weights_only=True))
        else:
            self.optimizer.load_state_dict(torch.load(ckpt / "resume" / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))
        self.scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(ckpt / "resume" / "rng.pt", map_location="cpu", weights_only=True)[self.rank]
        _set_rng_state(rng, self.gen, self.cpu_gen, self.device)
        self.step = int(state["step"])
        self.data_state = {"stage": state["data_stage"], "loader": state["data"][self.rank]}
        log.info("rank %d resumed from %s (step %d)", self.rank, ckpt, self.step)

    def save_checkpoint(self, loader) -> None:
        from .checkpoint_files import prune, swap_in
        from .parallel import full_adapter_state, is_sharded, local_optimizer_state

        cfg = self.cfg
        rngs = _gather(_rng_state(self.gen, self.cpu_gen, self.device))
        rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
        datas = _gather(loader.state_dict())
        sharded = is_sharded(self.adapter)
        weights = full_adapter_state(self.adapter) if (sharded or self.rank == 0) else None  # collective if sharded
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "resume").mkdir(parents=True)
        if sharded:  # every rank writes its own optimizer shard into the directory rank 0 made
            if self.world > 1:
                dist.barrier()
            torch.save(local_optimizer_state(self.optimizer), tmp / "resume" / f"optimizer-rank{self.rank:03d}.pt")
            if self.world > 1:
                dist.barrier()
        if self.rank == 0:
            self.adapter.save_pretrained(tmp, state_dict=weights, clip_vision=self.clip_vision)
            if not sharded:
                torch.save(self.optimizer.state_dict(), tmp / "resume" / "optimizer.pt")
            torch.save(rngs, tmp / "resume" / "rng.pt")
            state = {"format": RESUME_FORMAT, "step": self.step, "data_stage": cfg.stage_at(self.step),
                     "stage": cfg.stages[cfg.stage_at(self.step)].name, "world_size": self.world,
                     "scheduler": self.scheduler.state_dict(), "data": datas, "config": cfg.to_dict(),
                     "run_id": self.spec.run_id, "datasets": self.datasets}
            (tmp / "resume" / "state.json").write_text(json.dumps(state, indent=1))
            swap_in(tmp, final)  # fsynced; complete or absent, and never neither old nor new
            if cfg.checkpoints.keep:
                prune(root, cfg.checkpoints.keep)
            log.info("checkpoint %s", final)
        if self.world > 1:
            dist.barrier()  # nobody runs ahead and resumes from a half-written checkpoint

    # ------------------------------------------------------------------ eval / samples
    @torch.no_grad()
    def eval_loss(self) -> float:
        from .step import training_loss

        settings = replace(self.settings, drop_text=0.0, drop_image=0.0, drop_both=0.0)
        self.adapter.eval()  # no expert dropout: the global RNG stays untouched
        gen = torch.Generator(device=self.device).manual_seed(12345)
        loss = training_loss(self.frozen, self.adapter, self.adapter, self.eval_batch(), settings, gen,
                             torch.Generator().manual_seed(0), self.autocast, self.features.empty_prompt(0)).item()
        self.adapter.train()
        return loss

    def write_samples(self) -> None:
        import numpy as np
        from PIL import Image

        from dynaip.geometry import pad_to_square_white

        from .data import to_chw_uint8
        from .step import generate_samples

        cfg = self.cfg
        if cfg.logging.validation_prompts:
            prompts = list(cfg.logging.validation_prompts)
            if cfg.logging.validation_refs:
                s = self.frozen.clip.image_size
                refs = torch.stack([to_chw_uint8(pad_to_square_white(Image.open(p).convert("RGB")).resize((s, s)))
                                    for p in cfg.logging.validation_refs])
            else:
                refs = self.eval_batch()["ref"][: len(prompts)].repeat(len(prompts), 1, 1, 1)[: len(prompts)]
        else:
            batch = self.eval_batch()
            prompts, refs = list(batch["txt"]), batch["ref"]
        # without text encoders (precomputed features) the validation batch's stored captions are used
        text = (self.eval_batch()["t5"], self.eval_batch()["pooled"]) if self.frozen.pipe.text_encoder_2 is None else None
        h, w = cfg.data.buckets[0]
        self.adapter.eval()
        images = generate_samples(self.frozen, self.adapter, prompts, refs, (h, w), cfg.logging.sample_steps,
                                  cfg.logging.sample_guidance, seed=cfg.seed, max_sequence_length=cfg.loss.max_sequence_length,
                                  text=text)
        self.adapter.train()
        if self.rank == 0:
            d = self.out / "samples" / f"step-{self.step:06d}"
            d.mkdir(parents=True, exist_ok=True)
            for i, (img, ref) in enumerate(zip(images, refs)):
                Image.fromarray(img).save(d / f"{i:02d}.png")
                Image.fromarray(np.ascontiguousarray(ref.permute(1, 2, 0).numpy())).save(d / f"{i:02d}-ref.png")
            (d / "prompts.json").write_text(json.dumps(prompts, indent=1))
            # TensorBoard: references on the top row, samples below
            s = images[0].shape[0]
            row = [np.asarray(Image.fromarray(np.ascontiguousarray(r.permute(1, 2, 0).numpy())).resize(
                (images[i].shape[1], s))) for i, r in enumerate(refs)]
            self.metrics.image("samples", np.concatenate([np.concatenate(row, 1), np.concatenate(images, 1)], 0),
                               self.step)

    # ------------------------------------------------------------------ loop
    def _reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def run(self) -> dict[str, Any]:
        from .shard_integrity import ShardIntegrityError

        try:
            return self._run()
        except ShardIntegrityError as e:
            # from a DataLoader worker the message carries that worker's traceback: keep its last line
            line = [ln for ln in str(e).splitlines() if ln.strip()][-1]
            line = line.removeprefix("dynaip.train.shard_integrity.").removeprefix("ShardIntegrityError: ")
            self.metrics.write(step=self.step, event="corrupt_shard", rank=self.rank, error=line)
            self.metrics.close()
            raise ShardIntegrityError(line) from None

    def _run(self) -> dict[str, Any]:
        from tqdm import tqdm

        from .step import training_loss

        cfg = self.cfg
        no_save = bool(self.spec.extra.get("no_save"))
        from .parallel import is_sharded

        # what this run really does (tests read it to check that a config's switches took effect)
        self.metrics.write(step=self.step, event="start", world_size=self.world, strategy=cfg.parallel.strategy,
                           adapter_sharded=is_sharded(self.adapter), dtype=str(self.dtype).removeprefix("torch."),
                           autocast=None if self.autocast is None else str(self.autocast).removeprefix("torch."),
                           checkpointed_blocks=self.frozen.checkpointed_blocks, data_workers=cfg.data.data_workers,
                           clip_layers=list(self.adapter.config.clip_layers), device=self.device.type)
        # which encoders each rank holds: training on precomputed features must not load T5/CLIP text/VAE encoder
        self.metrics.write(event="setup", features=self.features.modes(), frozen_modules=_gather(self.frozen.loaded()))
        if self.step == 0 and cfg.logging.eval_every:
            self.metrics.write(step=0, val_loss=self.eval_loss())
        bar = tqdm(total=self.max_steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        stage_index, loader, it = None, None, None
        window = {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0}
        last: dict[str, Any] = {}
        while self.step < self.max_steps:
            step = self.step + 1
            si = cfg.stage_at(step)
            if si != stage_index:
                it = None  # shuts the previous stage's loader workers down
                loader = self._loader(si)
                if self.data_state is not None and self.data_state["stage"] == si:
                    loader.load_state_dict(self.data_state["loader"])
                if step > 1 and cfg.stage_at(step - 1) != si:  # a real switch, not a resume inside a stage
                    if self.rank == 0:
                        log.info("stage '%s' starts at step %d", cfg.stages[si].name, step)
                    self.metrics.write(step=step, event="stage", stage=cfg.stages[si].name)
                stage_index, it = si, iter(loader)

            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            loss = training_loss(self.frozen, self.adapter, self.encode, batch, self.settings, self.gen,
                                 self.cpu_gen, self.autocast, self.features.empty_prompt(si))
            loss.backward()
            logging_step = step % cfg.logging.log_every == 0 or step == self.max_steps
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), cfg.optim.grad_clip)
            elif logging_step:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.adapter.parameters()
                                                           if p.grad is not None])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            self.step = step
            window["loss"] += loss.item()
            window["n"] += 1
            window["wait"] += t1 - t0
            window["time"] += t2 - t0
            bar.update(1)

            if logging_step:
                dirs = self._stage_dirs(si)
                seen, dropped = loader.seen, loader.dropped
                loss_sum, wait, tot, skipped, filtered, corrupt, *counts = self._reduce(
                    window["loss"] / window["n"], window["wait"], window["time"], loader.skipped, loader.filtered,
                    loader.corrupt_shards,
                    *(seen.get(d, 0) for d in range(len(dirs))), *(dropped.get(r, 0) for r in DROP_REASONS))
                stage_start = sum(s.steps for s in cfg.stages[:si])
                last = dict(step=step, stage=cfg.stages[si].name, loss=loss_sum / self.world,
                            lr=self.scheduler.get_last_lr()[0],
                            samples_per_s=cfg.data.global_batch_size * window["n"] * self.world / tot,
                            data_wait=wait / tot, skipped=int(skipped), filtered=int(filtered),
                            # this stage's samples so far, summed over ranks: what a mixture really drew
                            samples_per_dataset={d: int(n) for d, n in zip(dirs, counts)},
                            filtered_by={r: int(n) for r, n in zip(DROP_REASONS, counts[len(dirs):])},
                            corrupt_shards=int(corrupt),
                            grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                            else grad_norm),
                            stage_index=si, stage_progress=min(1.0, (step - stage_start) / cfg.stages[si].steps),
                            progress=step / self.max_steps)
                self.metrics.write(**last)
                if self.spec.extra.get("ray_report"):  # every worker reports (Ray Train's dashboard / Result)
                    import ray.train

                    ray.train.report({k: v for k, v in last.items() if isinstance(v, (int, float))})
                bar.set_postfix(loss=f"{last['loss']:.4f}", stage=last["stage"])
                window = {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0}
            if cfg.logging.eval_every and (step % cfg.logging.eval_every == 0 or step == self.max_steps):
                self.metrics.write(step=step, val_loss=self.eval_loss())
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                self.write_samples()
            if not no_save and ((cfg.checkpoints.every and step % cfg.checkpoints.every == 0) or step == self.max_steps):
                self.save_checkpoint(loader)
        bar.close()
        self.metrics.close()
        return last


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Entry point of one training process (Ray Train worker, or the caller itself when local)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _Worker(RunSpec(**spec)).run()


# ----------------------------------------------------------------------------- driver

def run_training(cfg: TrainConfig, spec: RunSpec, ray_address: str | None = None, local: bool = False
                 ) -> dict[str, Any] | None:
    """Runs the job: ``local`` = one process without Ray (debugging, benchmarks); else Ray Train.

    With no ``ray_address`` (and none in the config) and no Ray already initialised in this
    process, an embedded local Ray is started and shut down afterwards. The run directory is held
    for the whole run (``run_dir.hold``): another run on it, or a run without ``resume`` over its
    checkpoints, is refused in one line before anything in it changes.
    """
    from .run_dir import hold

    with hold(spec.out, spec.resume):
        return _run_training(cfg, spec, ray_address, local)


def _run_training(cfg: TrainConfig, spec: RunSpec, ray_address: str | None, local: bool) -> dict[str, Any] | None:
    from .checkpoint_files import recover
    from .preflight import preflight

    recover(Path(spec.out) / "checkpoints")  # before anything reads a checkpoint
    for stage, counts in preflight(cfg, spec.data, spec.models, spec.out, spec.resume,
                                   spec.allow_data_change).items():
        log.info("stage '%s' data: %s", stage, "; ".join(f"{d}: {c}" for d, c in counts.items()))
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if not spec.run_id:
        import uuid

        spec.run_id = uuid.uuid4().hex
    if local:
        return train_worker(asdict(spec))

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dynaip.cluster import torch_config

    started = False
    if not ray.is_initialized():
        from dynaip.cluster import connect, ray_address_from_env

        # inside `ray job submit`, RAY_ADDRESS names the job's cluster
        connect(ray_address_from_env(ray_address or cfg.parallel.ray_address),
                num_cpus=max(os.cpu_count() or 1, cfg.parallel.workers * cfg.parallel.cpus_per_worker))
        started = True
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if cfg.parallel.use_gpu else "gloo")
    resources = {"CPU": cfg.parallel.cpus_per_worker, **({"GPU": 1} if cfg.parallel.use_gpu else {})}
    spec.extra = {**spec.extra, "ray_report": True}
    reported = Path(spec.out).resolve() / "ray" / "reported.jsonl"
    reported.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_worker, train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(num_workers=cfg.parallel.workers, use_gpu=cfg.parallel.use_gpu, resources_per_worker=resources),
        torch_config=torch_config(backend),  # on the embedded Ray: torch.distributed on loopback only
        run_config=RunConfig(name="dynaip-train", storage_path=str(Path(spec.out).resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.parallel.max_failures),
                             callbacks=[_report_log(reported)]))
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps a worker's error; a corrupt shard is the user's to fix: say it in one line
        line = _integrity_line(e)
        if line is None:
            raise
        from .shard_integrity import ShardIntegrityError

        raise ShardIntegrityError(line) from None
    finally:
        if started:
            ray.shutdown()
    lines = reported.read_text().splitlines() if reported.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _integrity_line(e: BaseException) -> str | None:
    """The ``ShardIntegrityError`` message inside a Ray Train failure (its text or its causes), or None."""
    seen = 0
    while e is not None and seen < 10:
        for ln in str(e).splitlines():
            if "ShardIntegrityError: " in ln:
                return ln.split("ShardIntegrityError: ", 1)[1].strip()
        e, seen = e.__cause__ or e.__context__, seen + 1  # type: ignore[assignment]
    return None


def _report_log(path: Path):
    """A Ray Train callback (it runs in the controller) that appends the metrics rank 0 reported."""
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        def __init__(self, target: str):
            self.target = target

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                with open(self.target, "a") as f:
                    f.write(json.dumps(metrics[0]) + "\n")

    return ReportLog(str(path))
