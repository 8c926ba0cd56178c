"""Model: MoE edge cases against a per-token reference, expert GEMM paths, MTP loss, meta init, parameter counts.

Suffixes: T tokens, D dim, E experts, K top-k, I expert hidden size, N routed token copies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import titan_dsv3.models as models_pkg
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models import moe as moe_mod
from titan_dsv3.models.moe import MoE, grouped_swiglu, looped_swiglu
from titan_dsv3.optim import losses


def small_args(**kw) -> ModelArgs:
    base = dict(
        vocab_size=97,
        dim=32,
        inter_dim=48,
        moe_inter_dim=24,
        n_layers=2,
        n_dense_layers=1,
        n_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_seq_len=32,
        original_seq_len=32,
        mtp_depth=0,
        init_std=0.1,
    )
    base.update(kw)
    return ModelArgs(**base)


# ---- a per-token MoE reference ------------------------------------------------------------------------------


def swiglu(x_D, w1_ID, w2_DI, w3_ID):
    return w2_DI @ (F.silu(w1_ID @ x_D) * (w3_ID @ x_D))


def reference_route(moe: MoE, x_D: torch.Tensor) -> list[tuple[int, float]]:
    """(expert, gate weight) pairs of one token, written from the DeepSeek-V3 paper's equations."""
    g = moe.gate
    logits_E = g.weight @ x_D
    s_E = logits_E.softmax(-1) if g.score_func == "softmax" else logits_E.sigmoid()
    choice = [float(v) for v in s_E + g.expert_bias]
    per_group = g.n_experts // g.n_groups
    allowed = set(range(g.n_experts))
    if g.n_groups > 1:

        def group_score(grp):
            vals = sorted(choice[grp * per_group : (grp + 1) * per_group], reverse=True)
            return vals[0] if g.group_score == "max" else vals[0] + vals[1]

        groups = sorted(range(g.n_groups), key=group_score, reverse=True)[: g.n_limited_groups]
        allowed = {e for e in allowed if e // per_group in groups}
    chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[: g.topk]
    w = [float(s_E[e]) for e in chosen]
    if g.route_norm:
        w = [v / sum(w) for v in w]
    return [(e, v * g.route_scale) for e, v in zip(chosen, w)]


@torch.no_grad()
def reference_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    out = []
    for x_D in x_TD:
        y = sum(w * swiglu(x_D, ex.w1[e], ex.w2[e], ex.w3[e]) for e, w in reference_route(moe, x_D))
        if moe.shared_experts is not None:
            se = moe.shared_experts
            y = y + swiglu(x_D, se.w1.weight, se.w2.weight, se.w3.weight)
        out.append(y)
    return torch.stack(out)


def build_moe(args: ModelArgs, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(args)
    moe.init_weights(args.init_std)
    return moe


@pytest.fixture(params=["grouped", "looped"])
def expert_path(request, monkeypatch):
    if request.param == "looped":
        monkeypatch.setattr(moe_mod, "_use_grouped_mm", lambda x: False)
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    return request.param


def run_moe(moe: MoE, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and tokens per expert (counted only in train mode; no dropping or balance loss is configured)."""
    moe.train()
    moe.tokens_per_expert.zero_()
    with torch.no_grad():
        out = moe(x_BSD)
    return out, moe.tokens_per_expert.clone()


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # sigmoid, group-limited top-2-sum groups, normalised
        dict(score_func="softmax", group_score="max", route_norm=False, route_scale=16.0),
        dict(n_expert_groups=1, n_limited_groups=1, n_shared_experts=0),
    ],
    ids=["v3_groups", "v2_max_groups", "plain_no_shared"],
)
def test_moe_matches_per_token_reference(expert_path, kw):
    args = small_args(**kw)
    moe = build_moe(args)
    moe.gate.expert_bias.copy_(0.05 * torch.randn(args.n_routed_experts))
    x = torch.randn(3, 5, args.dim)
    out, counts = run_moe(moe, x)
    ref = reference_moe(moe, x.view(-1, args.dim))
    torch.testing.assert_close(out.view(-1, args.dim), ref, rtol=1e-5, atol=1e-6)
    assert counts.sum() == 15 * args.n_activated_experts


def test_all_tokens_to_one_expert(expert_path):
    args = small_args(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
    moe = build_moe(args)
    moe.gate.expert_bias[5] = 10.0  # sigmoid scores lie in (0, 1): expert 5 wins the choice for every token
    x = torch.randn(2, 7, args.dim)
    out, counts = run_moe(moe, x)
    assert counts.tolist() == [0, 0, 0, 0, 0, 14, 0, 0]  # the other seven experts get nothing
    torch.testing.assert_close(
        out.view(-1, args.dim), reference_moe(moe, x.view(-1, args.dim)), rtol=1e-5, atol=1e-6
    )


def test_single_token(expert_path):
    args = small_args()
    moe = build_moe(args)
    x = torch.randn(1, 1, args.dim)
    out, counts = run_moe(moe, x)
    assert out.shape == (1, 1, args.dim) and counts.sum() == args.n_activated_experts
    torch.testing.assert_close(out.view(1, -1), reference_moe(moe, x.view(1, -1)), rtol=1e-5, atol=1e-6)


def test_top_k_equals_number_of_experts(expert_path):
    args = small_args(n_routed_experts=4, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1)
    moe = build_moe(args)
    x = torch.randn(2, 3, args.dim)
    out, counts = run_moe(moe, x)
    assert counts.tolist() == [6, 6, 6, 6]
    torch.testing.assert_close(
        out.view(-1, args.dim), reference_moe(moe, x.view(-1, args.dim)), rtol=1e-5, atol=1e-6
    )


def test_moe_gradients_equal_on_both_paths(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    args = small_args(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
    grads = []
    for grouped in (True, False):
        monkeypatch.setattr(moe_mod, "_use_grouped_mm", lambda x, g=grouped: g)
        moe = build_moe(args)
        moe.gate.expert_bias[2] = 10.0  # every token on expert 2, the others empty
        x = torch.randn(2, 4, args.dim, generator=torch.Generator().manual_seed(3), requires_grad=True)
        moe.eval()
        moe(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in moe.experts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 9], [1]])
def test_grouped_equals_looped_equals_dense(counts):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    n_exp, dim, hidden = len(counts), 24, 40  # odd sizes on purpose
    counts_E = torch.tensor(counts)
    x_ND = torch.randn(int(counts_E.sum()), dim)
    w1, w3 = torch.randn(n_exp, hidden, dim) * 0.2, torch.randn(n_exp, hidden, dim) * 0.2
    w2 = torch.randn(n_exp, dim, hidden) * 0.2
    expert_of_row = torch.repeat_interleave(torch.arange(n_exp), counts_E)
    dense = torch.stack([swiglu(x, w1[e], w2[e], w3[e]) for x, e in zip(x_ND, expert_of_row.tolist())])
    grouped = grouped_swiglu(x_ND, counts_E, w1, w2, w3)
    looped = looped_swiglu(x_ND, counts_E, w1, w2, w3)
    torch.testing.assert_close(grouped, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(looped, dense, rtol=1e-5, atol=1e-5)


# ---- MTP --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_matches_hand_written_reference(depth):
    args = small_args(mtp_depth=depth)
    torch.manual_seed(0)
    model = DeepSeekV3Model(args)
    model.init_weights()
    model.eval()
    bsz, seqlen = 2, 12
    seq = torch.randint(0, args.vocab_size, (bsz, seqlen + 1))
    inputs, labels = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        out = model(inputs)
        sums = losses.loss_sums(out, labels)
        means = sums / losses.count_valid(labels, depth).to(sums.dtype)

        # Reference. Depth k at position i combines h^{k-1}_i with Emb(token_{i+k}) and predicts token_{i+k+1};
        # only positions i < seqlen - k have that input token, so each depth works on a shorter prefix (causal
        # attention makes the prefix exact).
        h = model.tok_embeddings(inputs)
        for layer in model.layers.values():
            h = layer(h, model.rope_cache[:seqlen])
        ref = []
        for k in range(1, depth + 1):
            mod = model.mtp[str(k - 1)]
            n = seqlen - k
            emb = model.tok_embeddings(inputs[:, k : k + n])  # Emb(token_{i+k}), i = 0..n-1
            h = mod.eh_proj(torch.cat([mod.enorm(emb), mod.hnorm(h[:, :n])], dim=-1))
            h = mod.block(h, model.rope_cache[:n])
            logits = model.output(mod.norm(h))  # shared head
            terms = []
            for b in range(bsz):
                for i in range(n):
                    target = seq[b, i + k + 1]
                    terms.append(-logits[b, i].log_softmax(-1)[target])
            ref.append(torch.stack(terms).mean())
    assert len(out[1]) == depth
    torch.testing.assert_close(means[1:], torch.stack(ref), rtol=1e-5, atol=1e-6)
    main_ref = F.cross_entropy(out[0].flatten(0, 1), labels.flatten())
    torch.testing.assert_close(means[0], main_ref)


# ---- structure ----------------------------------------------------------------------------------------------


def test_models_import_nothing_from_torch_distributed():
    folder = Path(models_pkg.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 6
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names), (
                file.name
            )


def test_meta_build_then_init_gives_finite_output():
    args = small_args(mtp_depth=1)
    with torch.device("meta"):
        model = DeepSeekV3Model(args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    assert torch.equal(model.rope_cache, DeepSeekV3Model(args).rope_cache)
    assert all((m.gate.expert_bias == 0).all() for m in model.moe_layers())
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    logits, mtp_logits = model(tokens)
    assert logits.shape == (2, 16, args.vocab_size) and torch.isfinite(logits).all()
    assert all(torch.isfinite(t).all() for t in mtp_logits)


@pytest.mark.parametrize(
    "kw",
    [
        dict(mtp_depth=1),
        dict(mtp_depth=0),
        dict(mtp_depth=2, q_lora_rank=0),
        dict(tie_embeddings=True, mtp_depth=1),
        dict(n_dense_layers=2, mtp_depth=1),  # no MoE layer: the MTP block is dense too
    ],
    ids=["mtp1", "no_mtp", "mtp2_q0", "tied", "all_dense"],
)
def test_num_params_is_exact(kw):
    args = small_args(**kw)
    with torch.device("meta"):
        model = DeepSeekV3Model(args)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert args.num_params() == total
    assert args.num_params(include_mtp=False) == sum(
        p.numel() for n, p in params.items() if not n.startswith("mtp.")
    )
    assert args.num_params(include_embedding=False) == total - args.vocab_size * args.dim


def test_active_params_with_all_experts_active():
    args = small_args(n_activated_experts=8, n_expert_groups=1, n_limited_groups=1, mtp_depth=1)
    assert args.num_params(active=True) == args.num_params()
    fewer = small_args(mtp_depth=1)
    per_expert = 3 * fewer.dim * fewer.moe_inter_dim
    moe_blocks = fewer.n_moe_layers + fewer.mtp_depth
    missing = moe_blocks * (fewer.n_routed_experts - fewer.n_activated_experts) * per_expert
    assert fewer.num_params() - fewer.num_params(active=True) == missing


@torch.no_grad()
def test_flex_document_mask_isolates_documents():
    """attn_impl = flex: one document equals causal SDPA; with two packed documents, the second one's outputs do not
    depend on the first one's tokens (forward only: FlexAttention has no CPU backward)."""
    from tiny import tiny_model_args

    from titan_dsv3.models import DeepSeekV3Model

    torch.manual_seed(0)
    sdpa = DeepSeekV3Model(tiny_model_args(mtp_depth=0, rope_factor=1.0, original_seq_len=64))
    sdpa.init_weights()
    flex = DeepSeekV3Model(
        tiny_model_args(mtp_depth=0, rope_factor=1.0, original_seq_len=64, attn_impl="flex")
    )
    flex.load_state_dict(sdpa.state_dict())
    flex.init_rope()
    tokens = torch.randint(1, 128, (2, 32))
    one_doc = torch.zeros(2, 32, dtype=torch.int32)
    torch.testing.assert_close(flex(tokens, doc_ids=one_doc), sdpa(tokens), rtol=1e-5, atol=1e-5)

    docs = torch.cat([torch.zeros(2, 12, dtype=torch.int32), torch.ones(2, 20, dtype=torch.int32)], dim=1)
    other = tokens.clone()
    other[:, :12] = torch.randint(1, 128, (2, 12))
    a, b = flex(tokens, doc_ids=docs), flex(other, doc_ids=docs)
    torch.testing.assert_close(a[:, 12:], b[:, 12:], rtol=1e-5, atol=1e-5)
    assert (a[:, :12] - b[:, :12]).abs().max() > 1e-3  # the first document did change
