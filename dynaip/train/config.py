"""``TrainConfig``: every knob of a training run, loaded from YAML (``jobs/configs/*.yaml``).

Keyword-only dataclasses with a docstring under each field; unknown YAML keys raise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dynaip.configs import ConfigError, build, read_yaml
from dynaip.models import sampling
from dynaip.models.attention_backend import BACKENDS

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2", "fsdp2_adapter", "fsdp2_full")
"""Layouts of the frozen base and the adapter over the workers (dynaip.train.parallel)."""


@dataclass(kw_only=True)
class DataSource:
    """One entry of a stage's ``data``: a plain path in YAML, or ``{path: ..., weight: ...}``."""

    SHORTHAND: ClassVar[str] = "path"
    """A plain string entry is ``{path: ENTRY}`` (dynaip/configs.py)."""
    path: str
    """Dataset directory (local or fsspec URL) with a ``manifest.json``."""
    weight: float | None = None
    """Share of the stage's samples drawn from this dataset, relative to the other entries' weights.
    Null (a plain path) = no mixture: the stage's datasets are concatenated, each sample once per epoch."""

    def __post_init__(self) -> None:
        self.path = str(self.path)
        if self.weight is not None and not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"data '{self.path}': weight must be a number > 0, got {self.weight!r}")
        if self.weight is not None:
            self.weight = float(self.weight)


QUALITY_FILTERS = {"min_aesthetic": "aesthetic", "min_sharpness": "sharpness", "min_subject_pixels": "subject_pixels"}
"""Filter key → the score it reads from a sample's ``json["quality"]`` (written at curation)."""


