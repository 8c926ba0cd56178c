"""An async save from 2 FSDP2 ranks (gloo) loads into one process: DCP reshards, the manager assumes no layout,
and the checkpoint is renamed to step-N only once every rank is done."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
from test_checkpoint import harness
from tiny import TINY_MODEL

from titan_dsv3.checkpoint.manager import CheckpointManager, complete_steps
from titan_dsv3.config.job_config import Checkpoint, LRScheduler, Optimizer
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.optim.lr_scheduler import build_lr_scheduler
from titan_dsv3.optim.optimizer import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

WORLD = 2


class Counter:
    """The data position, as PackedLoader saves it."""

    def __init__(self):
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seq_len": 16, "global_batch": 2}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, folder: str, q) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from titan_dsv3.train import TrainState

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        model = DeepSeekV3Model(ModelArgs(**TINY_MODEL))
        model.init_weights()
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_optimizer([model], Optimizer(lr=3e-3), "cpu")  # as in test_checkpoint.harness
        sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2), 100)
        tokens = torch.randint(1, 2048, (2, 16), generator=torch.Generator().manual_seed(rank))
        logits, (mtp,) = model(tokens)
        (logits.pow(2).mean() + mtp.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        loader, state = Counter(), TrainState()
        loader.consumed, state.step = 4, 1
        cfg = Checkpoint(enable=True, interval=1, async_mode="async")
        mgr = CheckpointManager(
            cfg, folder, model_parts=[model], optimizer=opt, lr_scheduler=sched, dataloader=loader,
            train_state=state, rank=rank,
        )  # fmt: skip
        mgr.maybe_save(1)
        mgr.wait()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_model = {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in model.state_dict().items()}
        full_opt = get_optimizer_state_dict(model, opt, options=full)  # filled on rank 0 only
        mgr.close()
        if rank == 0:  # tensors go through a file: a queue would share memory with an exiting process
            torch.save((full_model, full_opt["state"]), os.path.join(folder, "expected.pt"))
            q.put("ok")
    except Exception:
        q.put(traceback.format_exc())
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp2_async_save_loads_into_one_process(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path), q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    result = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert result == "ok", result
    assert all(p.exitcode == 0 for p in procs)
    full_model, full_opt = torch.load(tmp_path / "expected.pt")
    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [1] and not list(folder.glob("*.partial"))
    assert {f.name for f in (folder / "step-1").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    h = harness(tmp_path, seed=3)  # one process, plain tensors
    assert h.mgr.load()
    assert h.loader.consumed == 4 and h.state.step == 1 and h.sched.last_epoch == 1
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, full_model[k]), k
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt_sd = get_optimizer_state_dict(h.model, h.opt)["state"]
    assert opt_sd.keys() == full_opt.keys()
    for fqn, st in full_opt.items():
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_sd[fqn][n], st[n]), (fqn, n)
