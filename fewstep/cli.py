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
    "distill-decoder": ("fewstep.decoder_cmd", "distil a small AutoencoderTiny from a teacher's VAE decoder"),
    "launch": ("fewstep.launch_cmd", "accelerate launch the training entry point, the config checked first"),
    "encode": ("fewstep.encode_cmd", "encode images into a sharded latent cache with the teacher's VAE"),
    "plot": ("fewstep.plot_cmd", "draw a run's training curves (losses, grad norms, lr, FID) to a PNG"),
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is for --help), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    from .errors import main_guard

    parser = OneLineParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    modules = {}
    for name, (mod, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            modules[name] = importlib.import_module(mod)
            modules[name].add_arguments(p)
    if chosen == "launch" and argv[1:2] not in (["-h"], ["--help"]):  # the rest is accelerate's and train's
        args = argparse.Namespace(command="launch", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    return main_guard(f"fewstep {args.command}", lambda: modules[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
