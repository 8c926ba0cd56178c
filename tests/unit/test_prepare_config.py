"""Configuration of tools.prepare_data: precedence, the documented example, and one-line errors with status 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from titan_dsv3.data.prepare.config import (
    ConfigError,
    PrepareConfig,
    build_config,
    field_docs,
    load_toml,
    sections,
)
from titan_dsv3.tools.prepare_data import main, parse_argv

EXAMPLE = Path(__file__).resolve().parents[2] / "train_configs" / "data_prepare.toml"


def test_example_documents_every_option():
    data = load_toml(EXAMPLE)
    lines = EXAMPLE.read_text().splitlines()
    for name, section in sections(PrepareConfig()).items():
        keys = list(typing.get_type_hints(type(section)))
        assert list(data[name]) == keys, name
        docs = field_docs(type(section))
        for key in keys:
            assert docs.get(key), f"{name}.{key} has no docstring"
            i = next(
                n for n, ln in enumerate(lines) if ln.startswith(f"{key} = ") and n > lines.index(f"[{name}]")
            )
            assert lines[i - 1].startswith("# "), f"{name}.{key} has no comment"
    cfg = build_config(EXAMPLE)
    defaults = PrepareConfig()
    for name in sections(defaults):
        if name not in ("input", "output"):
            assert getattr(cfg, name) == getattr(defaults, name), (
                f"the example's [{name}] differs from the defaults"
            )


def test_precedence_and_argv(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[input]\npaths = ["x.jsonl"]\n[output]\ndir = "o"\n[near_dedup]\nnum_perm = 64\nthreshold = 0.7\n'
    )
    config, pairs = parse_argv(
        [
            "--config",
            str(toml),
            "--input",
            "a.jsonl",
            "b.parquet",
            "--output=out",
            "--near_dedup.num_perm",
            "32",
            "--pipeline.progress",
            "--filter.stop_words",
            "the,and",
        ]
    )
    cfg = build_config(config, pairs)
    assert cfg.input.paths == ["a.jsonl", "b.parquet"] and cfg.output.dir == "out"
    assert cfg.near_dedup.num_perm == 32 and cfg.near_dedup.threshold == 0.7  # command line > TOML > defaults
    assert cfg.pipeline.progress is True and cfg.filter.stop_words == ["the", "and"]
    assert cfg.filter == dataclasses.replace(PrepareConfig().filter, stop_words=["the", "and"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--filter.min_wrds", "3"], "filter.min_wrds"),
        (["--filters.min_words", "3"], "[filters]"),
        (["--near_dedup.num_perm", "many"], "near_dedup.num_perm: expected an integer"),
        (["--near_dedup.threshold", "1.5"], "near_dedup.threshold"),
        (["--pipeline.stages", "tokenize,clean"], "must end with tokenize"),
        (["--pipeline.stages", "clean,clean,tokenize"], "twice"),
        (["--pipeline.stages", "dedup,tokenize"], "pipeline.stages: 'dedup'"),
        (["--input.on_error", "ignore"], "input.on_error"),
        (["--language.languages", "xx"], "language.languages"),
        (["--tokenize.tokenizer", "missing.json"], "tokenize.tokenizer"),
        (["stray"], "unexpected 'stray'"),
    ],
)
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, args, needle):
    base = ["--input", str(EXAMPLE), "--output", str(tmp_path / "o")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_missing_input_and_output(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "o")]) == 2
    assert "input.paths" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "nothing*.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert main(["--input", str(EXAMPLE)]) == 2
    assert "output.dir" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not valid TOML"):
        bad = tmp_path / "bad.toml"
        bad.write_text("[input\n")
        build_config(bad)


def test_module_entry_point_and_help():
    r = subprocess.run(
        [sys.executable, "-m", "titan_dsv3.tools.prepare_data", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--near_dedup.threshold" in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "titan_dsv3.tools.prepare_data",
            "--input",
            "x",
            "--output",
            "y",
            "--nope.key",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "[nope]" in r.stderr
