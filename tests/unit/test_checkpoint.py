"""CheckpointManager in one process: what a resume restores, atomic naming, retention, errors, model-only export,
initial weights (seed checkpoint and HF folder)."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from tiny import TINY_MODEL

from titan_dsv3.checkpoint.manager import CheckpointError, CheckpointManager, complete_steps
from titan_dsv3.checkpoint.model_io import load_model_tensors, read_metadata, save_model_dcp
from titan_dsv3.config import parse_args
from titan_dsv3.config.job_config import Checkpoint, LRScheduler, Optimizer
from titan_dsv3.data.loader import PackedLoader, TokenStream
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models.hf import save_hf_pretrained
from titan_dsv3.optim.lr_scheduler import build_lr_scheduler
from titan_dsv3.optim.optimizer import build_optimizer
from titan_dsv3.tools import seed_checkpoint
from titan_dsv3.train import Trainer, TrainState, main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def harness(folder, seed: int = 0, model: dict | None = None, bf16_weights: bool = False, **ck):
    """A tiny model, AdamW, LR schedule, loader and counters under a CheckpointManager (rank 0, no dist).

    bf16_weights: bf16 parameters with fp32 masters and bf16 moments in the optimizer state.
    """
    args = ModelArgs(**{**TINY_MODEL, **(model or {})})
    torch.manual_seed(seed)
    m = DeepSeekV3Model(args)
    m.init_weights()
    if bf16_weights:
        for p in m.parameters():
            p.data = p.data.bfloat16()
    opt = build_optimizer(
        [m], Optimizer(lr=3e-3, state_dtype="bfloat16" if bf16_weights else "float32"), "cpu"
    )
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2), 100)
    tokens = np.random.default_rng(0).integers(1, 2048, 20_000).astype(np.uint32)
    loader = PackedLoader(TokenStream([tokens], 0, 2048, "random"), 16, 2, 2)
    state = TrainState()
    cfg = Checkpoint(**{"enable": True, "interval": 2, **ck})
    mgr = CheckpointManager(
        cfg, folder, model_parts=[m], optimizer=opt, lr_scheduler=sched, dataloader=loader,
        train_state=state, rank=0,
    )  # fmt: skip
    return SimpleNamespace(model=m, opt=opt, sched=sched, loader=loader, state=state, mgr=mgr, args=args)


def train(h, steps: int, total: int = 100) -> list[float]:
    losses = []
    for _ in range(steps):
        (b,) = h.loader.next_step()
        logits, (mtp,) = h.model(b.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten())
        loss = loss + 0.3 * F.cross_entropy(mtp[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten())
        loss.backward()
        h.opt.step()
        h.opt.zero_grad(set_to_none=True)
        h.sched.step()
        with torch.no_grad():  # stands in for the expert-bias update: a buffer that moves every step
            for moe in h.model.moe_layers():
                moe.gate.expert_bias.add_(torch.randn(moe.gate.expert_bias.shape) * 1e-3)
        h.state.step += 1
        h.state.tokens_seen += 32
        losses.append(loss.item())
        h.mgr.maybe_save(h.state.step, last=h.state.step == total)
    h.mgr.wait()
    return losses


def model_sd(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


@pytest.mark.parametrize(
    "async_mode,bf16_weights",
    [("disabled", False), ("async", False), ("disabled", True)],
    ids=["sync", "async", "bf16"],
)
def test_resume_restores_everything_and_continues_identically(tmp_path, async_mode, bf16_weights):
    a = harness(tmp_path, async_mode=async_mode, interval=3, bf16_weights=bf16_weights)
    train(a, 3)
    saved_model, saved_rng = model_sd(a), torch.get_rng_state()
    saved_lr, saved_last_lr = a.opt.param_groups[0]["lr"], a.sched.get_last_lr()
    saved_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in a.opt.state.items()}
    cont_a = train(a, 2)

    b = harness(tmp_path, seed=1, async_mode=async_mode, interval=3, bf16_weights=bf16_weights)
    assert b.mgr.load()
    for k, v in saved_model.items():
        assert torch.equal(b.model.state_dict()[k], v), k
    for pa, pb in zip(saved_opt, b.opt.state):
        assert saved_opt[pa].keys() == b.opt.state[pb].keys()
        for n, t in saved_opt[pa].items():  # exp_avg, exp_avg_sq, step (and master): values and dtypes
            assert t.dtype == b.opt.state[pb][n].dtype and torch.equal(t, b.opt.state[pb][n]), n
    if bf16_weights:
        assert {t.dtype for st in b.opt.state.values() for n, t in st.items() if n == "master"} == {
            torch.float32
        }
    assert b.sched.last_epoch == 3 and b.sched.get_last_lr() == saved_last_lr
    assert b.opt.param_groups[0]["lr"] == saved_lr
    assert b.loader.consumed == 6 and (b.state.step, b.state.tokens_seen) == (3, 96)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert train(b, 2) == cont_a


def split_in_two(model: DeepSeekV3Model) -> list[DeepSeekV3Model]:
    """Two pipeline-like parts of one model on one rank; the last keeps a copy of the embedding (same name)."""
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm, first.output, first.mtp = None, None, None
    del last.layers["0"]
    return [first, last]


def test_one_optimizer_over_two_parts_with_a_tied_copy(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = DeepSeekV3Model(ModelArgs(**TINY_MODEL))
        model.init_weights()
        parts = split_in_two(model)
        opt = build_optimizer(parts, Optimizer(lr=3e-3), "cpu")
        sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2), 100)
        for _ in range(2):
            for part in parts:
                for p in part.parameters():
                    p.grad = torch.randn_like(p)
            opt.step()
            sched.step()
        cfg = Checkpoint(enable=True, interval=1)
        mgr = CheckpointManager(
            cfg, tmp_path, model_parts=parts, optimizer=opt, lr_scheduler=sched, dataloader=harness(tmp_path).loader,
            train_state=TrainState(), rank=0,
        )  # fmt: skip
        return parts, opt, mgr

    parts, opt, mgr = build(0)
    mgr.maybe_save(1)
    md = read_metadata(tmp_path / "checkpoint" / "step-1").state_dict_metadata
    assert (
        "optimizer.state.tok_embeddings.weight.exp_avg" in md
        and "optimizer.state.layers.1.ffn_norm.weight.step" in md
    )
    parts2, opt2, mgr2 = build(1)
    assert mgr2.load()
    for part, part2 in zip(parts, parts2):
        for (n, p), p2 in zip(part.named_parameters(), part2.parameters()):
            src = parts[0].tok_embeddings.weight if n == "tok_embeddings.weight" else p  # the copy saved
            assert torch.equal(p2, src), n
            for k, t in opt.state[src].items():
                assert torch.equal(opt2.state[p2][k], t), (n, k)


def test_newest_complete_wins_partials_are_ignored_and_removed(tmp_path, capsys):
    h = harness(tmp_path)
    train(h, 4)
    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [2, 4]
    (folder / "step-6.partial").mkdir()
    (folder / "step-6.partial" / "__0_0.distcp").write_bytes(b"\0" * 10)  # a save killed half-way
    shutil.copytree(folder / "step-4", folder / "step-8")
    (folder / "step-8" / ".metadata").unlink()  # no .metadata: never counted as complete
    b = harness(tmp_path, seed=1)
    assert b.mgr.load() and b.state.step == 4
    assert "resumed from" in capsys.readouterr().out and not (folder / "step-6.partial").exists()
    c = harness(tmp_path, seed=1, load_step=2)
    assert c.mgr.load() and c.state.step == 2
    with pytest.raises(
        CheckpointError, match=r"load_step = 3: no complete checkpoint .*step-3; complete ones: \[2, 4\]"
    ):
        harness(tmp_path, load_step=3).mgr.load()


def test_keep_latest_k(tmp_path):
    h = harness(tmp_path, keep_latest_k=2)
    train(h, 8)
    assert complete_steps(tmp_path / "checkpoint") == [6, 8]


def _one_line_error(h, match: str) -> str:
    with pytest.raises(CheckpointError) as e:
        h.mgr.load()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_folder(h)) in msg and match in msg, msg
    return msg


def tmp_folder(h):
    return h.mgr.folder / f"step-{complete_steps(h.mgr.folder)[-1]}"


def test_corrupt_or_incompatible_checkpoint_is_one_clear_line(tmp_path):
    train(harness(tmp_path, interval=1), 1)
    step1 = tmp_path / "checkpoint" / "step-1"
    _one_line_error(harness(tmp_path, model={"dim": 48}), "has shape (2048, 32) there and (2048, 48) here")
    _one_line_error(harness(tmp_path, model={"mtp_depth": 0, "n_layers": 3}), "has no model.layers.2.")
    data = next(step1.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])  # truncated
    _one_line_error(harness(tmp_path), "could not be loaded")
    (step1 / ".metadata").write_bytes(b"garbage")
    _one_line_error(harness(tmp_path), "corrupt")
    shutil.rmtree(step1)
    save_model_dcp(harness(tmp_path / "x").model.state_dict(), step1)  # weights only, named like a checkpoint
    _one_line_error(harness(tmp_path), "model-only checkpoint?")


def test_trainer_main_prints_one_line_and_exits_nonzero(tiny, tmp_path, capsys):
    step = tmp_path / "run" / "checkpoint" / "step-2"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"not a checkpoint")
    rc = main(tiny(**{"checkpoint.enable": "true"}))
    err = capsys.readouterr().err.strip()
    assert rc == 3 and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"error: checkpoint {step} is corrupt")


def test_model_only_export_at_the_last_step(tmp_path):
    h = harness(tmp_path, model_only=True, export_dtype="bfloat16", interval=2)
    train(h, 3, total=3)
    folder = tmp_path / "checkpoint"
    assert complete_steps(folder) == [2] and (folder / "step-3-model" / ".metadata").is_file()
    md = read_metadata(folder / "step-3-model").state_dict_metadata
    assert {k.split(".")[0] for k in md} == {"model"} and len(md) == len(h.model.state_dict())
    for k, meta in md.items():
        want = torch.float32 if k.endswith("expert_bias") else torch.bfloat16
        assert meta.properties.dtype == want, k
    # the export starts another run (fp32 parameters): weights equal the bf16-rounded originals
    b = harness(tmp_path / "other", seed=3, initial_load_path=str(folder / "step-3-model"))
    assert not b.mgr.load()
    for k, v in h.model.state_dict().items():
        want = v if k.endswith("expert_bias") else v.bfloat16().float()
        assert torch.equal(b.model.state_dict()[k], want), k


def test_seed_checkpoint_matches_trainer_init_and_starts_a_run(tiny, tmp_path, capsys):
    out = tmp_path / "seed"
    assert seed_checkpoint.main(tiny(**{"job.seed": "7"}) + ["--output", str(out)]) == 0
    assert (out / ".metadata").is_file() and (out / "model_args.json").is_file()
    seeded = load_model_tensors(out)
    trainer = Trainer(parse_args(tiny(**{"job.seed": "7"})))  # a one-process run initialises the same weights
    assert seeded.keys() == trainer.model.state_dict().keys()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, seeded[k]), k
    h = harness(tmp_path / "run", seed=0, initial_load_path=str(out))
    assert not h.mgr.load() and "initial weights from" in capsys.readouterr().out
    for k, v in seeded.items():
        assert torch.equal(h.model.state_dict()[k], v), k
    # a checkpoint in the run folder wins over the initial weights
    train(h, 2)
    after = model_sd(h)
    r = harness(tmp_path / "run", seed=0, initial_load_path=str(out))
    assert r.mgr.load() and all(torch.equal(r.model.state_dict()[k], v) for k, v in after.items())


def test_initial_load_from_hf_folder(tmp_path):
    src = harness(tmp_path / "a", seed=5)
    save_hf_pretrained(src.model.state_dict(), src.args, tmp_path / "hf")
    h = harness(tmp_path / "b", seed=0, initial_load_path=str(tmp_path / "hf"))
    h.mgr.load()
    for k, v in src.model.state_dict().items():
        assert torch.equal(h.model.state_dict()[k], v), k
    bad = harness(tmp_path / "c", model={"mtp_depth": 2}, initial_load_path=str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"HF checkpoint .*hf has no weights for .* mtp\.1\."):
        bad.mgr.load()


def test_async_failure_is_reported(tmp_path, monkeypatch):
    h = harness(tmp_path, async_mode="async", interval=1)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", broken)
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*step-1.partial failed .*disk full"):
        train(h, 1)
    assert complete_steps(tmp_path / "checkpoint") == []
