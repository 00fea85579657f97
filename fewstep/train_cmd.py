"""`fewstep train` and `train/train.py`: load a preset, apply key=value overrides, then train (or
print the dry-run report).

    accelerate launch train/train.py --config configs/digits/dsm.yaml steps=200 optim.generator.lr=1e-4
    fewstep train --config configs/sdxl/dmd2_4step_lora.yaml --dry-run --processes 8 --sharding fsdp
    fewstep train --config configs/digits/dmd2_1step_vp.yaml data.batch_size=64 --print-config
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "run", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML preset, e.g. configs/digits/dsm.yaml (default: built-in defaults)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. objective.guidance=3 optim.generator.lr=1e-5 resume=latest",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the networks on the meta device and print parameter counts and memory per process",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset, overrides and every default) as YAML and exit",
    )
    p.add_argument("--processes", type=int, default=None, help="dry run: number of processes (default: the launcher's)")
    p.add_argument(
        "--sharding", choices=["none", "fsdp"], default=None, help="dry run: sharding (default: the launcher's)"
    )


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .errors import one_line

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fewstep train: config error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from .config import config_to_dict

        if os.environ.get("RANK", "0") == "0":
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="", flush=True)
        return 0
    if args.dry_run:
        from .errors import user_errors
        from .training.dry_run import dry_run

        with user_errors(f"teacher.source={cfg.teacher.source!r}", ValueError, OSError, named=cfg.teacher.source):
            report = dry_run(cfg, num_processes=args.processes, sharding=args.sharding)
        if os.environ.get("RANK", "0") == "0":
            print(report, flush=True)
        return 0
    try:  # everything that can be checked before torch is imported and the teacher loads
        from .training.preflight import preflight

        preflight(cfg)
    except ConfigError as e:
        print(f"fewstep train: config error: {one_line(e)}", file=sys.stderr)
        return 2
    from .training.loop import NonFiniteError
    from .training.loop import run as train

    try:
        train(cfg)
    except ConfigError as e:
        print(f"fewstep train: config error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"fewstep train: {one_line(e)}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .errors import main_guard

    parser = OneLineParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return main_guard("train.py", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
