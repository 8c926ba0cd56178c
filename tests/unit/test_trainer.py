"""Trainer: loss normalisation under gradient accumulation, the NaN policy, metrics output."""

import json
import math

import pytest
import torch

from titan_dsv3.config import parse_args
from titan_dsv3.optim import losses
from titan_dsv3.train import NonFiniteLossError, Trainer, main


def make_trainer(args) -> Trainer:
    return Trainer(parse_args(args))


def grads_after_one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.forward_backward(trainer.loader.next_step())
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_grad_accumulation_equals_one_big_batch(tiny):
    big = make_trainer(tiny(**{"training.local_batch_size": "4", "training.global_batch_size": "4"}))
    acc = make_trainer(tiny(**{"training.local_batch_size": "1", "training.global_batch_size": "4"}))
    assert acc.loader.accum == 4 and big.loader.accum == 1
    acc.model.load_state_dict(big.model.state_dict())
    g_big, g_acc = grads_after_one_step(big), grads_after_one_step(acc)
    assert g_big.keys() == g_acc.keys() and len(g_big) > 10
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)


def test_losses_are_means_over_valid_tokens(tiny):
    t = make_trainer(tiny())
    batches = t.loader.next_step()
    sums, n_valid = t.forward_backward(batches)
    b = batches[0]
    with torch.no_grad():
        logits, (mtp_logits,) = t.model(b.inputs)
    main = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.labels.flatten())
    mtp = torch.nn.functional.cross_entropy(mtp_logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten())
    torch.testing.assert_close((sums / n_valid).float(), torch.stack([main, mtp]), rtol=1e-5, atol=1e-6)


def _poison_step(trainer: Trainer, bad_step: int):
    real = trainer.loss_sums

    def loss_sums(out, labels):
        s = real(out, labels)
        return s * float("nan") if trainer.state.step + 1 == bad_step else s

    trainer.loss_sums = loss_sums


def test_nan_policy_skip_keeps_weights_and_goes_on(tiny, capsys):
    t = make_trainer(tiny(**{"training.steps": "3", "training.nan_policy": "skip"}))
    _poison_step(t, 2)
    t.train_step()
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    bias_before = [m.gate.expert_bias.clone() for m in t.moes]
    out = t.train_step()
    assert out["skipped"] == 1.0
    for n, p in t.model.named_parameters():
        assert torch.equal(p, before[n]), n
    for m, b in zip(t.moes, bias_before):
        assert torch.equal(m.gate.expert_bias, b)
    assert "non-finite" in capsys.readouterr().err
    out = t.train_step()
    assert out["skipped"] == 0.0 and t.state.step == 3
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())


def test_nan_policy_skip_gives_up_after_max_skips(tiny):
    t = make_trainer(tiny(**{"training.max_nan_skips": "1"}))
    _poison_step(t, 1)
    t.train_step()
    _poison_step(t, 2)
    with pytest.raises(NonFiniteLossError, match="max_nan_skips"):
        t.train_step()


def test_nan_policy_stop(tiny):
    t = make_trainer(tiny(**{"training.nan_policy": "stop"}))
    _poison_step(t, 1)
    with pytest.raises(NonFiniteLossError, match="nan_policy = stop"):
        t.train_step()


def test_main_exit_status_on_nan(tiny, monkeypatch):
    real = losses.loss_sums
    monkeypatch.setattr(losses, "loss_sums", lambda out, labels: real(out, labels) * float("inf"))
    assert main(tiny(**{"training.nan_policy": "stop"})) == 3


def test_train_loop_logs_every_step_and_loss_falls(tiny, tmp_path):
    run = {
        "training.steps": "12",
        "metrics.log_freq": "1",
        "metrics.enable_tensorboard": "true",
        "optimizer.lr": "2e-2",
        "training.local_batch_size": "4",
    }
    assert main(tiny(**run)) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in (
        "loss",
        "mtp_loss",
        "lr",
        "grad_norm",
        "tokens_seen",
        "tokens_per_second",
        "moe/0/utilisation",
    ):
        assert key in rows[-1]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_tokens_per_param_sets_steps(tiny):
    t = make_trainer(tiny(**{"training.steps": "-1", "training.tokens_per_param": "0.001"}))
    active = t.model_args.num_params(active=True, include_mtp=False)
    tokens_per_step = 2 * 32
    assert (t.total_steps - 1) * tokens_per_step < 0.001 * active <= t.total_steps * tokens_per_step


