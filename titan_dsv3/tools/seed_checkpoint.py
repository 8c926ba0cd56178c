"""Write a run's initial weights as a model-only DCP checkpoint, built in one CPU process.

    python -m titan_dsv3.tools.seed_checkpoint --job.config_file X [--section.key value ...] --output DIR

The weights are the ones one process draws with job.seed (parallel/weights.py seeded_state_dict, the trainer's
own initialisation up to its FULL_INIT_MAX_PARAMS). A run with ``--checkpoint.initial_load_path DIR`` starts
from them whatever its layout (FSDP, TP, PP), also above that size, where each rank would otherwise initialise
its own shards with layout-dependent random numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titan_dsv3.checkpoint.model_io import save_model_dcp
from titan_dsv3.config import ConfigError, resolve_model_args
from titan_dsv3.parallel.weights import seeded_state_dict
from titan_dsv3.tools._cli import parse_layout_free, pop_option


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    output, rest = pop_option(argv, "--output")
    if not output:
        print("error: --output DIR is required", file=sys.stderr)
        return 2
    try:
        cfg = parse_layout_free(rest)
        args = resolve_model_args(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    sd = seeded_state_dict(args, cfg.job.seed)
    out = save_model_dcp(sd, Path(output), args)
    print(f"wrote seed checkpoint {out}: {args.num_params():,} parameters, job.seed = {cfg.job.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
