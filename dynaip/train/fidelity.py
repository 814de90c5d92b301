"""Subject fidelity while training (the ``fidelity:`` section; docs/fidelity.md).

Every ``fidelity.every`` steps the adapter as it stands generates a fixed subset of benchmark cases
and rank 0 scores them with the evaluation's own scorers (``dynaip.eval.score``: CLIP-I, CLIP-T, DINO,
the VLM judges' CP / PF). One record per evaluation goes to RUN/metrics.jsonl (and TensorBoard)::

    {"step": 2000, "event": "fidelity", "clip_i": 0.7132, "clip_t": 0.2874, "fidelity_cases": 16,
     "fidelity_seconds": 41.2}

How:

- cases: ``fidelity.cases`` read once per worker by the benchmark readers (``load_cases``), then
  ``select_cases`` keeps ``limit`` of them ordered by a hash of their id — the same subset at every
  evaluation, on every restart and whatever the order of the source;
- generation is sharded: rank r generates cases r, r + W, ... with the frozen FLUX already loaded for
  training and the training adapter itself (``step.sample_images``, the Euler loop of the sample
  images; multi-subject cases with the preset masks of ``dynaip eval generate``), so no second copy of
  the transformer is made. Ranks with one case fewer generate a throw-away case, so every rank runs the
  same number of transformer calls (FSDP2 gathers parameters collectively);
- each case draws its starting noise from a generator of its own seeded with the case's seed; the
  adapter is put in eval mode (no expert dropout), so the training RNG streams are not touched and
  a resumed run stays bit-identical;
- prompts are encoded once when the worker starts; a run on precomputed features (no T5 on the
  ranks) loads the text encoders for that moment only and frees them;
- the images go to RUN/fidelity/step-NNNNNN/images/<case>.png (the ``dynaip eval`` layout; earlier
  content of that folder is removed first), the scores next to them (``scores.jsonl``,
  ``judge_run1.jsonl``); rank 0 loads the CLIP / DINO scorers for the scoring only.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
import zlib
from pathlib import Path
from statistics import fmean
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from dynaip.atomic import atomic_write_bytes
from dynaip.eval.cases import Case, image_path, preset_masks

from .config import FidelityConfig

log = logging.getLogger(__name__)

SCORE_NAMES = {"clip_i": "clip-i", "clip_t": "clip-t", "dino": "dino", "cp": "cp", "pf": "pf"}
"""``fidelity.metrics`` name → the metric's name in dynaip.eval.score."""


def load_cases(source: str) -> list[Case]:
    """The cases of a cases file, a DreamBench++ root (``images/`` + ``captions/``) or a DynaIP-Bench pool."""
    from dynaip.eval.bench_multi import MultiBenchConfig, build_multi_cases
    from dynaip.eval.bench_single import SingleBenchConfig, read_single_pool
    from dynaip.eval.cases import read_cases

    path = Path(source)
    if path.is_file():
        return read_cases(path)
    if (path / "images").is_dir() and (path / "captions").is_dir():
        # a subset of the release is fine here: the readers' checks stay on, the counts are logged
        return read_single_pool(SingleBenchConfig(pool=str(path), allow_partial=True)).cases
    if path.is_dir():
        return build_multi_cases(MultiBenchConfig(pool=str(path)))
    raise FileNotFoundError(
        f"fidelity.cases '{path}' does not exist; name a DreamBench++ root, a DynaIP-Bench "
        "pool or a cases file from `dynaip eval bench-single`"
    )


def select_cases(cases: Sequence[Case], limit: int) -> list[Case]:
    """``limit`` cases, ordered by the CRC-32 of their id: a fixed subset that does not depend on the source's order."""
    return sorted(cases, key=lambda c: (zlib.crc32(c.id.encode()), c.id))[:limit]


