"""Run configuration: dataclasses per TOML section, TOML + command-line overrides, validation."""

from titan_dsv3.config.job_config import JobConfig
from titan_dsv3.config.manager import ConfigError, parse_args, resolve_model_args

__all__ = ["ConfigError", "JobConfig", "parse_args", "resolve_model_args"]
