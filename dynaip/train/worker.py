"""One training process: ``train_worker`` builds a ``Worker`` (frozen FLUX + CLIP, the adapter, its
parallel strategy, optimizer and per-rank generators; resumed from a checkpoint when asked) and
``Worker.run`` is the loop: stream a batch, ``step.training_loss``, optimizer step, log / eval /
samples / checkpoint on their schedules. Checkpoint save and resume are ``resume.py``; metrics
``metrics.py``; the driver that starts the workers is ``trainer.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoints import latest_checkpoint
from .config import TrainConfig
from .metrics import DROP_REASONS, MetricsWriter
from .resume import ResumeState, gather, rank_world

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- the worker


class Worker(ResumeState):
    """State of one training process; ``run`` is the loop."""

    def __init__(self, spec: RunSpec):
        from dynaip.adapter import DynaIPAdapter, DynaIPConfig
        from dynaip.adapter.card import base_model_of
        from dynaip.models import ModelsConfig

        from .parallel import apply_strategy
        from .step import configure_attention_backends, load_frozen

        self.spec = spec
        self.cfg = cfg = TrainConfig.from_dict(spec.config)
        self.out = Path(spec.out)
        self.rank, self.world = rank_world()
        if self.world != cfg.parallel.workers and dist.is_initialized():
            log.warning("config says workers=%d, running with world_size=%d", cfg.parallel.workers, self.world)
        self.device = _device(cfg)
        self.dtype = _dtype(cfg, self.device)
        self.autocast = torch.bfloat16 if self.dtype == torch.bfloat16 else None
        self.max_steps = spec.max_steps or cfg.max_steps or cfg.total_steps
        self.settings = cfg.loss

        models = ModelsConfig.from_yaml(spec.models)
        self.clip_vision = asdict(models.clip_vision)  # named in every checkpoint's config.json (load_dynaip)
        self.base_model = base_model_of(models.flux)  # named in every checkpoint's model card
        preset = DynaIPConfig.full if cfg.model.adapter_preset == "full" else DynaIPConfig.tiny
        # The adapter's config is the one source of truth for its CLIP layers; models.yaml only
        # seeds a fresh adapter that does not name them.
        adapter_config = preset(**{"clip_layers": models.clip_vision.layers, **cfg.model.adapter})
        self.features = self._resolve_features(models.flux)
        self.frozen = load_frozen(
            models,
            self.device,
            self.dtype,
            cfg.parallel.gradient_checkpointing,
            encoders=self.features.encoders,
            vae_decoder=cfg.logging.sample_every > 0 or cfg.fidelity.every > 0,
            clip_layers=adapter_config.clip_layers,
            checkpoint_keep_blocks=cfg.parallel.checkpoint_keep_blocks,
            compile_blocks=cfg.parallel.compile,
        )
        self.attention = configure_attention_backends(
            self.device, cfg.parallel.attention, self.dtype, self.frozen.transformer
        )
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
        own = (
            ckpt is not None
            and spec.run_id
            and json.loads((ckpt / "resume" / "state.json").read_text()).get("run_id") == spec.run_id
        )
        resume_from = ckpt if (spec.resume or own) else None  # own: Ray restarted this run's workers
        if spec.resume and ckpt is None:
            log.warning("--resume: no checkpoint under %s/checkpoints; starting from step 0", self.out)
        if resume_from is not None:  # whole weights first: sharding then splits them like a fresh adapter
            self.adapter.load_weights(resume_from)
        self.encode = apply_strategy(
            cfg.parallel.strategy,
            self.frozen.transformer,
            self.adapter,
            self.device,
            cfg.parallel.find_unused_parameters,
        )
        from .optim import make_optimizer

        self.optimizer = make_optimizer(self.adapter.parameters(), cfg.optim)
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
        self.metrics = MetricsWriter(
            self.out / "metrics.jsonl" if self.rank == 0 else None, self.out / "tb" if self.rank == 0 else None
        )
        self.fidelity = None
        if cfg.fidelity.every:
            from .fidelity import FidelityEval

            self.fidelity = FidelityEval(
                cfg.fidelity,
                models=models,
                frozen=self.frozen,
                out=self.out,
                rank=self.rank,
                world=self.world,
                max_sequence_length=cfg.loss.max_sequence_length,
            )
        self.best = None  # rank 0's record of the best checkpoint (checkpoints.keep_best; best.py)
        if cfg.checkpoints.keep_best and self.rank == 0:
            from .best import BestCheckpoint

            self.best = BestCheckpoint(self.out / "checkpoints", cfg.checkpoints.keep_best)
            if resume_from is not None:
                self.best.load()
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
        return StreamSpec(
            shards=shards,
            batch_size=batch_size,
            seed=self.cfg.seed + 7919 * stage_index,
            shuffle_block=self.cfg.data.shuffle_block,
            pair=self.cfg.stages[stage_index].pair,
            ref_size=self.frozen.clip.image_size,
            buckets=[tuple(b) for b in self.cfg.data.buckets],
            weights=self.cfg.stages[stage_index].weights,
            filters=self.cfg.stages[stage_index].filters.active(),
            on_corrupt_shard=self.cfg.data.on_corrupt_shard,
        )

    def _loader(self, stage_index: int):
        from .data import StreamingLoader

        return StreamingLoader(
            self._stream_spec(stage_index, self.cfg.per_worker_batch_size),
            self.rank,
            self.world,
            workers=self.cfg.data.data_workers,
            pin_memory=self.device.type == "cuda",
        )

    def eval_batch(self) -> dict[str, Any]:
        """The first ``eval_samples`` samples of the first stage, the same on every rank and every run."""
        from .data import StreamingLoader

        if self._eval_batch is None:
            spec = self._stream_spec(0, self.cfg.logging.eval_samples)
            spec.shuffle_block = 1
            self._eval_batch = next(iter(StreamingLoader(spec, 0, 1, workers=0)))
        return self._eval_batch

    # ------------------------------------------------------------------ eval / samples
    @torch.no_grad()
    def eval_loss(self) -> float:
        from .step import training_loss

        settings = replace(self.settings, drop_text=0.0, drop_image=0.0, drop_both=0.0)
        self.adapter.eval()  # no expert dropout: the global RNG stays untouched
        gen = torch.Generator(device=self.device).manual_seed(12345)
        loss = training_loss(
            self.frozen,
            self.adapter,
            self.adapter,
            self.eval_batch(),
            settings,
            gen,
            torch.Generator().manual_seed(0),
            self.autocast,
            self.features.empty_prompt(0),
        ).item()
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
                refs = torch.stack(
                    [
                        to_chw_uint8(pad_to_square_white(Image.open(p).convert("RGB")).resize((s, s)))
                        for p in cfg.logging.validation_refs
                    ]
                )
            else:
                refs = self.eval_batch()["ref"][: len(prompts)].repeat(len(prompts), 1, 1, 1)[: len(prompts)]
        else:
            batch = self.eval_batch()
            prompts, refs = list(batch["txt"]), batch["ref"]
        # without text encoders (precomputed features) the validation batch's stored captions are used
        text = (
            (self.eval_batch()["t5"], self.eval_batch()["pooled"]) if self.frozen.pipe.text_encoder_2 is None else None
        )
        h, w = cfg.data.buckets[0]
        self.adapter.eval()
        images = generate_samples(
            self.frozen,
            self.adapter,
            prompts,
            refs,
            (h, w),
            cfg.logging.sample_steps,
            cfg.logging.sample_guidance,
            seed=cfg.seed,
            max_sequence_length=cfg.loss.max_sequence_length,
            text=text,
        )
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
            row = [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(r.permute(1, 2, 0).numpy())).resize((images[i].shape[1], s))
                )
                for i, r in enumerate(refs)
            ]
            self.metrics.image(
                "samples", np.concatenate([np.concatenate(row, 1), np.concatenate(images, 1)], 0), self.step
            )

    # ------------------------------------------------------------------ loop
    def _reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def run(self) -> dict[str, Any]:
        from dynaip.dataset.format import DatasetError

        from .shard_integrity import ERROR_LINE, ShardIntegrityError

        try:
            return self._run()
        except DatasetError as e:  # a shard failing its hash, or breaking the dataset rules (dataset/reader.py)
            # from a DataLoader worker the message carries that worker's traceback: keep its last line
            line = [ln for ln in str(e).splitlines() if ln.strip()][-1]
            line = ERROR_LINE.sub("", line)
            self.metrics.write(step=self.step, event="corrupt_shard", rank=self.rank, error=line)
            self.metrics.close()
            raise ShardIntegrityError(line) from None

    def _run(self) -> dict[str, Any]:
        from tqdm import tqdm

        from .step import training_loss

        cfg = self.cfg
        no_save = bool(self.spec.extra.get("no_save"))
        from dynaip.models.compiled import compiled_blocks

        from .parallel import is_sharded

        # what this run really does (tests read it to check that a config's switches took effect)
        self.metrics.write(
            step=self.step,
            event="start",
            world_size=self.world,
            strategy=cfg.parallel.strategy,
            adapter_sharded=is_sharded(self.adapter),
            dtype=str(self.dtype).removeprefix("torch."),
            autocast=None if self.autocast is None else str(self.autocast).removeprefix("torch."),
            checkpointed_blocks=self.frozen.checkpointed_blocks,
            data_workers=cfg.data.data_workers,
            clip_layers=list(self.adapter.config.clip_layers),
            device=self.device.type,
            compiled_blocks=compiled_blocks(self.frozen.transformer),
            attention=self.attention,
        )
        # which encoders each rank holds: training on precomputed features must not load T5/CLIP text/VAE encoder
        self.metrics.write(event="setup", features=self.features.modes(), frozen_modules=gather(self.frozen.loaded()))
        if self.step == 0 and cfg.logging.eval_every:
            self.metrics.write(step=0, val_loss=self.eval_loss())
        bar = tqdm(total=self.max_steps, initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        stage_index, loader, it = None, None, None
        # The loss stays on the device between log lines (summed there): no per-step host sync. The
        # window's time runs from its first step's start to the log step's end, after one device
        # synchronisation there, less what eval / samples / checkpoints took inside it.
        window = {"loss": None, "n": 0, "wait": 0.0, "start": None, "other": 0.0}
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
            if window["start"] is None:
                window["start"] = t0
            batch = next(it)
            t1 = time.perf_counter()
            loss = training_loss(
                self.frozen,
                self.adapter,
                self.encode,
                batch,
                self.settings,
                self.gen,
                self.cpu_gen,
                self.autocast,
                self.features.empty_prompt(si),
            )
            loss.backward()
            logging_step = step % cfg.logging.log_every == 0 or step == self.max_steps
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), cfg.optim.grad_clip)
            elif logging_step:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.adapter.parameters() if p.grad is not None]
                )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step
            loss = loss.detach()
            window["loss"] = loss if window["loss"] is None else window["loss"] + loss
            window["n"] += 1
            window["wait"] += t1 - t0
            bar.update(1)

            if logging_step:
                mean_loss = (window["loss"] / window["n"]).item()  # the window's one host sync
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                tot = time.perf_counter() - window["start"] - window["other"]
                dirs = self._stage_dirs(si)
                seen, dropped = loader.seen, loader.dropped
                loss_sum, wait, tot, skipped, filtered, corrupt, *counts = self._reduce(
                    mean_loss,
                    window["wait"],
                    tot,
                    loader.skipped,
                    loader.filtered,
                    loader.corrupt_shards,
                    *(seen.get(d, 0) for d in range(len(dirs))),
                    *(dropped.get(r, 0) for r in DROP_REASONS),
                )
                stage_start = sum(s.steps for s in cfg.stages[:si])
                last = dict(
                    step=step,
                    stage=cfg.stages[si].name,
                    loss=loss_sum / self.world,
                    lr=self.scheduler.get_last_lr()[0],
                    samples_per_s=cfg.data.global_batch_size * window["n"] * self.world / tot,
                    data_wait=wait / tot,
                    skipped=int(skipped),
                    filtered=int(filtered),
                    # this stage's samples so far, summed over ranks: what a mixture really drew
                    samples_per_dataset={d: int(n) for d, n in zip(dirs, counts)},
                    filtered_by={r: int(n) for r, n in zip(DROP_REASONS, counts[len(dirs) :])},
                    corrupt_shards=int(corrupt),
                    grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                    stage_index=si,
                    stage_progress=min(1.0, (step - stage_start) / cfg.stages[si].steps),
                    progress=step / self.max_steps,
                )
                self.metrics.write(**last)
                if self.spec.extra.get("ray_report"):  # every worker reports (Ray Train's dashboard / Result)
                    import ray.train

                    ray.train.report({k: v for k, v in last.items() if isinstance(v, (int, float))})
                bar.set_postfix(loss=f"{last['loss']:.4f}", stage=last["stage"])
                window = {"loss": None, "n": 0, "wait": 0.0, "start": None, "other": 0.0}
            t3 = time.perf_counter()
            if cfg.logging.eval_every and (step % cfg.logging.eval_every == 0 or step == self.max_steps):
                self.metrics.write(step=step, val_loss=self.eval_loss())
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                self.write_samples()
            fidelity = None
            if self.fidelity is not None and step % cfg.fidelity.every == 0:
                fidelity = self.fidelity.evaluate(step, self.adapter)  # every rank generates; rank 0 scores
                if fidelity is not None:
                    self.metrics.write(**fidelity)
            if not no_save and (
                (cfg.checkpoints.every and step % cfg.checkpoints.every == 0) or step == self.max_steps
            ):
                self.save_checkpoint(loader)
                if fidelity is not None and self.best is not None:  # its checkpoint is on disk: it may become the best
                    self.offer_best(fidelity[cfg.checkpoints.keep_best])
            if window["start"] is not None:  # eval / samples / checkpoint inside an open window
                window["other"] += time.perf_counter() - t3
        bar.close()
        self.metrics.close()
        return last


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Entry point of one training process (Ray Train worker, or the caller itself when local)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Worker(RunSpec(**spec)).run()
