"""Reading a run's configuration: dataclass defaults < TOML file < ``--section.key value`` on the command line.

Every problem stops the run before anything is built, as a ConfigError whose one-line message names the key and
the fix; ``main`` turns it into exit status 2 without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path

from titan_dsv3.config import job_config
from titan_dsv3.config.job_config import MODEL_PRESET_DOC, JobConfig
from titan_dsv3.config.sections import ConfigError, field_docs, set_dotted, split_cli
from titan_dsv3.config.sections import apply_toml as _apply_toml
from titan_dsv3.config.sections import load_toml as _load_toml
from titan_dsv3.models import args as model_args_module
from titan_dsv3.models.args import ModelArgs

TRAIN_CONFIGS = Path(__file__).resolve().parents[2] / "train_configs"


def _sections(cfg: JobConfig) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _hints(section: object) -> dict[str, object]:
    return typing.get_type_hints(type(section))


def load_toml(path: str | Path) -> dict:
    return _load_toml(path, "job.config_file")


def apply_toml(cfg: JobConfig, data: dict, source: str) -> None:
    _apply_toml(_sections(cfg), data, source)


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> JobConfig:
    """Resolve and validate a JobConfig from the command line (and the TOML it names)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text())
        raise SystemExit(0)
    cfg = JobConfig()
    pairs = split_cli(argv)
    for name, value in pairs:
        if name == "job.config_file":
            cfg.job.config_file = str(value)
    if cfg.job.config_file:
        apply_toml(cfg, load_toml(cfg.job.config_file), cfg.job.config_file)
    for name, value in pairs:
        set_dotted(_sections(cfg), name, value, f"--{name}")
    validate(cfg, world_size)
    return cfg


# ---- the model section -----------------------------------------------------------------------------------------


def find_preset(name: str) -> Path:
    p = Path(name)
    candidates = [p, TRAIN_CONFIGS / name, TRAIN_CONFIGS / f"{name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"model.preset: '{name}' is neither a file nor a preset in {TRAIN_CONFIGS}; see --help")


def resolve_model_args(cfg: JobConfig) -> ModelArgs:
    """ModelArgs from [model]: the preset's fields, overridden by fields set explicitly."""
    values: dict[str, object] = {}
    if cfg.model.preset:
        path = find_preset(cfg.model.preset)
        preset_model = load_toml(path).get("model", {})
        if preset_model.get("preset"):
            raise ConfigError(f"model.preset: {path} names another preset; a preset must spell out its sizes")
        base = JobConfig()
        apply_toml(base, {"model": preset_model}, str(path))
        values = {k: v for k, v in dataclasses.asdict(base.model).items() if v is not None and k != "preset"}
    explicit = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None and k != "preset"}
    values.update(explicit)
    missing = [f.name for f in dataclasses.fields(ModelArgs) if f.name not in values]
    if missing:
        raise ConfigError(
            f"model: fields {', '.join(missing)} are not set; set model.preset or spell out every model field"
        )
    args = ModelArgs(**values)
    try:
        args.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return args


