"""Validate a run's configuration without building anything: exit 0 when valid, 2 with one line when not.

python -m titan_dsv3.config --world-size 4 --job.config_file train_configs/debug_model.toml [overrides]
"""

import sys

from titan_dsv3.config.manager import ConfigError, parse_args


def main(argv: list[str]) -> int:
    world_size = None
    if argv[:1] == ["--world-size"]:
        world_size, argv = int(argv[1]), argv[2:]
    try:
        parse_args(argv, world_size=world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
