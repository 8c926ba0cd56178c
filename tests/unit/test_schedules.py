"""LR schedules and the aux-loss-free expert-bias update."""

import math
from types import SimpleNamespace

import pytest
import torch

from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.optim.balance import update_expert_bias
from titan_dsv3.optim.lr_scheduler import build_lr_scheduler, lr_factor


def sched(**kw):
    base = dict(
        warmup_steps=10, warmup_start_ratio=0.0, decay_type="cosine", decay_ratio=0.2, min_lr_ratio=0.1
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_warmup_is_linear_to_peak():
    c = sched()
    assert [lr_factor(s, 100, c) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    c = sched(warmup_start_ratio=0.5)
    assert lr_factor(0, 100, c) == pytest.approx(0.55)


def test_cosine():
    c = sched()
    assert lr_factor(10, 110, c) == pytest.approx(1.0)
    assert lr_factor(60, 110, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: mean of peak and floor
    assert lr_factor(110, 110, c) == pytest.approx(0.1)
    assert lr_factor(500, 110, c) == pytest.approx(0.1)


def test_linear():
    c = sched(decay_type="linear", min_lr_ratio=0.0)
    assert lr_factor(35, 110, c) == pytest.approx(0.75)


def test_wsd_holds_then_decays():
    c = sched(decay_type="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, 100, c) == 1.0 and lr_factor(79, 100, c) == 1.0
    assert lr_factor(90, 100, c) == pytest.approx(0.5)
    assert lr_factor(100, 100, c) == pytest.approx(0.0)


def test_scheduler_drives_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = build_lr_scheduler(opt, sched(warmup_steps=4), 20)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[5] < 1.0


def tiny_moe_model():
    args = ModelArgs(
        vocab_size=64,
        dim=16,
        inter_dim=32,
        moe_inter_dim=8,
        n_layers=2,
        n_dense_layers=0,
        n_heads=2,
        n_routed_experts=4,
        n_activated_experts=1,
        n_expert_groups=1,
        n_limited_groups=1,
        q_lora_rank=0,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=4,
        max_seq_len=16,
    )
    m = DeepSeekV3Model(args)
    m.init_weights()
    return m


def test_bias_update_rule():
    m = tiny_moe_model()
    moes = m.moe_layers()
    moes[0].tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    moes[1].tokens_per_expert.copy_(torch.tensor([5.0, 5.0, 5.0, 5.0]))
    counts = update_expert_bias(moes, gamma=0.01)
    assert counts.tolist() == [[10, 2, 4, 4], [5, 5, 5, 5]]
    # overloaded expert down by gamma, underloaded up by gamma, balanced unchanged
    assert moes[0].gate.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert moes[1].gate.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert all(float(x.tokens_per_expert.sum()) == 0 for x in moes)


def test_bias_steers_routing_to_balance():
    """Repeated updates on a skewed router make the load more even (selection uses score + bias)."""
    torch.manual_seed(0)
    m = tiny_moe_model()
    moe = m.moe_layers()[0]
    x = torch.randn(4, 16, 16) + 0.5
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[0] += 0.3  # aligned with the inputs' mean: expert 0 attracts most tokens
    m.train()

    def load_ratio(steps: int, gamma: float) -> float:
        total = torch.zeros(4)
        for _ in range(steps):
            moe(x)
            total += update_expert_bias([moe], gamma=gamma)[0]
        return (total.max() / total.mean()).item()

    before = load_ratio(1, 0.0)
    load_ratio(60, 0.01)  # the bias moves towards balance
    after = load_ratio(40, 0.01)  # then oscillates around it by +-gamma: judge the average load
    assert before > 2.0 and after < 1.2, (before, after)
    assert math.isfinite(after)