# ---- validation ------------------------------------------------------------------------------------------------


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(options)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    """Check every section and their combinations; raise ConfigError on the first problem."""
    from titan_dsv3.parallel.dims import ParallelDims

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    margs = resolve_model_args(cfg)
    t = cfg.training
    _positive("training.seq_len", t.seq_len)
    _positive("training.local_batch_size", t.local_batch_size)
    if t.steps == 0 or t.steps < -1:
        raise ConfigError(f"training.steps = {t.steps}; give a positive count or -1 (from tokens_per_param)")
    if t.steps == -1:
        _positive("training.tokens_per_param", t.tokens_per_param)
    _choice("training.mixed_precision", t.mixed_precision, ("auto", "bf16", "fp32", "bf16_weights"))
    _choice("training.nan_policy", t.nan_policy, ("skip", "stop"))
    _positive("training.max_norm", t.max_norm, allow_zero=True)
    _positive("training.max_nan_skips", t.max_nan_skips)
    if t.seq_len > margs.max_seq_len:
        raise ConfigError(
            f"training.seq_len = {t.seq_len} exceeds model.max_seq_len = {margs.max_seq_len}; raise max_seq_len"
        )
    o = cfg.optimizer
    _choice("optimizer.name", o.name, ("AdamW",))
    _positive("optimizer.lr", o.lr)
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            raise ConfigError(f"optimizer.{k} = {getattr(o, k)} must lie in [0, 1)")
    _positive("optimizer.eps", o.eps)
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _choice("optimizer.implementation", o.implementation, ("auto", "fused", "foreach", "for_loop"))
    _choice("optimizer.state_dtype", o.state_dtype, ("float32", "bfloat16"))
    s = cfg.lr_scheduler
    _positive("lr_scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    _choice("lr_scheduler.decay_type", s.decay_type, ("cosine", "linear", "wsd"))
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError(f"lr_scheduler.min_lr_ratio = {s.min_lr_ratio} must lie in [0, 1]")
    if not 0 <= s.warmup_start_ratio <= 1:
        raise ConfigError(f"lr_scheduler.warmup_start_ratio = {s.warmup_start_ratio} must lie in [0, 1]")
    if not 0 < s.decay_ratio <= 1:
        raise ConfigError(f"lr_scheduler.decay_ratio = {s.decay_ratio} must lie in (0, 1]")
    _positive("moe.bias_update_speed", cfg.moe.bias_update_speed, allow_zero=True)
    _positive("moe.balance_loss_alpha", cfg.moe.balance_loss_alpha, allow_zero=True)
    _positive("mtp.loss_weight", cfg.mtp.loss_weight, allow_zero=True)
    c = cfg.checkpoint
    _positive("checkpoint.interval", c.interval)
    _positive("checkpoint.keep_latest_k", c.keep_latest_k, allow_zero=True)
    _choice("checkpoint.async_mode", c.async_mode, ("disabled", "async"))
    _choice("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16"))
    if c.initial_load_path and not Path(c.initial_load_path).exists():
        raise ConfigError(f"checkpoint.initial_load_path: {c.initial_load_path} does not exist")
    ac = cfg.activation_checkpoint
    _choice("activation_checkpoint.mode", ac.mode, ("none", "full", "selective"))
    if ac.mode == "selective" and ac.selective_option != "op":
        if not ac.selective_option.isdigit() or int(ac.selective_option) < 1:
            raise ConfigError(
                f"activation_checkpoint.selective_option = {ac.selective_option!r}; use 'op' or a positive integer"
            )
    for comp in cfg.compile.components:
        _choice("compile.components", comp, ("model", "loss"))
    if cfg.compile.moe_one_graph and not (cfg.compile.enable and "model" in cfg.compile.components):
        raise ConfigError(
            "compile.moe_one_graph shapes the compiled MoE blocks; set compile.enable = true (with 'model' in "
            "compile.components) or leave it off"
        )
    _choice("float8.recipe", cfg.float8.recipe, ("tensorwise", "rowwise"))
    _choice("float8.linear_backend", cfg.float8.linear_backend, ("torchao", "titan"))
    _positive("metrics.log_freq", cfg.metrics.log_freq)
    _positive("validation.freq", cfg.validation.freq)
    _positive("validation.steps", cfg.validation.steps)
    d = cfg.data
    if d.path and not (Path(d.path) / "manifest.json").is_file():
        raise ConfigError(
            f"data.path: {d.path} has no manifest.json; point it at a folder written by tools.prepare_data"
        )
    if d.tokenizer and not Path(d.tokenizer).is_file():
        raise ConfigError(
            f"data.tokenizer: {d.tokenizer} does not exist; give a tokenizer.json or leave it empty"
        )
    _positive("data.embedded_max_bytes", d.embedded_max_bytes)
    _check_backends(cfg, margs)
    try:
        dims = ParallelDims.from_config(cfg.parallelism, world_size)
        dims.check_model(margs, t.local_batch_size, t.seq_len, cfg.moe.balance_loss_alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    titan_linears = cfg.float8.enable and cfg.float8.linear_backend == "titan"
    if (cfg.float8.output_head or titan_linears) and dims.tp > 1:
        raise ConfigError(
            "float8.output_head and float8.linear_backend = 'titan' take whole weights; with "
            f"parallelism.tensor_parallel_degree = {dims.tp} they are sharded: use torchao's linears, no output_head"
        )
    if cfg.float8.fuse_moe_route and dims.ep > 1:
        raise ConfigError(
            f"float8.fuse_moe_route folds the one-device route into the FP8 experts; with "
            f"parallelism.expert_parallel_degree = {dims.ep} the expert-parallel route runs instead: set "
            "float8.fuse_moe_route = false"
        )
    if cfg.float8.fuse_head_loss and (dims.pp > 1 or dims.cp > 1):
        raise ConfigError(
            f"float8.fuse_head_loss needs the loss beside the head on one rank's whole sequence; with pipeline "
            f"({dims.pp}) or context ({dims.cp}) parallelism set float8.fuse_head_loss = false"
        )
    dp = dims.dp
    if t.mixed_precision == "bf16_weights":
        if cfg.optimizer.state_dtype != "bfloat16":
            raise ConfigError(
                "training.mixed_precision = bf16_weights keeps the fp32 masters in the bf16-state optimizer; "
                "set optimizer.state_dtype = bfloat16"
            )
        if world_size > 1:
            raise ConfigError(
                "training.mixed_precision = bf16_weights is for one device; with several use bf16 (FSDP keeps "
                "fp32 masters and reduces gradients in fp32)"
            )
        if t.global_batch_size not in (-1, t.local_batch_size * dp):
            raise ConfigError(
                "training.mixed_precision = bf16_weights would accumulate gradients in bf16 over micro-batches; "
                "use bf16 with gradient accumulation, or global_batch_size = local_batch_size x data-parallel degree"
            )
    if t.global_batch_size != -1 and (
        t.global_batch_size <= 0 or t.global_batch_size % (t.local_batch_size * dp)
    ):
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size} is not a positive multiple of local_batch_size x "
            f"data-parallel degree = {t.local_batch_size} x {dp}; change one of them"
        )


