"""Distributed checkpoints (DCP) of model, optimizer, LR schedule, data position, RNG and counters.

A checkpoint is written to ``step-N.partial`` and renamed to ``step-N`` only when every rank has finished, so a
folder named ``step-N`` is always complete; start-up resumes from the newest one and ignores partial ones.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder."""


class ModelState(Stateful):
    """The model parts of this rank as one flat state dict (FQNs as in the full model)."""

    def __init__(self, parts: list[torch.nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        sd = {}
        for p in self.parts:
            sd.update(get_model_state_dict(p))
        return sd

    def load_state_dict(self, state: dict) -> None:
        for p in self.parts:
            set_model_state_dict(p, state, options=StateDictOptions(strict=False))


class OptimizerState(Stateful):
    def __init__(self, parts: list[torch.nn.Module], optimizer: torch.optim.Optimizer):
        self.parts, self.optimizer = parts, optimizer

    def state_dict(self) -> dict:
        sd = {}
        for p in self.parts:
            sd.update(get_optimizer_state_dict(p, self.optimizer))
        return sd

    def load_state_dict(self, state: dict) -> None:
        for p in self.parts:
            set_optimizer_state_dict(p, self.optimizer, state)


class RNGState(Stateful):
    def state_dict(self) -> dict:
        sd = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state()
        return sd

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in folder, ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


class CheckpointManager:
    def __init__(self, cfg, dump_folder: Path, *, model_parts, optimizer, lr_scheduler, dataloader, train_state, rank):
        self.cfg = cfg
        self.enabled = cfg.enable
        self.folder = Path(dump_folder) / cfg.folder
        self.rank = rank
        self.states = {
            "model": ModelState(model_parts),
            "optimizer": OptimizerState(model_parts, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": dataloader,
            "train_state": train_state,
            "rng": RNGState(),
        }

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def load(self) -> bool:
        """Resume from checkpoint.load_step or the newest complete checkpoint. Returns whether one was loaded."""
        if not self.enabled:
            return False
        steps = complete_steps(self.folder)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise CheckpointError(
                    f"checkpoint.load_step = {self.cfg.load_step}: no complete checkpoint {self.folder}/step-"
                    f"{self.cfg.load_step}; complete ones: {steps or 'none'}"
                )
            step = self.cfg.load_step
        elif steps:
            step = steps[-1]
        else:
            return False
        path = self.folder / f"step-{step}"
        try:
            dcp.load(self.states, checkpoint_id=str(path))
        except Exception as e:  # DCP raises many types; the user needs the folder and the reason
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
        if self.rank == 0:
            print(f"resumed from {path}", flush=True)
        return True

    def maybe_save(self, step: int, last: bool = False) -> None:
        if not self.enabled or not (last or step % self.cfg.interval == 0):
            return
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        self._barrier()
        dcp.save(self.states, checkpoint_id=str(partial))
        self._barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            self._purge()
        self._barrier()

    def _purge(self) -> None:
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for step in complete_steps(self.folder)[:-k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)

    def wait(self) -> None:
        """Block until any save in flight is complete."""

    def close(self) -> None:
        self.wait()