def check_fidelity(cfg: FidelityConfig) -> list[Case]:
    """The cases a run evaluates, after checking that its metrics can be computed (a one-line error otherwise).
    Called by the driver before any worker starts, and by every worker."""
    cases = select_cases(load_cases(cfg.cases), cfg.limit)
    if not cases:
        raise ValueError(f"fidelity.cases '{cfg.cases}' holds no cases")
    eval_cfg = eval_config(cfg)
    if "dino" in cfg.metrics and eval_cfg.dino is None:
        raise ValueError(f"fidelity.metrics has dino but the eval config {cfg.eval_config} names no dino weights")
    if "dino" in cfg.metrics and not Path(eval_cfg.dino.path).is_file():
        raise FileNotFoundError(
            f"fidelity: the DINO weights {eval_cfg.dino.path} (eval config {cfg.eval_config}) "
            "do not exist; fix dino.path there"
        )
    judged = sorted(set(cfg.metrics) & {"cp", "pf"})
    if judged and not eval_cfg.judges:
        raise ValueError(f"fidelity.metrics has {judged} but the eval config {cfg.eval_config} lists no judges")
    return cases


def eval_config(cfg: FidelityConfig):
    from dynaip.eval.judge import EvalConfig

    return EvalConfig.from_yaml(cfg.eval_config) if cfg.eval_config else EvalConfig()


