"""Config precedence (defaults < TOML < command line) and every error path, each one line naming the key."""

import subprocess
import sys

import pytest

from titan_dsv3.config import ConfigError, parse_args, resolve_model_args
from titan_dsv3.config.job_config import JobConfig

DEBUG = "train_configs/debug_model.toml"


def test_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\npreset = "{DEBUG}"\nn_layers = 3\n[training]\nsteps = 7\nseq_len = 64\n')
    cfg = parse_args(["--job.config_file", str(toml), "--training.steps", "9", "--optimizer.lr=0.5"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.seq_len == 64  # TOML beats default
    assert cfg.training.local_batch_size == JobConfig().training.local_batch_size  # default
    assert cfg.optimizer.lr == 0.5
    args = resolve_model_args(cfg)
    assert args.n_layers == 3 and args.dim == 256  # explicit field over preset, rest from the preset


def test_bool_forms():
    base = ["--job.config_file", DEBUG]
    assert parse_args(base + ["--checkpoint.enable"]).checkpoint.enable is True
    assert parse_args(base + ["--checkpoint.enable", "false"]).checkpoint.enable is False
    assert parse_args(base + ["--checkpoint.enable=true"]).checkpoint.enable is True
    assert parse_args(base + ["--compile.components", "model"]).compile.components == ["model"]


ERRORS = [
    (["--training.stepz", "3"], "training.stepz"),
    (["--nosuch.key", "3"], "[nosuch]"),
    (["--training.steps", "abc"], "training.steps: expected an integer"),
    (["--checkpoint.enable", "maybe"], "checkpoint.enable: expected true or false"),
    (["--training.steps", "0"], "training.steps"),
    (["--training.seq_len", "-4"], "training.seq_len"),
    (["--training.mixed_precision", "fp16"], "training.mixed_precision"),
    (["--training.nan_policy", "ignore"], "training.nan_policy"),
    (["--training.seq_len", "4096"], "model.max_seq_len"),
    (["--optimizer.beta2", "1.5"], "optimizer.beta2"),
    (["--optimizer.name", "SGD"], "optimizer.name"),
    (["--lr_scheduler.decay_type", "step"], "lr_scheduler.decay_type"),
    (["--lr_scheduler.min_lr_ratio", "2"], "lr_scheduler.min_lr_ratio"),
    (["--activation_checkpoint.mode", "some"], "activation_checkpoint.mode"),
    (
        ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_option", "x"],
        "selective_option",
    ),
    (["--checkpoint.async_mode", "fast"], "checkpoint.async_mode"),
    (["--model.n_routed_experts", "7"], "n_expert_groups"),
    (["--model.score_func", "relu"], "model.score_func"),
    (["--model.preset", "no_such_preset"], "model.preset"),
    (["--data.path", "/no/such/folder"], "data.path"),
    (["--data.tokenizer", "/no/such/tok.json"], "data.tokenizer"),
    (["--parallelism.tensor_parallel_degree", "3"], "world size 1"),
    (["--parallelism.expert_parallel_degree", "2"], "expert_parallel_degree"),
    (["--training.global_batch_size", "12"], "training.global_batch_size"),
    (["--compile.components", "optimizer"], "compile.components"),
    (["--metrics.log_freq", "0"], "metrics.log_freq"),
    (["--model.attn_impl", "flex"], "attn_impl"),
    (["--compile.moe_one_graph", "true"], "compile.moe_one_graph"),
]


@pytest.mark.parametrize("argv,needle", ERRORS, ids=[e[1] for e in ERRORS])
def test_errors_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(["--job.config_file", DEBUG] + argv)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the check is for machines without CUDA")
def test_triton_attention_without_cuda_is_refused_before_the_build(monkeypatch):
    """Outside Triton's interpreter, attn_impl = triton on a CPU-only machine is a config error, not a failure
    inside the first step's forward."""
    import titan_dsv3.kernels.mla_attention as mla

    monkeypatch.setattr(mla, "_INTERPRET", False)
    with pytest.raises(ConfigError, match="model.attn_impl = 'triton' runs on CUDA"):
        parse_args(["--job.config_file", DEBUG, "--model.attn_impl", "triton"])
    monkeypatch.setattr(mla, "_INTERPRET", True)  # the CPU tests run the kernels in the interpreter
    parse_args(["--job.config_file", DEBUG, "--model.attn_impl", "triton"])


def test_parallel_layout_errors():
    base = ["--job.config_file", DEBUG]
    with pytest.raises(ConfigError, match="world size 4 != replicate"):
        parse_args(base + ["--parallelism.data_parallel_shard_degree", "3"], world_size=4)
    with pytest.raises(ConfigError, match="n_routed_experts = 8 is not divisible"):
        parse_args(
            base
            + ["--parallelism.expert_parallel_degree", "3", "--parallelism.data_parallel_shard_degree", "3"],
            world_size=3,
        )
    with pytest.raises(ConfigError, match="cannot fill"):
        parse_args(
            base + ["--parallelism.pipeline_parallel_degree", "4", "--model.n_layers", "2"], world_size=4
        )
    with pytest.raises(ConfigError, match="local_batch_size = 8 is not divisible"):
        parse_args(
            base
            + [
                "--parallelism.pipeline_parallel_degree",
                "2",
                "--parallelism.pipeline_parallel_microbatches",
                "3",
            ],
            world_size=2,
        )
    cfg = parse_args(base + ["--parallelism.expert_parallel_degree", "2"], world_size=4)
    assert cfg.parallelism.expert_parallel_degree == 2


def test_model_without_preset_must_be_complete():
    with pytest.raises(ConfigError, match="set model.preset or spell out every model field"):
        parse_args(["--model.dim", "64"])


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--job.config_file", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--job.config_file", str(tmp_path / "missing.toml")])
    table = tmp_path / "t.toml"
    table.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        parse_args(["--job.config_file", str(table)])


def test_cli_exit_status_2_without_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "titan_dsv3.train", "--job.config_file", DEBUG, "--training.stepz", "3"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("config error: --training.stepz")


def test_help_lists_every_field_with_its_doc():
    r = subprocess.run([sys.executable, "-m", "titan_dsv3.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "--training.global_batch_size (int, default -1): Sequences per optimizer step" in r.stdout
    assert "--model.kv_lora_rank" in r.stdout and "Compressed key/value latent" in r.stdout