@dataclass(kw_only=True)
class FilterConfig:
    """Training-time thresholds on the per-sample scores stored at curation (``json["quality"]``).

    A sample is kept when every set threshold is met (score >= minimum). A sample that lacks a score
    some set threshold needs is dropped and counted under that filter; a dataset whose first sample
    lacks it is refused before training starts (``dynaip.train.preflight``), since then the dataset
    was curated without the score and the filter would drop everything.
    """

    min_aesthetic: float | None = None
    """Minimum ``quality.aesthetic``; null = no threshold."""
    min_sharpness: float | None = None
    """Minimum ``quality.sharpness``; null = no threshold."""
    min_subject_pixels: int | None = None
    """Minimum ``quality.subject_pixels`` (the subject mask's pixel count); null = no threshold."""

    def active(self) -> dict[str, float]:
        """Set thresholds: ``{score name in json["quality"]: minimum}``."""
        return {QUALITY_FILTERS[k]: float(v) for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(kw_only=True)
class StageConfig:
    """One training stage: a number of steps on a selection of the data."""

    name: str
    """Shown in logs and metrics (e.g. ``intra``, ``cross``)."""
    steps: int
    """Optimizer steps in this stage; stages run back to back."""
    pair: str | None = None
    """Keep only samples whose ``json.pair`` is this (``intra`` | ``cross``); null keeps all."""
    data: list[DataSource] = field(default_factory=list)
    """Datasets of this stage; empty = the run's ``--data``. Each entry is a directory (local or fsspec
    URL), or ``{path: DIR, weight: W}``: with any weight, the stage draws each sample from dataset d
    with probability W_d / sum(W) (plain paths in such a list weigh 1), each dataset in its own
    shuffled order that repeats independently when exhausted (see dynaip.train.mixture)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Thresholds on stored quality scores, applied while streaming (``FilterConfig``); counted in metrics."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"stage '{self.name}': steps must be >= 1, got {self.steps}")
        if self.pair not in (None, "intra", "cross"):
            raise ValueError(f"stage '{self.name}': pair must be intra, cross or null, got {self.pair!r}")
        self.data = [
            build(DataSource, str(d) if isinstance(d, Path) else d, where=f"stage '{self.name}'", at=f"data[{i}].")
            for i, d in enumerate(self.data)
        ]
        dup = sorted({p for p in self.paths if self.paths.count(p) > 1})
        if dup:
            raise ValueError(
                f"stage '{self.name}': data lists {dup[0]} more than once; give it one entry "
                "(with a larger weight to draw it more often)"
            )
        self.filters = build(FilterConfig, self.filters or {}, where=f"stage '{self.name}'", at="filters.")

    @property
    def paths(self) -> list[str]:
        """The dataset directories of ``data``, in order."""
        return [d.path for d in self.data]

    @property
    def weights(self) -> list[float] | None:
        """Mixture weights, one per dataset (plain paths weigh 1), or None when no entry names a weight."""
        if all(d.weight is None for d in self.data):
            return None
        return [1.0 if d.weight is None else d.weight for d in self.data]


@dataclass(kw_only=True)
class DataConfig:
    """Batches and the loader (the ``data:`` section)."""

    global_batch_size: int = 16
    """Samples per optimizer step over all workers; must be divisible by ``parallel.workers``."""
    buckets: list[list[int]] = field(default_factory=lambda: [[sampling.SIZE, sampling.SIZE]])
    """Target sizes [H, W] (multiples of 16); one entry = fixed resolution. A batch uses the bucket
    nearest its first sample's aspect ratio and centre-crops the others to it."""
    shuffle_block: int = 64
    """Stream positions shuffled together per loader worker (see dynaip.train.data)."""
    data_workers: int = 2
    """DataLoader processes per training worker (0 = decode in the training process)."""
    features: str = "auto"
    """Precomputed features (``dynaip precompute``: T5 + pooled CLIP text embeddings and VAE posteriors
    under ``DATASET/features/``). ``auto``: a stage whose every dataset has a feature set serving this
    run (same text encoders / VAE, ``loss.max_sequence_length``, all ``buckets``) trains from it, other
    stages encode on the fly (the choice is logged). ``required``: a stage without them is an error.
    ``off``: always encode on the fly. When every stage uses features, T5, CLIP-L text and the VAE
    encoder are never loaded on the training ranks (the VAE decoder only with ``logging.sample_every``).
    Stale, corrupt or missing feature files are errors naming the file, in every mode but ``off``."""
    on_corrupt_shard: str = "error"
    """A shard that is missing or whose bytes fail the manifest's sha256 (checked while it streams,
    dynaip/train/shard_integrity.py): ``error`` stops the run naming the shard; ``skip`` trains without
    its samples (counted in ``skipped``) and counts the shard in ``corrupt_shards`` of RUN/metrics.jsonl."""

    def __post_init__(self) -> None:
        if self.on_corrupt_shard not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt_shard={self.on_corrupt_shard!r}: choose one of ('error', 'skip')")
        if self.features not in ("auto", "required", "off"):
            raise ValueError(f"data.features={self.features!r}: choose one of ('auto', 'required', 'off')")
        self.buckets = [[int(h), int(w)] for h, w in self.buckets]


@dataclass(kw_only=True)
class ModelConfig:
    """The adapter that trains (the ``model:`` section)."""

    adapter_preset: str = "full"
    """``full`` (FLUX.1-dev + ViT-L/14-336) or ``tiny`` (the tiny checkpoints): ``DynaIPConfig.full()/.tiny()``."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``DynaIPConfig`` fields (ablations: fusion, expert_layers, ...)."""

    def __post_init__(self) -> None:
        if self.adapter_preset not in ("full", "tiny"):
            raise ValueError(f"model.adapter_preset={self.adapter_preset!r}: choose one of ('full', 'tiny')")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (the ``optim:`` section)."""

    lr: float = 2e-5
    """AdamW peak learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "cosine"
    """``cosine`` (to ``min_lr_ratio`` × lr at the last step) or ``constant``; after ``warmup_steps``."""
    warmup_steps: int = 0
    """Linear warmup from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    """Final lr of the cosine schedule as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Max global grad norm of the adapter parameters (0 = off)."""
    fused: bool = True
    """Fused AdamW (``torch.optim.AdamW(fused=True)``: one kernel per parameter group and dtype instead of
    a dozen multi-tensor launches per step) on CUDA and the CPU, FSDP2 shards included; false = the
    foreach implementation. Fused and foreach round differently: resume a run with the setting it started
    with for a bitwise continuation (dynaip/train/optim.py)."""

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of ('cosine', 'constant')")


@dataclass(kw_only=True)
class LossConfig:
    """What the training step reads (the ``loss:`` section; dynaip.train.step.training_loss)."""

    guidance: float = 1.0
    """Constant fed to FLUX-dev's guidance embedding during training. FLUX-dev is guidance-distilled and
    has no unguided mode; adapter trainers for it (x-flux) feed 1.0, diffusers' DreamBooth script 3.5. We
    use 1.0 so the adapter learns on the least-guided setting; generation then uses its own guidance."""
    logit_mean: float = 0.0
    """Timestep sampling: t = sigmoid(N(logit_mean, logit_std)) (logit-normal, the SD3 paper's best and
    diffusers' ``--weighting_scheme logit_normal``; x-flux samples uniformly over its shifted schedule,
    diffusers' FLUX scripts default to uniform). jobs/configs/paper.yaml documents the choice."""
    logit_std: float = 1.0
    """See ``logit_mean``."""
    resolution_shift: bool = True
    """Shift t with mu = calculate_shift(image_seq_len) from the scheduler config, as FluxPipeline does."""
    max_sequence_length: int = 512
    """T5 tokens per prompt (FLUX-dev: 512)."""
    drop_text: float = 0.05
    """CFG dropout: probability of an empty prompt only."""
    drop_image: float = 0.05
    """CFG dropout: probability of zero reference tokens only."""
    drop_both: float = 0.05
    """CFG dropout: probability of both at once."""

    def __post_init__(self) -> None:
        if self.drop_text + self.drop_image + self.drop_both > 1:
            raise ValueError("loss.drop_text + drop_image + drop_both must be <= 1")


@dataclass(kw_only=True)
class ParallelConfig:
    """Workers, sharding, precision and memory (the ``parallel:`` section; docs/memory.md)."""

    workers: int = 2
    """Ray Train workers (one process each, one GPU each with ``use_gpu``)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per training worker."""
    use_gpu: bool = False
    """One GPU per worker; the frozen base runs in bf16 there."""
    strategy: str = "ddp"
    """``ddp``: frozen base replicated, adapter in DistributedDataParallel. ``fsdp2``: additionally
    shards the frozen transformer's blocks with ``fully_shard``. ``fsdp2_adapter``: shards the adapter's
    parameters, gradients and AdamW state (FSDP2) instead of DDP. ``fsdp2_full``: both. See
    dynaip.train.parallel and docs/memory.md."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` = nccl with GPUs, gloo on the CPU."""
    precision: str = "auto"
    """Frozen-model dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``. Adapter weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute the transformer's activations in backward instead of keeping them (memory for time)."""
    checkpoint_keep_blocks: int = 0
    """With ``gradient_checkpointing``: the last N of FLUX's blocks keep their activations and are not
    recomputed (faster, more memory per block; 0 = every block recomputes). See docs/memory.md."""
    compile: bool = False
    """Regional ``torch.compile``: each of FLUX's repeated blocks (double- and single-stream, the adapter's
    cross-attention inside) is compiled once per block class and reused by every block of that class
    (dynaip/models/compiled.py). Works with every ``strategy``, gradient checkpointing and
    ``checkpoint_keep_blocks``. Inductor on GPUs; on the CPU the ``aot_eager`` backend (capture and
    joint graphs without generated kernels). The first steps pay the compile time; RUN/metrics.jsonl's
    ``start`` record counts the compiled blocks (``compiled_blocks``)."""
    attention: str = "auto"
    """SDPA kernel of FLUX's attention: ``auto`` (the first of flash, efficient, math on CUDA — flash,
    math on the CPU — that passes a forward/backward check against the math backend at the model's head
    shape and dtype), or one of ``flash``, ``cudnn``, ``efficient``, ``math`` (checked the same way; a
    failing check stops the run naming why). cuDNN is never picked by ``auto`` (its backward failed on an
    H100). The backend in use is the ``attention`` of RUN/metrics.jsonl's ``start`` record
    (dynaip/models/attention_backend.py)."""
    find_unused_parameters: bool = False
    """DDP option; needed only by adapter variants with parameters that a step does not use."""
    max_failures: int = 2
    """Ray Train restarts of a failed worker group; a restart resumes from this run's newest checkpoint."""
    ray_address: str | None = None
    """Ray cluster to join (``auto`` or ``ray://...``); null starts an embedded local Ray."""

    def __post_init__(self) -> None:
        for name, choices in (
            ("strategy", STRATEGIES),
            ("backend", ("auto", "gloo", "nccl")),
            ("attention", BACKENDS),
            ("precision", ("auto", "bf16", "fp32")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r}: choose one of {choices}")
        if self.checkpoint_keep_blocks < 0:
            raise ValueError(f"parallel.checkpoint_keep_blocks={self.checkpoint_keep_blocks}: must be >= 0")
        if self.workers < 1:
            raise ValueError(f"parallel.workers={self.workers}: must be >= 1")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and how many stay (the ``checkpoints:`` section)."""

    every: int = 1000
    """Write ``RUN/checkpoints/step-NNNNNN`` every this many steps (0 = only at the end)."""
    keep: int | None = None
    """Keep only the newest N checkpoints; null keeps all. The ``keep_best`` checkpoint is kept besides them."""
    keep_best: str | None = None
    """A ``fidelity.metrics`` name (``clip_i``, ...): after each fidelity evaluation, the checkpoint saved at
    that step is compared with the best so far (higher is better) and ``RUN/checkpoints/best.json`` names
    the best (dynaip/train/best.py); that checkpoint is never pruned by ``keep``. Needs
    ``fidelity.every`` to be a multiple of ``every`` (every evaluation step is a checkpoint step). Null = off."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Metrics, validation losses and sample images (the ``logging:`` section)."""

    log_every: int = 10
    """Steps between lines in ``RUN/metrics.jsonl``."""
    eval_every: int = 0
    """Steps between validation losses on a fixed batch with fixed noise and timesteps (0 = off)."""
    eval_samples: int = 4
    """Size of that fixed batch: the first samples of the first stage's data."""
    sample_every: int = 0
    """Steps between sample images in ``RUN/samples/step-NNNNNN`` (0 = off)."""
    sample_steps: int = sampling.STEPS
    """Euler steps of the sampling loop."""
    sample_guidance: float = sampling.GUIDANCE
    """FLUX-dev guidance for samples."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample images; empty = the captions of the fixed validation samples."""
    validation_refs: list[str] = field(default_factory=list)
    """Reference image paths (one per prompt); empty = the references of the fixed validation samples."""

    def __post_init__(self) -> None:
        if len(self.validation_refs) not in (0, len(self.validation_prompts)):
            raise ValueError(
                f"{len(self.validation_refs)} validation_refs for {len(self.validation_prompts)} "
                "validation_prompts: give one reference per prompt, or none"
            )


FIDELITY_METRICS = ("clip_i", "clip_t", "dino", "cp", "pf")
"""What ``fidelity.metrics`` may name: CLIP-I, CLIP-T, DINO (dynaip/eval/metrics.py) and the VLM judges'
concept preservation / prompt following (dynaip/eval/judge.py), each a mean over the evaluated cases."""


@dataclass(kw_only=True)
class FidelityConfig:
    """Subject fidelity while training (the ``fidelity:`` section; dynaip/train/fidelity.py, docs/fidelity.md).

    Every ``every`` steps the current adapter generates ``limit`` benchmark cases (sharded over the
    ranks) and rank 0 scores them; one record per evaluation goes to RUN/metrics.jsonl and TensorBoard.
    """

    every: int = 0
    """Steps between evaluations (multiples of it; 0 = off)."""
    cases: str | None = field(default=None, metadata={"path": True})
    """A DreamBench++ root (``images/`` + ``captions/``, the release's layout), a DynaIP-Bench typed pool
    (``POOL/<type>/<name>.jpg``) or a cases file written by ``dynaip eval bench-single`` / ``bench-multi``.
    A relative path resolves against the config file's folder."""
    limit: int = 16
    """Cases evaluated: a fixed subset, the same at every evaluation and on every restart (the cases
    ordered by a hash of their id; dynaip.train.fidelity.select_cases)."""
    steps: int = sampling.STEPS
    """Euler steps per generated image."""
    guidance: float = sampling.GUIDANCE
    """FLUX-dev guidance for the generated images."""
    size: list[int] = field(default_factory=lambda: [sampling.SIZE, sampling.SIZE])
    """[H, W] of the generated images (multiples of 16)."""
    metrics: list[str] = field(default_factory=lambda: ["clip_i", "clip_t"])
    """Any of ``FIDELITY_METRICS``; ``dino`` needs ``eval_config`` with ``dino``, ``cp`` / ``pf`` its ``judges``."""
    eval_config: str | None = field(default=None, metadata={"path": True})
    """An ``eval score`` config (jobs/configs/eval_judges.yaml: VLM judges, DINO weights); null = none."""

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in FIDELITY_METRICS]
        if bad:
            raise ValueError(f"fidelity.metrics: {bad} unknown; choose from {list(FIDELITY_METRICS)}")
        if self.every < 0 or self.limit < 1 or self.steps < 1:
            raise ValueError(
                f"fidelity: every ({self.every}) must be >= 0, limit ({self.limit}) and steps ({self.steps}) >= 1"
            )
        if len(self.size) != 2 or any(int(v) < 16 or int(v) % 16 for v in self.size):
            raise ValueError(f"fidelity.size={self.size}: give [H, W], each a positive multiple of 16")
        self.size = [int(v) for v in self.size]
        if self.every and not self.cases:
            raise ValueError(
                "fidelity.every is set but fidelity.cases is not: name a DreamBench++ root, a "
                "DynaIP-Bench pool or a cases file"
            )
        if self.every and not self.metrics:
            raise ValueError("fidelity.metrics is empty: name at least one of " + ", ".join(FIDELITY_METRICS))
        needs_eval = sorted(set(self.metrics) & {"dino", "cp", "pf"})
        if self.every and needs_eval and not self.eval_config:
            raise ValueError(
                f"fidelity.metrics {needs_eval} need fidelity.eval_config (an eval config with dino "
                "weights / judges, like jobs/configs/eval_judges.yaml)"
            )


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "parallel": ParallelConfig,
    "checkpoints": CheckpointConfig,
    "logging": LoggingConfig,
    "fidelity": FidelityConfig,
}
"""Section key → its dataclass."""

FLAT_KEYS = {
    **{f.name: ("data", f.name) for f in dataclasses.fields(DataConfig) if f.name != "on_corrupt_shard"},
    **{
        f.name: (section, f.name)
        for section in ("model", "optim", "loss", "parallel", "logging")
        for f in dataclasses.fields(SECTIONS[section])
    },
    "checkpoint_every": ("checkpoints", "every"),
    "keep_checkpoints": ("checkpoints", "keep"),
}
"""The flat top-level keys of configs written before the sections (a deprecated layout that still
loads, with one warning naming the new keys): flat key → (section, key)."""


def nest_flat_keys(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with its deprecated flat keys moved into their sections; one warning lists the moves.
    A flat key given beside the same key in its section is refused (which one would win is unclear)."""
    flat = [k for k in raw if k in FLAT_KEYS]
    if not flat:
        return raw
    out = {k: v for k, v in raw.items() if k not in FLAT_KEYS}
    for key in flat:
        section, name = FLAT_KEYS[key]
        body = out.get(section)
        body = dict(body) if isinstance(body, dict) else ({} if body is None else body)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: '{section}' must be a mapping, got {body!r}")
        if name in body:
            raise ConfigError(f"{where}: '{key}' is given flat and as '{section}.{name}'; keep only '{section}.{name}'")
        body[name] = raw[key]
        out[section] = body
    moves = ", ".join(f"{k} → {'.'.join(FLAT_KEYS[k])}" for k in flat)
    log.warning(
        '%s: flat keys are deprecated, nest them in their sections (docs/ARCHITECTURE.md, "Configuration"): %s',
        where,
        moves,
    )
    return out


@dataclass(kw_only=True)
class TrainConfig:
    """A training run. Defaults are the paper's recipe where it states one (jobs/configs/paper.yaml)."""

    stages: list[StageConfig]
    """Stages in order; the paper: 20k steps intra-pair, then 80k cross-pair."""
    seed: int = 0
    """Seeds the adapter init, data order and every per-rank RNG."""
    max_steps: int | None = None
    """Stop after this step (and checkpoint there); null = the sum of the stages' steps."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The adapter (``ModelConfig``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Batches and the loader (``DataConfig``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the lr schedule (``OptimConfig``)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The flow-matching step (``LossConfig``)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Workers, sharding, precision, memory (``ParallelConfig``)."""
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint interval and retention (``CheckpointConfig``)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, validation and samples (``LoggingConfig``)."""
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    """Subject fidelity on benchmark cases while training (``FidelityConfig``; off by default)."""

    def __post_init__(self) -> None:
        self.stages = [
            build(StageConfig, s, where="train config", at=f"stages[{i}].") for i, s in enumerate(self.stages)
        ]
        for name, cls in SECTIONS.items():
            setattr(self, name, build(cls, getattr(self, name) or {}, where="train config", at=f"{name}."))
        if not self.stages:
            raise ValueError("config needs at least one stage under 'stages'")
        if self.data.global_batch_size % self.parallel.workers:
            raise ValueError(
                f"data.global_batch_size={self.data.global_batch_size} is not divisible by "
                f"parallel.workers={self.parallel.workers}; pick a batch size that splits evenly "
                "over the workers"
            )
        self._check_keep_best()

    def _check_keep_best(self) -> None:
        """``checkpoints.keep_best`` names an evaluated metric, and every evaluation step is a checkpoint step."""
        best, fid, every = self.checkpoints.keep_best, self.fidelity, self.checkpoints.every
        if best is None:
            return
        if not fid.every:
            raise ValueError(f"checkpoints.keep_best={best!r} needs fidelity evaluations: set fidelity.every")
        if best not in fid.metrics:
            raise ValueError(f"checkpoints.keep_best={best!r} is not among fidelity.metrics {fid.metrics}")
        if not every or fid.every % every:
            raise ValueError(
                f"checkpoints.keep_best: fidelity.every={fid.every} must be a multiple of "
                f"checkpoints.every={every}, so that every evaluated step has its checkpoint"
            )

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def per_worker_batch_size(self) -> int:
        return self.data.global_batch_size // self.parallel.workers

    def stage_at(self, step: int) -> int:
        """Index of the stage that runs optimizer step ``step`` (1-based); the last stage beyond the end."""
        end = 0
        for i, s in enumerate(self.stages):
            end += s.steps
            if step <= end:
                return i
        return len(self.stages) - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], where: str = "train config", base: str | Path | None = None
    ) -> "TrainConfig":
        """The config of the mapping ``raw`` through the one loader (dynaip/configs.py): every key
        is checked, an unknown one is refused naming its path and the nearest valid key. The flat
        layout of configs written before the sections still loads (``nest_flat_keys``)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of keys (see jobs/configs/tiny.yaml), got {raw!r}")
        return build(cls, nest_flat_keys(raw, where), where=where, base=base)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        raw = read_yaml(path, "train config", "see jobs/configs/tiny.yaml and paper.yaml")
        return cls.from_dict(raw, where=f"train config '{path}'", base=path.parent)


def saved_strategy(config: dict[str, Any]) -> str:
    """``parallel.strategy`` of a config dict saved in a checkpoint's resume state, in either layout
    (checkpoints written before the sections hold the flat ``strategy``)."""
    parallel = config.get("parallel")
    if isinstance(parallel, dict) and "strategy" in parallel:
        return parallel["strategy"]
    return config.get("strategy", "ddp")


def set_keys(raw: dict[str, Any], **keys: Any) -> dict[str, Any]:
    """A copy of the config mapping ``raw`` with ``keys`` set, each section's key named by its flat
    name (``lr=`` → ``optim.lr``, ``checkpoint_every=`` → ``checkpoints.every``; ``FLAT_KEYS``) and
    top-level keys (``stages``, ``seed``, ``max_steps``) as they are. For tests and benchmarks that
    derive a config from a shipped one."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in keys.items():
        if key in FLAT_KEYS:
            section, name = FLAT_KEYS[key]
            out[section] = {**(out.get(section) or {}), name: value}
        else:
            out[key] = value
    return out


def get_key(raw: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value of ``key`` (a flat name, as in ``set_keys``) in the nested config mapping ``raw``."""
    if key in FLAT_KEYS:
        section, name = FLAT_KEYS[key]
        return (raw.get(section) or {}).get(name, default)
    return raw.get(key, default)