@contextlib.contextmanager
def rng_untouched(device: torch.device) -> Iterator[None]:
    """Restores every global RNG the training draws from (torch CPU and ``device``, numpy, random) on exit.
    Building the scorers initialises models at random before loading their weights (OpenCLIP, timm), which
    would otherwise move the stream of the adapter's expert dropout."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


class FidelityEval:
    """One worker's part of the fidelity evaluations (see the module docstring). Nothing it does moves the
    training's RNG streams (``rng_untouched``)."""

    def __init__(
        self,
        cfg: FidelityConfig,
        *,
        models: Any,
        frozen: Any,
        out: Path,
        rank: int,
        world: int,
        max_sequence_length: int,
    ):
        with rng_untouched(frozen.device):
            self._setup(cfg, models, frozen, out, rank, world, max_sequence_length)

    def _setup(
        self, cfg: FidelityConfig, models: Any, frozen: Any, out: Path, rank: int, world: int, max_sequence_length: int
    ) -> None:
        self.cfg, self.models, self.frozen, self.out, self.rank, self.world = cfg, models, frozen, out, rank, world
        self.cases = check_fidelity(cfg)
        if len(self.cases) < cfg.limit and rank == 0:
            log.warning(
                "fidelity: %d cases in %s, fewer than limit=%d; evaluating all of them",
                len(self.cases),
                cfg.cases,
                cfg.limit,
            )
        self.mine = self.cases[rank::world]
        self.rounds = -(-len(self.cases) // world)  # cases per rank, the last round padded
        self.text = self._encode_prompts([c.prompt for c in self.mine] or [self.cases[0].prompt], max_sequence_length)

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str], max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(T5 (1, L, D), pooled (1, D)) on the CPU per prompt, with the loaded text encoders or, without them,
        FLUX's text encoders loaded for this call only."""
        from .step import encode_prompts

        frozen = self.frozen
        pipe = frozen.pipe
        temporary = pipe.text_encoder_2 is None
        if temporary:
            from dynaip.models.flux import load_flux_pipeline

            pipe = load_flux_pipeline(self.models.flux, frozen.dtype, transformer=None, vae=None)
            for m in (pipe.text_encoder, pipe.text_encoder_2):
                m.requires_grad_(False).eval().to(frozen.device)
        out = []
        for p in prompts:
            t5, pooled, _ = encode_prompts(pipe, [p], frozen.device, max_sequence_length)
            out.append((t5.cpu(), pooled.cpu()))
        if temporary:
            del pipe
            if frozen.device.type == "cuda":
                torch.cuda.empty_cache()
        return out

    # ------------------------------------------------------------------ one evaluation
    def folder(self, step: int) -> Path:
        return self.out / "fidelity" / f"step-{step:06d}"

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def evaluate(self, step: int, adapter: torch.nn.Module) -> dict[str, Any] | None:
        """Generates this rank's cases, then (rank 0) scores them all: the record to log on rank 0, None elsewhere."""
        with rng_untouched(self.frozen.device):
            return self._evaluate(step, adapter)

    def _evaluate(self, step: int, adapter: torch.nn.Module) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        folder = self.folder(step)
        if self.rank == 0:  # an evaluation repeated after a restart starts clean: no stale image or score is reused
            shutil.rmtree(folder, ignore_errors=True)
        self._barrier()
        adapter.eval()
        try:
            for i in range(self.rounds):
                if i < len(self.mine):
                    image = self._generate(self.mine[i], self.text[i], adapter)
                    atomic_write_bytes(image_path(folder, self.mine[i].id), _png(image))
                else:  # the same number of transformer calls on every rank; the image is thrown away
                    self._generate(self.mine[0] if self.mine else self.cases[0], self.text[0], adapter)
        finally:
            adapter.train()
        self._barrier()  # every rank's images are on disk
        if self.rank != 0:
            return None
        record: dict[str, Any] = {"step": step, "event": "fidelity", **self._score(folder)}
        record["fidelity_cases"] = len(self.cases)
        record["fidelity_seconds"] = round(time.perf_counter() - t0, 3)
        return record

    def _generate(self, case: Case, text: tuple[torch.Tensor, torch.Tensor], adapter: torch.nn.Module) -> np.ndarray:
        from dynaip.geometry import pad_to_square_white

        from .data import to_chw_uint8
        from .step import clip_hidden_states, sample_images, stored_text

        frozen = self.frozen
        h, w = self.cfg.size
        s = frozen.clip.image_size
        refs = torch.stack(
            [
                to_chw_uint8(pad_to_square_white(Image.open(sub.path).convert("RGB")).resize((s, s)))
                for sub in case.subjects
            ]
        )  # (K, 3, S, S), as the loader prepares references
        c = adapter([hs.float() for hs in clip_hidden_states(frozen, refs)])  # (K, L, D); FSDP2 gathers here
        conds = [c[k : k + 1] for k in range(len(case.subjects))]
        masks = None
        if case.is_multi:  # the preset bands of `dynaip eval generate`
            masks = [
                torch.from_numpy(np.asarray(m) >= 128).to(frozen.device)
                for m in preset_masks(case.layout or ["middle"] * len(case.subjects), w, h)
            ]
        txt, pooled, txt_ids = stored_text(frozen, {"t5": text[0], "pooled": text[1]}, None, None)
        return sample_images(
            frozen,
            adapter,
            conds,
            txt,
            pooled,
            txt_ids,
            (h, w),
            self.cfg.steps,
            self.cfg.guidance,
            seed=case.seed,
            masks=masks,
        )[0]

    def _score(self, folder: Path) -> dict[str, float | None]:
        """Mean of each metric over the cases that got a value (None when none did)."""
        from dynaip.eval.score import ScoreSettings, ScoreStore, embed_values, judge_values, run_embeddings, run_judges

        cfg = self.cfg
        eval_cfg = eval_config(cfg)
        wanted = tuple(SCORE_NAMES[m] for m in cfg.metrics)
        settings = ScoreSettings(method="fidelity", metrics=wanted, device=str(self.frozen.device))
        embed = ScoreStore(folder / "scores.jsonl")
        run_embeddings(
            self.cases,
            folder,
            embed,
            settings,
            clip_paths=self.models.clip_vision,
            dino_paths=eval_cfg.dino if "dino" in cfg.metrics else None,
        )
        judged = bool({"cp", "pf"} & set(cfg.metrics))
        stores = {1: ScoreStore(folder / "judge_run1.jsonl")} if judged else {}
        if judged:
            run_judges(self.cases, folder, stores, eval_cfg, settings)
        names = [j.name for j in eval_cfg.judges]
        values: dict[str, list[float]] = {m: [] for m in cfg.metrics}
        for case in self.cases:
            got = {**embed_values(case, embed), **(judge_values(case, stores[1], names) if judged else {})}
            for m in cfg.metrics:
                if got.get(SCORE_NAMES[m]) is not None:
                    values[m].append(float(got[SCORE_NAMES[m]]))
        out = {m: (fmean(v) if v else None) for m, v in values.items()}
        missing = [m for m, v in out.items() if v is None]
        if missing:
            log.warning("fidelity: no case got a value for %s (see %s)", missing, folder)
        return out


def _png(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
