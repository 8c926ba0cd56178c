"""tools/memory.py: internal consistency, the eager activation formulas against autograd's saved tensors, and the
GPU measurements the constants were set from."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from titan_dsv3.config import parse_args, resolve_model_args
from titan_dsv3.config.manager import TRAIN_CONFIGS
from titan_dsv3.models import DeepSeekV3Model
from titan_dsv3.models.args import ModelArgs
from titan_dsv3.parallel.dims import ParallelDims
from titan_dsv3.tools import dry_run
from titan_dsv3.tools.memory import GiB, Layout, block_bytes, estimate, estimate_from_config
from titan_dsv3.tools.plan import intended_world_size

V2_LITE_6 = dict(  # bench6's shape
    vocab_size=102400,
    dim=2048,
    inter_dim=10944,
    moe_inter_dim=1408,
    n_layers=6,
    n_dense_layers=1,
    n_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    n_activated_experts=6,
    n_expert_groups=1,
    n_limited_groups=1,
    score_func="softmax",
    group_score="max",
    route_norm=False,
    route_scale=1.0,
    q_lora_rank=0,
    mtp_depth=0,
)


def _preset(name: str) -> ModelArgs:
    path = TRAIN_CONFIGS / f"{name}.toml"
    return resolve_model_args(
        parse_args(["--job.config_file", str(path)], world_size=intended_world_size(path))
    )


def test_more_gpus_less_memory_per_gpu():
    a = _preset("deepseek_15b")
    totals = [estimate(a, Layout(dp_shard=n, ep=8), 2, 4096, compiled=True).total for n in (8, 16, 32, 64)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


@pytest.mark.parametrize("name", ["deepseek_1b", "deepseek_16b", "deepseek_236b"])
@pytest.mark.parametrize("compiled", [False, True])
def test_checkpointing_orders_memory(name, compiled):
    a = _preset(name)
    lay = Layout(dp_shard=8, ep=8 if a.n_routed_experts % 8 == 0 else 1)
    m = {
        mode: estimate(a, lay, 2, 4096, ac_mode=mode, compiled=compiled).allocated
        for mode in ("none", "full")
    }
    sel_op = estimate(a, lay, 2, 4096, ac_mode="selective", ac_option="op", compiled=compiled).allocated
    sel_2 = estimate(a, lay, 2, 4096, ac_mode="selective", ac_option="2", compiled=compiled).allocated
    assert m["full"] < sel_op < m["none"] and m["full"] < sel_2 < m["none"]


def test_knobs_move_memory_the_right_way():
    a = ModelArgs(**V2_LITE_6)
    one = Layout()
    base = estimate(a, one, 4, 4096)
    assert estimate(a, one, 8, 4096).allocated > base.allocated  # bigger micro-batch
    assert estimate(a, one, 4, 4096, compiled=True).allocated < base.allocated  # compiled blocks save less
    bf16 = estimate(a, one, 4, 4096, state_dtype="bfloat16")
    assert base.optimizer - bf16.optimizer == pytest.approx(
        4 * base.params_local
    )  # two moments, 2 bytes less each
    # gradient accumulation keeps every gradient allocated through the forward
    assert estimate(a, one, 4, 4096, grad_accum=2).grads_at_peak == pytest.approx(base.grads)


def test_sharded_parameters_add_up_to_the_model():
    a = _preset("deepseek_671b")
    lay = Layout(dp_shard=256, ep=64)
    est = estimate(a, lay, 2, 4096, ac_mode="full", compiled=True, state_dtype="bfloat16")
    assert est.params_local * 256 == pytest.approx(a.num_params(), rel=1e-6)
    assert est.optimizer == pytest.approx(4 * est.params_local) and est.grads == pytest.approx(
        4 * est.params_local
    )


def test_pipeline_stages_split_the_layers():
    a = _preset("deepseek_236b")
    flat = estimate(a, Layout(dp_shard=16, ep=8), 4, 4096, ac_mode="full", compiled=True)
    staged = estimate(
        a, Layout(dp_shard=16, pp=8, ep=8, pp_microbatches=8), 4, 4096, ac_mode="full", compiled=True
    )
    assert staged.params_local < flat.params_local / 4  # one stage holds about an eighth of the layers
    # 60 layers in 8 stages: stages 0-3 hold 8 (stage 0's first is dense), 4-7 hold 7 (7 also the head and loss)
    assert staged.stage in (0, 1, 2, 3, 7)


# ---- the eager formulas against what autograd really saves (CPU, bf16 autocast) -------------------------------


class _SavesLikeCudnn(torch.autograd.Function):
    """Attention that saves what cuDNN's SDPA saves: q, k, v, out and an fp32 log-sum-exp per (batch, head, query)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ctx.save_for_backward(q, k, v, out, torch.zeros(q.shape[:3], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - only the forward's saved tensors are measured
        raise NotImplementedError


