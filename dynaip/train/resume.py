"""A training worker's checkpoint: what ``Worker.save_checkpoint`` writes under
``RUN/checkpoints/step-NNNNNN/resume/`` (optimizer, scheduler, every rank's RNG and data position)
and how a resumed run reads it back (docs/ARCHITECTURE.md, "Trainer run"). The directory swap and
pruning are ``checkpoint_files.py``; finding the newest checkpoint is ``checkpoints.py``.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dynaip.atomic import writing

from .checkpoints import SHARDED_ADAPTER
from .config import saved_strategy

log = logging.getLogger(__name__)

RESUME_FORMAT = "dynaip-train-state/1"


@contextmanager
def _removed_on_error(tmp: Path) -> Iterator[None]:
    """A checkpoint that could not be written completely leaves no partial directory taking up space."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (pickled only in transit, never on disk)."""
    rank, world = rank_world()
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


def _set_rng_state(
    state: dict[str, torch.Tensor], gen: torch.Generator, cpu_gen: torch.Generator, device: torch.device
) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    cpu_gen.set_state(state["cpu_generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ResumeState:
    """Checkpoint save and resume of ``Worker`` (a mixin: it uses the worker's adapter, optimizer,
    scheduler, generators, step and rank)."""

    def _load_resume_state(self, ckpt: Path) -> None:
        """Optimizer, scheduler, RNG and data position of ``ckpt`` (its weights are already loaded)."""
        try:
            self._load_resume_files(ckpt)
        except (
            RuntimeError,
            OSError,
            EOFError,
            KeyError,
            json.JSONDecodeError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as e:
            # preflight checks the files' framing; this catches damage inside them, in one line
            raise ValueError(
                f"checkpoint {ckpt} cannot be resumed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); remove it and resume from the one "
                "before it"
            ) from None

    def _load_resume_files(self, ckpt: Path) -> None:
        from .parallel import is_sharded, load_local_optimizer_state

        state = json.loads((ckpt / "resume" / "state.json").read_text())
        if state.get("format") != RESUME_FORMAT:
            raise ValueError(f"{ckpt}: resume state format {state.get('format')!r}, expected {RESUME_FORMAT!r}")
        if state["world_size"] != self.world:
            raise ValueError(
                f"{ckpt} was written by {state['world_size']} workers, this run has {self.world}; "
                "exact resume needs the same --workers"
            )
        saved = saved_strategy(state.get("config", {}))
        if is_sharded(self.adapter) != (saved in SHARDED_ADAPTER):
            raise ValueError(
                f"{ckpt} was written with strategy={saved}, this run uses "
                f"strategy={self.cfg.parallel.strategy}; resume with the same strategy (its optimizer "
                "state is laid out for it)"
            )
        if is_sharded(self.adapter):
            shard = ckpt / "resume" / f"optimizer-rank{self.rank:03d}.pt"
            load_local_optimizer_state(self.optimizer, torch.load(shard, map_location="cpu", weights_only=True))
        else:
            self.optimizer.load_state_dict(
                torch.load(ckpt / "resume" / "optimizer.pt", map_location=self.device, weights_only=True)
            )
        self.scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(ckpt / "resume" / "rng.pt", map_location="cpu", weights_only=True)[self.rank]
        _set_rng_state(rng, self.gen, self.cpu_gen, self.device)
        self.step = int(state["step"])
        self.data_state = {"stage": state["data_stage"], "loader": state["data"][self.rank]}
        log.info("rank %d resumed from %s (step %d)", self.rank, ckpt, self.step)

    def save_checkpoint(self, loader) -> None:
        from .checkpoint_files import prune
        from .parallel import full_adapter_state, is_sharded, local_optimizer_state

        cfg = self.cfg
        rngs = gather(_rng_state(self.gen, self.cpu_gen, self.device))
        rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
        datas = gather(loader.state_dict())
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
            with writing(final):
                torch.save(local_optimizer_state(self.optimizer), tmp / "resume" / f"optimizer-rank{self.rank:03d}.pt")
            if self.world > 1:
                dist.barrier()
        if self.rank == 0:
            with writing(final), _removed_on_error(tmp):  # a full disk: the previous checkpoints stay as they are
                self._write_checkpoint(tmp, final, weights, sharded, rngs, datas)
            if cfg.checkpoints.keep:
                prune(root, cfg.checkpoints.keep, protect=self._best_step())
            log.info("checkpoint %s", final)
        if self.world > 1:
            dist.barrier()  # nobody runs ahead and resumes from a half-written checkpoint

    def _best_step(self) -> int | None:
        best = getattr(self, "best", None)
        return None if best is None else best.step

    def offer_best(self, value: float | None) -> None:
        """Rank 0, after saving the checkpoint of ``self.step``: best.json names it if ``value`` beats the best;
        the checkpoint it replaces as the best then falls under ``checkpoints.keep`` like any other."""
        from .checkpoint_files import prune

        if self.best.offer(self.step, value) and self.cfg.checkpoints.keep:
            prune(self.out / "checkpoints", self.cfg.checkpoints.keep, protect=self._best_step())

    def _write_checkpoint(self, tmp: Path, final: Path, weights: Any, sharded: bool, rngs: list, datas: list) -> None:
        from .checkpoint_files import swap_in

        cfg = self.cfg
        training = {
            "base_model": self.base_model,
            "step": self.step,
            "max_steps": cfg.max_steps or cfg.total_steps,
            "stage": cfg.stages[cfg.stage_at(self.step)].name,
            "run_id": self.spec.run_id,
            "datasets": self.datasets,
            "config": cfg.to_dict(),
        }  # the model card's "Training"; of the run's
        # planned steps (a --max-steps stop is not the end of training)
        self.adapter.save_pretrained(tmp, state_dict=weights, clip_vision=self.clip_vision, training=training)
        if not sharded:
            torch.save(self.optimizer.state_dict(), tmp / "resume" / "optimizer.pt")
        torch.save(rngs, tmp / "resume" / "rng.pt")
        state = {
            "format": RESUME_FORMAT,
            "step": self.step,
            "data_stage": cfg.stage_at(self.step),
            "stage": cfg.stages[cfg.stage_at(self.step)].name,
            "world_size": self.world,
            "scheduler": self.scheduler.state_dict(),
            "data": datas,
            "config": cfg.to_dict(),
            "run_id": self.spec.run_id,
            "datasets": self.datasets,
        }
        (tmp / "resume" / "state.json").write_text(json.dumps(state, indent=1))
        swap_in(tmp, final)  # fsynced; complete or absent, and never neither old nor new
