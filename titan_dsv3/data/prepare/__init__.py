"""Corpus preparation for training: read -> clean -> exact dedup -> MinHash near-dedup -> quality filters ->
language check -> uint32 token shards + manifest.json + report.json (``python -m titan_dsv3.tools.prepare_data``).

Every stage is a generator ``stage(docs, rank, world_size)`` with its own config dataclass (config.py); the pipeline
(pipeline.py) orders them, runs them over worker processes, resumes interrupted runs and writes the report.
"""

from titan_dsv3.data.prepare.config import ConfigError, PrepareConfig, build_config
from titan_dsv3.data.prepare.document import DataError, Doc, Removal

__all__ = ["ConfigError", "DataError", "Doc", "PrepareConfig", "Removal", "build_config"]