def _attn(q, k, v, scale, mask=None):
    return _SavesLikeCudnn.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _saved_bytes_per_layer(model: DeepSeekV3Model, tokens: torch.Tensor) -> list[int]:
    current = [None]
    seen: list[dict[int, int]] = [{} for _ in model.layers]

    def pack(t):
        if current[0] is not None and not (t.is_leaf and t.requires_grad):
            seen[current[0]][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    handles = []
    for i, layer in enumerate(model.layers.values()):
        handles.append(layer.register_forward_pre_hook(lambda m, inp, i=i: current.__setitem__(0, i)))
        handles.append(layer.register_forward_hook(lambda m, inp, out: current.__setitem__(0, None)))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        model(tokens)
    for h in handles:
        h.remove()
    return [sum(s.values()) for s in seen]


@pytest.mark.parametrize("q_lora_rank", [0, 48])
def test_eager_block_formula_matches_saved_tensors(q_lora_rank):
    a = ModelArgs(
        vocab_size=256,
        dim=64,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=2,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=64,
        original_seq_len=64,
        mtp_depth=0,
    )
    torch.manual_seed(0)
    model = DeepSeekV3Model(a)
    model.init_weights()
    for layer in model.layers.values():
        layer.attention.attn_fn = _attn
    seq = 32
    small = _saved_bytes_per_layer(model, torch.randint(0, 256, (2, seq)))
    large = _saved_bytes_per_layer(model, torch.randint(0, 256, (6, seq)))
    per_token = [(b - s) / (4 * seq) for s, b in zip(small, large)]  # weight casts cancel out
    for i, got in enumerate(per_token):
        want = block_bytes(a, moe=i >= a.n_dense_layers, compiled=False)
        assert got == pytest.approx(want, rel=0.03), f"layer {i}"


# ---- measurements (benchmarks/bench_memory.py, torch 2.11, 2026-11-22) ---------------------------------------
# torch.cuda.max_memory_allocated over steps 2-4 (2-3 with two ranks), GiB, the largest over ranks. One rank: one
# H100 80GB HBM3; two ranks: two H200s. The constants of tools/memory.py were set from the one-rank runs.
_FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]
MEASURED = [
    ("debug_model", 1, [], 0.40),
    ("bench6", 1, [], 52.43),  # compiled, bf16 moments, no AC
    (
        "bench6",
        1,
        [
            "--compile.enable",
            "false",
            "--activation_checkpoint.mode",
            "full",
            "--optimizer.state_dtype",
            "float32",
        ],
        61.23,
    ),
    (
        "bench6",
        1,
        ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_option", "op"],
        44.74,
    ),
    (
        "bench6",
        1,
        [
            "--compile.enable",
            "false",
            "--activation_checkpoint.mode",
            "selective",
            "--activation_checkpoint.selective_option",
            "2",
        ],
        62.65,
    ),
    (
        "bench6",
        1,
        [
            "--compile.enable",
            "false",
            "--activation_checkpoint.mode",
            "selective",
            "--activation_checkpoint.selective_option",
            "op",
        ],
        54.19,
    ),
    ("bench6", 1, ["--training.mixed_precision", "bf16_weights"], 53.45),
    ("bench6", 2, _FSDP2, 36.19),  # FSDP 2, compiled, no AC
    (
        "bench6",
        2,
        [
            *_FSDP2,
            "--parallelism.expert_parallel_degree",
            "2",
            "--compile.enable",
            "false",
            "--activation_checkpoint.mode",
            "full",
        ],
        36.70,
    ),
]


