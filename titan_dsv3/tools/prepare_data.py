"""Prepare a text corpus for training: read, clean, deduplicate, filter, tokenize into uint32 token shards.

    python -m titan_dsv3.tools.prepare_data --config train_configs/data_prepare.toml \\
        [--input FILE|DIR|GLOB ...] [--output DIR] [--section.key value | --section.key=value ...]

Precedence: defaults < the TOML file < the command line. The output folder gets the shards, manifest.json (written
last: a folder without it is unfinished) and report.json (counts per stage, and every removed document with its
stage and reason). Running the same command again resumes an interrupted run. The training loader reads the
folder given as ``--data.path``.

Exit status: 0 done, 1 bad input with input.on_error = "stop", 2 a configuration error (one line naming the key).
"""

from __future__ import annotations

import sys

from titan_dsv3.data.prepare.config import ConfigError, build_config, help_options
from titan_dsv3.data.prepare.document import DataError


def parse_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, object]]]:
    """(the --config file, [(section.key, value)]) with --input and --output turned into their keys."""
    config, pairs, i = None, [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(
                f"command line: unexpected '{tok}'; options look like --section.key value (see --help)"
            )
        name, eq, value = tok[2:].partition("=")
        i += 1
        if name == "input" and not eq:
            paths = []
            while i < len(argv) and not argv[i].startswith("--"):
                paths.append(argv[i])
                i += 1
            if not paths:
                raise ConfigError("--input: no path given; write --input FILE [FILE ...]")
            pairs.append(("input.paths", paths))
            continue
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                i += 1
            elif name in ("config", "output"):
                raise ConfigError(f"--{name}: no value given; write --{name} PATH")
            else:
                value = "true"  # a bare flag
        if name == "config":
            config = value
        elif name == "input":
            pairs.append(("input.paths", [value]))
        elif name == "output":
            pairs.append(("output.dir", value))
        else:
            pairs.append((name, value))
    return config, pairs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(help_options())
        return 0
    try:
        config, pairs = parse_argv(argv)
        cfg = build_config(config, pairs)
        from titan_dsv3.data.prepare.pipeline import run

        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