def test_clipping_folded_into_fused_adamw_equals_plain_clipping(tiny):
    """The fused kernel's grad_scale path must clip exactly like clip_grads_with_norm_ before the same kernel."""
    runs = {}
    for fold in (True, False):
        t = make_trainer(tiny(**{"optimizer.implementation": "fused", "training.max_norm": "0.05"}))
        assert t._fold_clip_into_adamw
        t._fold_clip_into_adamw = fold
        outs = [t.train_step() for _ in range(3)]
        assert outs[0]["grad_norm"] > 0.05  # clipping is active
        runs[fold] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    # Adam's m / sqrt(v) amplifies 1-ulp grad differences where grads are ~0 (unseen embedding rows): 1e-5 is
    # 0.1% of what 3 steps at lr 3e-3 can move a weight
    for n, p in runs[True].items():
        torch.testing.assert_close(p, runs[False][n], rtol=1e-5, atol=1e-5, msg=n)


def test_bf16_optimizer_states(tiny):
    t = make_trainer(tiny(**{"optimizer.state_dtype": "bfloat16"}))
    first = t.train_step()["loss"]
    for _ in range(5):
        last = t.train_step()["loss"]
    state = next(iter(t.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert last < first


def test_bf16_weights_mode(tiny):
    t = make_trainer(
        tiny(**{"training.mixed_precision": "bf16_weights", "optimizer.state_dtype": "bfloat16"})
    )
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    assert all(m.gate.expert_bias.dtype == torch.float32 for m in t.moes)
    losses_ = [t.train_step()["loss"] for _ in range(6)]
    state = t.optimizer.state[next(iter(t.model.parameters()))]
    assert state["master"].dtype == torch.float32
    assert losses_[-1] < losses_[0]


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"optimizer.state_dtype": "float32"}, "optimizer.state_dtype = bfloat16"),
        (
            {"optimizer.state_dtype": "bfloat16", "training.global_batch_size": "4"},
            "accumulate gradients in bf16",
        ),
    ],
)
def test_bf16_weights_refused_combinations(tiny, extra, needle):
    from titan_dsv3.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        parse_args(tiny(**{"training.mixed_precision": "bf16_weights", **extra}))


def test_validation_logs_held_out_loss(tiny, tmp_path):
    run = {
        "training.steps": "4",
        "validation.enable": "true",
        "validation.freq": "2",
        "validation.steps": "2",
        "data.embedded_max_bytes": "1500000",
    }  # enough documents for the 1-in-20 held-out split
    assert main(tiny(**run)) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(abs(r["val_ppl"] - math.exp(r["val_loss"])) < 1e-6 * r["val_ppl"] for r in val)
    assert val[-1]["val_loss"] < math.log(2048) + 0.5


def test_profiler_writes_traces(tiny, tmp_path):
    run = {"training.steps": "2", "profiling.enable_profiling": "true", "profiling.profile_freq": "2"}
    assert main(tiny(**run)) == 0
    traces = list((tmp_path / "run" / "profile_traces").glob("iteration_*/rank0_trace.json"))
    assert [t.parent.name for t in traces] == ["iteration_2"]
    assert json.loads(traces[0].read_text())["traceEvents"]


def test_description_and_print_config(tiny, capsys):
    make_trainer(tiny(**{"job.description": "tiny run for a test", "job.print_config": "true"}))
    out = capsys.readouterr().out
    assert "tiny run for a test" in out
    printed = json.loads(out[out.index("{") :])
    assert printed["model"]["dim"] == 32 and printed["training"]["seq_len"] == 32


def test_bias_update_speed_is_read_every_step(tiny):
    """benchmarks/bench_train.py --warmup-bias-speed changes cfg.moe.bias_update_speed between steps: the trainer
    must read it at every step, not once at start."""
    trainer = make_trainer(tiny(**{"moe.bias_update_speed": "0.5"}))
    bias = trainer.moes[0].gate.expert_bias
    trainer.train_step()
    moved = bias.clone()
    assert moved.abs().max().item() == 0.5  # sign updates of 0.5
    trainer.cfg.moe.bias_update_speed = 0.0
    trainer.train_step()
    assert torch.equal(bias, moved)