def _check_backends(cfg: JobConfig, margs: ModelArgs) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if margs.attn_impl == "flex" and not cuda:
        raise ConfigError(
            "model.attn_impl = 'flex' trains only on CUDA (FlexAttention has no CPU backward); use sdpa"
        )
    if margs.attn_impl == "triton":
        try:
            import titan_dsv3.kernels.mla_attention as mla
        except ImportError as e:
            raise ConfigError(
                f"model.attn_impl = 'triton' needs the fused MLA kernel, which failed to import: {e}"
            ) from None
        if not cuda and not mla._INTERPRET:  # else the first step would fail inside the forward
            raise ConfigError(
                "model.attn_impl = 'triton' runs on CUDA (on CPU only in Triton's interpreter, TRITON_INTERPRET=1, "
                "which is slow); use sdpa"
            )
    f8 = cfg.float8
    if f8.fsdp_float8_all_gather and f8.recipe != "tensorwise":
        raise ConfigError("float8.fsdp_float8_all_gather works with recipe = tensorwise only")
    if f8.enable and f8.linear_backend == "titan":
        if f8.recipe != "tensorwise" or f8.fsdp_float8_all_gather:
            raise ConfigError(
                "float8.linear_backend = 'titan' is tensorwise without a float8 all-gather: set float8.recipe = "
                "tensorwise and float8.fsdp_float8_all_gather = false, or linear_backend = 'torchao'"
            )
    if f8.fuse_moe_route and not f8.moe_experts:
        raise ConfigError(
            "float8.fuse_moe_route folds the route into the FP8 routed experts: set float8.moe_experts = true"
        )
    if f8.fuse_head_loss and not f8.output_head:
        raise ConfigError(
            "float8.fuse_head_loss fuses the FP8 output head with its loss: set float8.output_head = true"
        )
    if f8.output_head:
        if f8.enable and not any(name in "output" for name in f8.filter_fqns):
            raise ConfigError(
                "float8.output_head and float8.enable would both convert the output head: keep 'output' in "
                f"float8.filter_fqns (now {f8.filter_fqns})"
            )
        if margs.tie_embeddings:
            raise ConfigError("float8.output_head needs an untied head; set model.tie_embeddings = false")
        if margs.dim % 16 or margs.vocab_size % 16:
            raise ConfigError(
                f"float8.output_head needs model.dim ({margs.dim}) and model.vocab_size ({margs.vocab_size}) to be "
                "multiples of 16 (cuBLAS fp8 GEMMs)"
            )
    if f8.moe_experts:
        if not cuda:
            raise ConfigError("float8.moe_experts runs a CUDA kernel; turn it off on CPU")
        if margs.dim % 128 or margs.moe_inter_dim % 128:
            raise ConfigError(
                f"float8.moe_experts needs model.dim ({margs.dim}) and model.moe_inter_dim ({margs.moe_inter_dim}) "
                "to be multiples of 128 (the FP8 scaling blocks)"
            )


# ---- help ------------------------------------------------------------------------------------------------------


def help_text() -> str:
    cfg = JobConfig()
    lines = [
        "usage: ./run_train.sh [--job.config_file FILE] [--section.key value | --section.key=value | --bool.flag] ...",
        "Precedence: defaults < TOML file < command line.",
        "",
    ]
    model_docs = field_docs(model_args_module.ModelArgs)
    for name, section in _sections(cfg).items():
        lines.append(f"[{name}]")
        docs = model_docs if name == "model" else field_docs(getattr(job_config, type(section).__name__))
        if name == "model":
            docs = {"preset": MODEL_PRESET_DOC, **docs}
        for key, hint in _hints(section).items():
            default = getattr(section, key)
            lines.append(f"  --{name}.{key} ({_type_name(hint)}, default {default!r}): {docs.get(key, '')}")
        lines.append("")
    return "\n".join(lines)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
