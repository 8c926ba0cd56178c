"""Per-block torch.compile with expert parallelism: the compiled experts must compute with their local shard
(bf16, where the grouped GEMM path runs on CPU). Losses follow the single-process compiled run."""

from __future__ import annotations

import os

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks
from tests.distributed.test_reshard import train_to_end

pytestmark = pytest.mark.slow


COMMON = {"compile.enable": "true", "training.mixed_precision": "bf16", "training.steps": "3"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Losses of the single-process compiled run."""
    tmp = tmp_path_factory.mktemp("one")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
    (losses,) = run_ranks(train_to_end, 1, layout_args(str(tmp), **COMMON), timeout=600)
    return losses


def train_and_count_eager(args: list[str]) -> tuple[list[float], int, int]:
    """Losses of the run, and how many attention calls and grouped GEMMs of its last step ran outside a compiled
    graph."""
    import torch

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    losses = [trainer.train_step()["loss"] for _ in range(trainer.total_steps - 1)]
    with torch.profiler.profile() as prof:
        losses.append(trainer.train_step()["loss"])
    eager = {"aten::scaled_dot_product_attention": 0, "aten::_grouped_mm": 0}
    for ev in prof.events():
        if ev.name not in eager:
            continue
        parent = ev.cpu_parent
        while parent is not None and "CompiledFxGraph" not in parent.name:
            parent = parent.cpu_parent
        eager[ev.name] += parent is None
    return losses, *eager.values()


EP = {**COMMON, "parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"}
# blocks 0 and 2 checkpointed: one dense, one MoE
AC2 = {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_option": "2"}


def test_compiled_ep2_fsdp2_bf16(single, tmp_path):
    ranks = run_ranks(train_and_count_eager, 2, layout_args(str(tmp_path / "ep"), **EP), timeout=600)
    for losses, eager_attention, eager_gemms in ranks:
        assert eager_attention == 0 and eager_gemms == 0
        # bf16 compute: the layouts round differently, so agreement is to bf16 precision, not bit for bit
        assert losses == pytest.approx(single, rel=2e-3)


def test_compiled_ep2_checkpointed_blocks_stay_compiled(single, tmp_path):
    """EP's host read of split sizes breaks the graph; a checkpoint traced around it would run the whole block
    eagerly. Compiled inside the checkpoint, its attention and the route's expert GEMMs stay compiled, in forward,
    recompute and backward."""
    ac = {**EP, **AC2}
    ranks = run_ranks(train_and_count_eager, 2, layout_args(str(tmp_path / "ac"), **ac), timeout=600)
    for losses, eager_attention, eager_gemms in ranks:
        assert eager_attention == 0 and eager_gemms == 0
        assert losses == pytest.approx(single, rel=2e-3)


def test_compiled_pp2_ep2_checkpointed_blocks(single, tmp_path):
    """The same compiled route inside pipeline stages (4 micro-batches a step, every 2nd block checkpointed)."""
    pp = {
        **EP,
        **AC2,
        "parallelism.pipeline_parallel_degree": "2",
        "parallelism.pipeline_parallel_microbatches": "4",
    }
    ranks = run_ranks(train_to_end, 4, layout_args(str(tmp_path / "pp"), **pp), timeout=900)
    for losses in ranks:
        assert losses == pytest.approx(single, rel=2e-3)


def train_with_an_idle_rank(args: list[str]) -> list[float]:
    """Steps 4 and 5 send every copy to rank 0's experts (biases +-100): rank 1 receives no rows, sends none back,
    and its experts get empty groups, as with a collapsed router. Compiled, the 0-row grouped GEMM's backward
    failed (torch 2.13); such a layer must exchange eagerly."""
    import torch

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    losses = []
    for i in range(trainer.total_steps):
        if i in (3, 5):  # the 4 experts: 0, 1 on rank 0; 2, 3 on rank 1
            bias = [100.0, 100.0, -100.0, -100.0] if i == 3 else [0.0] * 4
            for moe in trainer.moes:
                moe.gate.expert_bias.copy_(torch.tensor(bias))
        losses.append(trainer.train_step()["loss"])
    return losses


@pytest.mark.parametrize(
    "route",
    [{}, {"compile.moe_one_graph": "true"}, {"parallelism.expert_route": "padded"}],
    ids=["sized", "one_graph", "padded"],
)
def test_compiled_ep2_survives_a_rank_with_no_rows(tmp_path, route):
    """Default route: such a layer exchanges eagerly. compile.moe_one_graph: its unbacked sizes take 0 rows.
    Padded route: the sizes do not change, rank 1's expert groups are all empty."""
    idle = {**EP, "training.steps": "6", "moe.bias_update_speed": "0"}
    eager = run_ranks(
        train_with_an_idle_rank, 2, layout_args(str(tmp_path / "e"), **{**idle, "compile.enable": "false"})
    )
    one = {**idle, **route}
    compiled = run_ranks(train_with_an_idle_rank, 2, layout_args(str(tmp_path / "c"), **one), timeout=600)
    for e, c in zip(eager, compiled):
        assert c == pytest.approx(e, rel=2e-3)


def train_and_count_breaks(args: list[str]) -> tuple[list[float], int]:
    """Losses, and dynamo's graph breaks over the whole run."""
    import torch

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    torch._dynamo.utils.counters.clear()
    trainer = Trainer(parse_args(args))
    losses = [trainer.train_step()["loss"] for _ in range(trainer.total_steps)]
    return losses, sum(torch._dynamo.utils.counters["graph_break"].values())


ONE_GRAPH = {**EP, **AC2, "compile.moe_one_graph": "true"}


def test_compiled_ep2_moe_one_graph(single, tmp_path):
    """compile.moe_one_graph: the route reads its sizes inside the graph, and the routed experts (EP over both
    data ranks: a 1-rank expert mesh) get no FSDP unit, so every block compiles without a graph break, checkpointed
    ones included (the default breaks at the host read and at the expert unit's hooks)."""
    ranks = run_ranks(train_and_count_breaks, 2, layout_args(str(tmp_path / "one"), **ONE_GRAPH), timeout=600)
    for losses, breaks in ranks:
        assert breaks == 0
        assert losses == pytest.approx(single, rel=2e-3)


PADDED = {**EP, **AC2, "parallelism.expert_route": "padded", "parallelism.expert_1rank_fsdp_unit": "false"}


def test_compiled_ep2_padded_route(single, tmp_path):
    """parallelism.expert_route = padded reads nothing on the host: without the experts' FSDP unit every block
    compiles without a graph break (checkpointed ones included), and the losses follow the single process."""
    ranks = run_ranks(train_and_count_breaks, 2, layout_args(str(tmp_path / "pad"), **PADDED), timeout=600)
    for losses, breaks in ranks:
        assert breaks == 0
        assert losses == pytest.approx(single, rel=2e-3)
