"""Cached generation (MLA latent cache with absorbed wkv_b) against recomputing the full forward; sampling;
the tools.generate command line."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_MODEL

from titan_dsv3.checkpoint.model_io import save_model_dcp
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models.hf import save_hf_pretrained
from titan_dsv3.models.kv_cache import MLACache, forward_cached, generate, sample, top_p_filter
from titan_dsv3.tools import generate as generate_cli

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VARIANTS = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": 0, "mtp_depth": 0},
    "yarn": {"rope_factor": 4.0, "original_seq_len": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def model_for(overrides: dict, seed: int = 0) -> DeepSeekV3Model:
    # a wider init than training's makes the next-token distribution peaked, so greedy choices are clear-cut
    args = ModelArgs(**{**TINY_MODEL, **overrides, "init_std": 0.15})
    torch.manual_seed(seed)
    model = DeepSeekV3Model(args)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_full_recompute(variant):
    model = model_for(VARIANTS[variant])
    prompt = [5, 900, 17, 33, 1024]
    cached, cached_logits = generate(model, prompt, 40, use_cache=True)
    full, full_logits = generate(model, prompt, 40, use_cache=False)
    assert cached == full and len(cached) == 40 and len(set(cached)) > 5
    for a, b in zip(cached_logits, full_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the logits spread widely, so agreement to 1e-5 is not agreement of near-constant vectors
    assert min((lg.max() - lg.median()).item() for lg in full_logits) > 1.0


def test_cache_holds_latent_and_rope_key_only():
    model = model_for({})
    a = model.args
    cache = MLACache(model, bsz=2, max_len=24, dtype=torch.float32)
    assert cache.numbers_per_token_per_layer() == a.kv_lora_rank + a.qk_rope_head_dim
    stored = sum(t.numel() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    assert stored == a.n_layers * 2 * 24 * (a.kv_lora_rank + a.qk_rope_head_dim)
    # prefill in one call equals feeding the same tokens one at a time
    tokens = torch.randint(1, a.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    whole = forward_cached(model, tokens, cache, 0)
    step_cache = MLACache(model, bsz=2, max_len=24, dtype=torch.float32)
    steps = torch.cat([forward_cached(model, tokens[:, i : i + 1], step_cache, i) for i in range(10)], dim=1)
    torch.testing.assert_close(steps, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_cache.latent[:, :, :10], cache.latent[:, :, :10])
    with torch.no_grad():
        ref, _ = model(tokens)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)


def test_top_p_and_temperature_sampling():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.8), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.81), torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 1e-6), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    logits = probs.log().expand(2000, -1)
    draws = sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3} and abs((draws == 1).float().mean().item() - 0.625) < 0.05
    assert torch.equal(sample(logits, 0.0, 0.7, None), torch.ones(2000, dtype=torch.long))
    hot = sample(logits, 100.0, 1.0, torch.Generator().manual_seed(0))  # flattened: all four appear
    assert set(hot.tolist()) == {0, 1, 2, 3}

    model = model_for({})
    a, _ = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=7)
    b, _ = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=7)
    c, _ = generate(model, [1, 2, 3], 20, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_generate_command_line(tmp_path, capsys):
    model = model_for({})
    save_model_dcp(model.state_dict(), tmp_path / "run" / "checkpoint" / "step-4", model.args)
    greedy, _ = generate(model, generate_cli.TextTokenizer().encode("def main("), 8)
    for ckpt in (tmp_path / "run" / "checkpoint", tmp_path / "run" / "checkpoint" / "step-4"):
        rc = generate_cli.main(["--checkpoint", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "8"])
        assert rc == 0
        assert capsys.readouterr().out == "def main(" + generate_cli.TextTokenizer().decode(greedy) + "\n"
    save_hf_pretrained(model.state_dict(), model.args, tmp_path / "hf")
    argv = [
        "--checkpoint",
        str(tmp_path / "hf"),
        "--prompt",
        "x = ",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    ]
    assert generate_cli.main(argv) == 0 and capsys.readouterr().out.startswith("x = ")
    assert generate_cli.main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 1
    assert "neither a DCP checkpoint" in capsys.readouterr().err
