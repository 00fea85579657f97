"""`fewstep` command line. Each subcommand lives in its own module with
`add_arguments(parser)` and `run(args) -> int`, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("fewstep.demo", "distil the embedded digits teacher and compare student and teacher"),
    "sample": ("fewstep.sample_cmd", "sample a grid from a teacher or student"),
    "train": ("fewstep.train_cmd", "run the training entry point (same as train/train.py)"),
    "export": ("fewstep.export", "write a stock diffusers pipeline folder for a student"),
    "eval": ("fewstep.eval_cmd", "score a pipeline or checkpoint: FID, KID, precision/recall, ..."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    modules = {}
    for name, (mod, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            modules[name] = importlib.import_module(mod)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
