"""Helpers shared by the checkpoint tools: trainer-style config arguments beside the tool's own options."""

from __future__ import annotations

from pathlib import Path

from titan_dsv3.config import JobConfig, parse_args, resolve_model_args
from titan_dsv3.models.args import ModelArgs

# The tools run in one process and write layout-free weights: check the config as if it ran in one process.
_ONE_PROCESS = [
    "--parallelism.data_parallel_replicate_degree=1",
    "--parallelism.data_parallel_shard_degree=-1",
    "--parallelism.tensor_parallel_degree=1",
    "--parallelism.pipeline_parallel_degree=1",
    "--parallelism.context_parallel_degree=1",
    "--parallelism.expert_parallel_degree=1",
]


def parse_layout_free(argv: list[str]) -> JobConfig:
    """A JobConfig from trainer-style arguments (``--job.config_file X --section.key value``), in one process."""
    return parse_args(list(argv) + _ONE_PROCESS, world_size=1)


def config_model_args(argv: list[str]) -> tuple[JobConfig, ModelArgs] | None:
    """(config, model args) when trainer-style arguments were given, else None. Raises ConfigError."""
    if not argv:
        return None
    cfg = parse_layout_free(argv)
    return cfg, resolve_model_args(cfg)


def pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """Remove ``name VALUE`` or ``name=VALUE`` from argv; returns (value or None, the rest)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif tok.startswith(name + "="):
            value, i = tok.split("=", 1)[1], i + 1
        else:
            rest.append(tok)
            i += 1
    return value, rest


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """tokenizer.json and tokenizer_config.json travel with the weights when present."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