@pytest.mark.parametrize("name, world, overrides, measured", MEASURED)
def test_estimate_within_15_percent_of_gpu_measurements(name, world, overrides, measured):
    cfg = parse_args(["--job.config_file", str(TRAIN_CONFIGS / f"{name}.toml"), *overrides], world_size=world)
    assert estimate_from_config(cfg, world).allocated / GiB == pytest.approx(measured, rel=0.15)


def test_experts_without_a_unit_keep_their_bf16_casts():
    """parallelism.expert_1rank_fsdp_unit = false, EP over every data rank: each MoE block that is not checkpointed
    keeps its local experts' bf16 weights until its backward. Measured on the 16B shape cut to 14 layers (FSDP 2 +
    EP 2, compiled, no AC, 2 x H200): 78.1 GiB with the unit, 84.3 without (benchmarks/RESULTS.md)."""
    a = ModelArgs(**{**V2_LITE_6, "n_layers": 14})
    local_experts = 13 * 3 * a.dim * a.moe_inter_dim * a.n_routed_experts / 2  # 13 MoE blocks, EP 2

    def extra(lay, **kw):
        unit = estimate(a, lay, 4, 4096, compiled=True, state_dtype="bfloat16", **kw)
        none = estimate(a, lay, 4, 4096, compiled=True, state_dtype="bfloat16", experts_unit=False, **kw)
        return none.allocated - unit.allocated

    assert extra(Layout(dp_shard=2, ep=2)) == pytest.approx(2 * local_experts, rel=1e-6)  # 6.7 GiB
    # every 2nd block checkpointed (blocks 0, 2, ...): the 7 MoE blocks in between keep theirs
    ac2 = extra(Layout(dp_shard=2, ep=2), ac_mode="selective", ac_option="2")
    assert ac2 == pytest.approx(2 * local_experts * 7 / 13, rel=1e-6)
    # EP 2 of 4 data ranks: the experts' mesh has 2 ranks, so they keep their unit
    assert extra(Layout(dp_shard=4, ep=2)) == 0


def test_padded_route_counts_worst_case_copies():
    """parallelism.expert_route = padded: the grouped GEMM's input and kept activations are sized for ep x k copies
    a token; at EP 2 each non-checkpointed MoE block keeps at least another 4 I k bytes a token of expert hiddens
    (compiled). With one EP rank nothing changes."""
    a = ModelArgs(**{**V2_LITE_6, "n_layers": 14})
    lay = Layout(dp_shard=2, ep=2)

    def act(**kw):
        return estimate(a, lay, 4, 4096, compiled=True, state_dtype="bfloat16", **kw).activations

    hiddens = 13 * 4 * 4096 * 4 * a.moe_inter_dim * a.n_activated_experts  # 13 MoE blocks, 4 x 4096 tokens
    assert act(padded_route=True) - act() >= hiddens
    one = Layout(dp_shard=2)
    assert estimate(a, one, 4, 4096, padded_route=True).allocated == estimate(a, one, 4, 4096).allocated


def test_layout_mirrors_parallel_dims():
    cfg = parse_args(["--job.config_file", str(TRAIN_CONFIGS / "deepseek_16b.toml")], world_size=4)
    dims = ParallelDims.from_config(cfg.parallelism, 4)
    lay = Layout.from_dims(dims)
    assert (lay.world_size, lay.efsdp, lay.uses_fsdp) == (dims.world_size, dims.efsdp, dims.uses_fsdp)
    assert dataclasses.asdict(lay)["ep"] == 4


def test_dry_run_shards_match_layout_arithmetic(capsys):
    """The fake-process-group build of parallel/parallelize.py holds the even split memory.py assumes."""
    path = TRAIN_CONFIGS / "deepseek_16b.toml"
    cfg = parse_args(["--job.config_file", str(path)], world_size=4)
    args, dims = resolve_model_args(cfg), ParallelDims.from_config(cfg.parallelism, 4)
    got = dry_run.local_parameter_counts(cfg, args, dims, rank=3)
    want = dry_run.expected_counts(args, dims)
    assert (
        got["experts"] == want["experts"] and got["other"] == want["other"]
    )  # 64 experts and dims split evenly
    assert got["total"] == estimate_from_config(cfg, 4).params_local
    assert dry_run.main(["--job.config_file", str(path), "--world-size", "4"]) == 0
    assert "3,926,621,056" in capsys.readouterr().out
