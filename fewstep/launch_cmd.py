"""`fewstep launch`: `accelerate launch` of the training entry point, with the config checked first
and a failure reported in one line.

    fewstep launch --num_processes 8 --mixed_precision bf16 -- --config configs/sd15/dmd2_1step.yaml steps=2000
    fewstep launch --config_file configs/accelerate/fsdp2.yaml -- --config ... key=value

Everything before `--` goes to `accelerate launch` unchanged; everything after it to `fewstep train`.
The preset, the overrides and every check that needs no teacher (`fewstep.training.preflight`)
run here, before any process starts, so a mistake costs no start-up and prints one line. When a
training process fails, its own one-line error is what the user reads: `accelerate launch` would
add a traceback of the launcher itself (`CalledProcessError`, `ChildFailedError`); here the
launcher's failure becomes the training process's exit status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="[accelerate options] -- [train arguments]",
        help="options of `accelerate launch`, then `--`, then `fewstep train` arguments",
    )


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    from .errors import UserError

    if "--" not in argv:
        raise UserError(
            "fewstep launch: separate the accelerate options from the train arguments with `--`, "
            "e.g. fewstep launch --num_processes 2 -- --config configs/digits/dsm.yaml"
        )
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _record_requested(largs: argparse.Namespace) -> None:
    """Tell the training processes how many were asked for (--num_processes, else the accelerate
    config file's), so a run that starts fewer can say so (fewstep/training/processes.py)."""
    import os

    from .training.processes import REQUESTED_ENV

    asked = largs.num_processes
    if asked is None:
        try:
            from accelerate.commands.config.config_args import default_config_file, load_config_from_file

            if largs.config_file or os.path.isfile(default_config_file):
                asked = load_config_from_file(largs.config_file).num_processes
        except Exception:  # no readable accelerate config: nothing was asked for
            asked = None
    if isinstance(asked, int) and asked > 0:
        os.environ[REQUESTED_ENV] = str(asked)


def run(args: argparse.Namespace) -> int:
    from .cli import OneLineParser
    from .config import load_config
    from .errors import UserError, one_line
    from .train_cmd import add_arguments as train_arguments

    accel, train = _split(list(args.args))
    tp = OneLineParser(prog="fewstep launch ... --", add_help=False)
    train_arguments(tp)
    targs = tp.parse_args(train)
    if targs.dry_run:
        raise UserError("fewstep launch: --dry-run needs no processes; run `fewstep train --dry-run --processes N`")
    cfg = load_config(targs.config, targs.overrides)
    from .training.preflight import preflight

    preflight(cfg)

    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    try:
        largs = parser.parse_args([*accel, "--module", "fewstep.train_cmd", *train])
    except SystemExit as e:  # argparse already printed what is wrong with the accelerate options
        return int(e.code or 2)
    _record_requested(largs)
    try:
        launch_command(largs)
    except subprocess.CalledProcessError as e:  # one process: it printed its own one-line error
        return e.returncode
    except Exception as e:  # torchrun's ChildFailedError: the first failed process's exit status
        failures = getattr(e, "failures", None)
        if not failures:
            raise
        rank, failure = min(failures.items())
        print(
            f"fewstep launch: error: training process {rank} exited with status {failure.exitcode} "
            f"({one_line(e, 200)})",
            file=sys.stderr,
        )
        return int(failure.exitcode) if failure.exitcode and failure.exitcode > 0 else 1
    return 0
