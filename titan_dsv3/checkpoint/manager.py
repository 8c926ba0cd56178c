"""Training checkpoints (DCP) of model, optimizer, LR schedule, data position, RNG and counters.

A checkpoint is written to ``step-N.partial`` and renamed to ``step-N`` by rank 0 only once the save is complete
on every rank (DCP writes ``.metadata`` last, after gathering every rank's write results), so a folder named
``step-N`` is always complete. Start-up resumes from the newest one (or checkpoint.load_step), removes leftover
partial folders, and never reads them. With async_mode = async the training loop stalls only for the copy of the
state to host memory; the write runs in a background thread and must finish before the next save starts.
The final model-only export (checkpoint.model_only) goes to ``step-N-model``, which resumption does not use.

Nothing here assumes a layout: model and optimizer state are DTensors under FSDP/TP, and DCP reshards them.
"""

from __future__ import annotations

import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from titan_dsv3.checkpoint.model_io import (
    PARTIAL_SUFFIX,
    CheckpointError,
    dcp_load,
    load_model_weights,
    model_state,
    one_line,
    read_metadata,
    write_model_args,
)

__all__ = ["CheckpointError", "CheckpointManager", "complete_steps"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelState(Stateful):
    """The model parts of this rank as one flat state dict (FQNs as in the full model)."""

    def __init__(self, parts: list[torch.nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict:
        return model_state(self.parts)

    def load_state_dict(self, state: dict) -> None:
        for p in self.parts:
            set_model_state_dict(p, state, options=StateDictOptions(strict=False))


def _clean_fqn(name: str) -> str:
    """A parameter's name as in the plain model: without activation-checkpoint or compile wrapper prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter FQN, over every model part of this rank.

    One optimizer may span several pipeline stages, which DCP's get_optimizer_state_dict (one module) cannot map;
    a tied copy kept under the same name on two stages of one rank is saved once and loaded into both. The state
    dict holds the optimizer's own tensors (DTensors under FSDP/TP), so DCP loads into them in place and their
    dtypes stay the optimizer's (torch's Optimizer.load_state_dict would cast fp32 masters and bf16 moments to
    the parameter dtype).
    """

    def __init__(self, parts: list[torch.nn.Module], optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        names = {}
        for part in parts:
            for name, p in part.named_parameters():
                names.setdefault(p, _clean_fqn(name))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        unknown = [i for i, p in enumerate(self.params) if p not in names]
        if unknown:
            raise ValueError(f"{len(unknown)} optimizer parameters belong to none of the model parts")
        self.fqns = [names[p] for p in self.params]

    @torch.no_grad()
    def _init_missing_state(self) -> None:
        """Create the state of parameters that have none yet with one zero-gradient, zero-LR step, which leaves
        the weights unchanged; a load needs every entry to exist to read into it."""
        missing = [p for p in self.params if not self.optimizer.state.get(p)]
        if not missing:
            return
        grads = [p.grad for p in self.params]
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for p in self.params:
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * 0 if isinstance(g["lr"], torch.Tensor) else 0.0
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(self.params, grads):
            p.grad = grad

    def state_dict(self) -> dict:
        self._init_missing_state()
        state: dict[str, dict] = {}
        for fqn, p in zip(self.fqns, self.params):
            state.setdefault(fqn, dict(self.optimizer.state[p]))
        groups, i = [], 0
        for g in self.optimizer.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": self.fqns[i : i + n]})
            i += n
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"{len(sd['param_groups'])} optimizer parameter groups saved, {len(self.optimizer.param_groups)} here"
            )
        for fqn, p in zip(self.fqns, self.params):
            own = self.optimizer.state[p]
            for k, v in sd["state"][fqn].items():
                if isinstance(own.get(k), torch.Tensor) and own[k] is not v:
                    own[k].copy_(
                        v
                    )  # a second (tied) copy of a parameter, or a tensor DCP did not fill in place
                else:
                    own[k] = v
        for g, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})


class RNGState(Stateful):
    """Each rank's CPU and CUDA generator states, under the rank's own key."""

    def __init__(self, rank: int):
        self.key = f"rank{rank}"

    def state_dict(self) -> dict:
        sd = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state()
        return {self.key: sd}

    def load_state_dict(self, state: dict) -> None:
        sd = state[self.key]
        torch.set_rng_state(sd["cpu"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state(sd["cuda"])


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in folder, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


class CheckpointManager:
    def __init__(
        self, cfg, dump_folder: Path, *, model_parts, optimizer, lr_scheduler, dataloader, train_state, rank
    ):
        self.cfg = cfg
        self.enabled = cfg.enable
        self.folder = Path(dump_folder) / cfg.folder
        self.rank = rank
        self.model_parts = model_parts
        self.model_args = getattr(model_parts[0], "args", None)
        self.states = {
            "model": ModelState(model_parts),
            "optimizer": OptimizerState(model_parts, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": dataloader,
            "train_state": train_state,
            "rng": RNGState(rank),
        }
        self.is_async = cfg.async_mode == "async"
        # DCP coordinates through a process group; the background thread of an async save must not share the
        # training's (NCCL) group, and async_save needs a CPU backend: give checkpointing its own gloo group.
        self.pg = dist.new_group(backend="gloo") if self.enabled and dist.is_initialized() else None
        self._writer = None  # reused by async saves so that the pinned host copy is allocated once
        self._pending: tuple[Future, Path, Path] | None = None  # (future, partial folder, final folder)
        self._in_flight = False

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _no_dist(self) -> bool:
        return not dist.is_initialized()

    # ---- load --------------------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Resume from checkpoint.load_step or the newest complete checkpoint; else start from
        checkpoint.initial_load_path if set. Returns whether a training checkpoint was loaded."""
        if not self.enabled:
            if self.cfg.initial_load_path:
                self._initial_load()
            return False
        if self.rank == 0:
            self._remove_partials()
        self._barrier()
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
            if self.cfg.initial_load_path:
                self._initial_load()
            return False
        path = self.folder / f"step-{step}"
        state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in self.states.items()}
        if f"rng.{self.states['rng'].key}.cpu" not in read_metadata(path).state_dict_metadata:
            state.pop("rng")  # saved with fewer ranks: this rank keeps its seeded generators
        dcp_load(state, path, self.pg)
        try:
            for key, value in state.items():
                self.states[key].load_state_dict(value)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this run ({one_line(e)})") from None
        if self.rank == 0:
            print(f"resumed from {path}", flush=True)
        return True

    def _initial_load(self) -> None:
        path = Path(self.cfg.initial_load_path)
        load_model_weights(self.model_parts, path, self.pg)
        if self.rank == 0:
            print(f"initial weights from {path}", flush=True)

    def _remove_partials(self) -> None:
        if self.folder.is_dir():
            for p in self.folder.glob(f"step-*{PARTIAL_SUFFIX}"):
                print(f"removing incomplete checkpoint {p}", flush=True)
                shutil.rmtree(p, ignore_errors=True)

    # ---- save --------------------------------------------------------------------------------------------------

    def maybe_save(self, step: int, last: bool = False) -> None:
        if not self.enabled:
            return
        self._poll()
        if last and self.cfg.model_only:
            self.wait()
            self._save_model_only(step)
        elif last or step % self.cfg.interval == 0:
            self._save(step)

    def _prepare(self, name: str) -> tuple[Path, Path]:
        final = self.folder / name
        partial = self.folder / f"{name}{PARTIAL_SUFFIX}"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            if self.model_args is not None:
                write_model_args(self.model_args, partial)
        self._barrier()
        return partial, final

    def _save(self, step: int) -> None:
        self.wait()  # the previous async save must be complete (and renamed) before the next one starts
        partial, final = self._prepare(f"step-{step}")
        if not self.is_async:
            dcp.save(self.states, checkpoint_id=str(partial), process_group=self.pg, no_dist=self._no_dist())
            self._barrier()
            self._commit(partial, final)
            self._barrier()
            return
        if self._writer is None:
            # On CUDA the staged copy lives in pinned host memory kept across saves; pinning needs a GPU.
            self._writer = dcp.FileSystemWriter(
                str(partial), cache_staged_state_dict=torch.cuda.is_available()
            )
        # (single process: DCP itself detects that no process group exists)
        future = dcp.async_save(
            self.states, checkpoint_id=str(partial), storage_writer=self._writer, process_group=self.pg
        )
        self._pending = (future, partial, final)
        self._in_flight = True

    def _save_model_only(self, step: int) -> None:
        dtype = _EXPORT_DTYPES[self.cfg.export_dtype]
        # the expert bias stays fp32 like the router that reads it
        sd = {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith("expert_bias") else v
            for k, v in model_state(self.model_parts).items()
        }
        partial, final = self._prepare(f"step-{step}-model")
        dcp.save({"model": sd}, checkpoint_id=str(partial), process_group=self.pg, no_dist=self._no_dist())
        self._barrier()
        self._commit(partial, final)
        self._barrier()

    def _commit(self, partial: Path, final: Path) -> None:
        """Rank 0: make a finished save visible under its final name, then apply keep_latest_k."""
        if self.rank != 0:
            return
        if final.exists():
            # a re-save of a step (after a resume from an earlier one): move the old copy aside, then replace it
            old = final.with_name(final.name + ".old" + PARTIAL_SUFFIX)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
        self._purge()

    def _purge(self) -> None:
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for step in complete_steps(self.folder)[:-k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)

    def _finish(self, block: bool) -> None:
        if self._pending is None:
            return
        future, partial, final = self._pending
        if not block and not future.done():
            return
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"saving checkpoint {partial} failed ({one_line(e)})") from None
        # rank 0's save returns only after every rank's data is written and .metadata is on disk
        self._commit(partial, final)

    def _poll(self) -> None:
        """Commit an async save that has finished in the background (no waiting, no collective)."""
        self._finish(block=False)

    def wait(self) -> None:
        """Block until any save in flight is complete and committed (collective when one was in flight)."""
        self._finish(block=True)
        if self._in_flight:  # the same on every rank, unlike _pending, which _poll clears rank by rank
            self._in_flight = False
            self._barrier()

    def close(self) -> None:
        self.wait()
        close = getattr(self._writer, "close", None)
        if close is not None:
            close()
        self._writer = None
