"""`fewstep eval`: score a teacher, an exported student pipeline or a training run.

    fewstep eval --pipeline digits-vp --steps 1,2,4,8 --out eval_out/digits-vp
    fewstep eval --pipeline runs/digits-dmd2 --steps 1,2,4 --out eval_out/dmd2
    fewstep eval --pipeline exports/sd15-dmd2 --protocol coco2014-30k --captions captions_val2014.json \\
        --reference val2014/ --inception-weights weights-inception-2015-12-05-6726825d.pth \\
        --clip-model clip-vit-large-patch14/ --device cuda --out eval_out/sd15
    fewstep eval --images my_samples/ --reference digits --metrics fid,kid,prc --out eval_out/folder

Writes <out>/results.json (every number with its backend, extractor, weights hash, sample count,
seeds, steps and guidance) and <out>/results.md, plus a sample grid per step count
(and every image with --save-images). Nothing is downloaded: a missing weights file stops the
command before anything is generated, naming the file and the flag that provides it.
Same as `python -m eval.eval_cmd`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from .errors import check_output_folder, finite_float, nonnegative_int, positive_int
from .evaluation.protocols import PROTOCOLS

__all__ = ["add_arguments", "run", "main"]


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _float_list(s: str) -> list[float]:
    try:
        vals = [finite_float(v) for v in s.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    return vals


def _str_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    _scoring_arguments(p)
    _generation_arguments(p)
    _output_arguments(p)


def _scoring_arguments(p: argparse.ArgumentParser) -> None:
    """What to score, at which step counts, under which protocol, metrics, reference and extractor."""
    src = p.add_argument_group("what to score (one of)")
    src.add_argument(
        "--pipeline", help="a teacher name (digits-vp, ...), pipeline folder (teacher or student) or run dir"
    )
    src.add_argument("--images", help="a folder of already generated images (scores fid/kid/prc only)")
    p.add_argument(
        "--steps",
        type=_int_list,
        default=[1, 2, 4],
        help="comma-separated step counts; for a teacher, DDIM / Euler steps (default 1,2,4)",
    )
    p.add_argument(
        "--protocol",
        default="digits",
        choices=sorted(PROTOCOLS),
        help="preset: sample count, labels or captions, seed, extractor, reference (default digits)",
    )
    p.add_argument("--num-samples", type=positive_int, help="samples per step count (default: the protocol's)")
    p.add_argument("--seed", type=int, help="sample i starts from noise seeded with seed + i (default: protocol's)")
    p.add_argument(
        "--metrics",
        type=_str_list,
        help="comma-separated subset of fid,kid,prc,clip,class_acc,diversity,panel (default: protocol's); "
        "restoration: psnr,ssim,judge_dist,class_acc,fid,panel",
    )
    p.add_argument(
        "--reference", help="'digits', an image folder, or .npz (mu, sigma; FID only) / .safetensors features"
    )
    p.add_argument("--captions", help="captions for caption protocols: COCO annotation JSON or one a line")
    p.add_argument("--feature-extractor", help="a registered torch-fidelity extractor (default: the protocol's)")
    p.add_argument("--feature-extractor-weights", help="local weights file for the feature extractor")
    p.add_argument(
        "--inception-weights",
        help="local Inception weights (torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth, or a .safetensors of it)",
    )
    p.add_argument("--clip-model", help="local CLIP folder (transformers CLIPModel + CLIPProcessor files)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        help="import this module first (e.g. one that registers a custom extractor); repeatable",
    )
    p.add_argument("--image-size", type=positive_int, help="scoring resolution (default: the protocol's)")


def _generation_arguments(p: argparse.ArgumentParser) -> None:
    """How the samples are generated: guidance, batches, device, sampler, weights, hybrid and times."""
    p.add_argument(
        "--guidance", type=finite_float, help="CFG scale (default: the teacher's recommended value; students 1)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=250,
        help="generation batch size (default 250); "
        "a multi-step student's fresh noise between steps is drawn per batch, so its scores depend on it",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="backbone dtype: float32, bfloat16, float16")
    p.add_argument(
        "--sampler",
        default="fewstep",
        choices=["fewstep", "pipeline"],
        help="fewstep's sampler (default) or the folder's stock diffusers pipeline",
    )
    p.add_argument(
        "--student-weights",
        default="student",
        choices=["student", "student_ema"],
        help="for a run dir: the raw student weights (default) or their EMA",
    )
    p.add_argument(
        "--hybrid",
        type=nonnegative_int,
        default=0,
        metavar="K",
        help="students: the teacher (with CFG) runs the first K steps, the student the rest",
    )
    p.add_argument(
        "--teacher-guidance", type=finite_float, help="the teacher's CFG scale with --hybrid (default its own)"
    )
    p.add_argument(
        "--times",
        type=_float_list,
        help="students: sampling times t_0,...,0 (steps + 1 values, one "
        "--steps N) instead of the run card's, e.g. to try another intermediate time",
    )


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """Metric details (KID subsets, bootstrap) and what is written where."""
    p.add_argument("--kid-subset-size", type=positive_int, help="KID subset size (clamped to the sample counts)")
    p.add_argument(
        "--bootstrap",
        type=nonnegative_int,
        help="panel (and restoration's PSNR): resamples of the generated set for the 95%% "
        "intervals (default: the protocol's, 200 for digits and restoration; 0: none)",
    )
    p.add_argument("--save-images", action="store_true", help="also save every generated image as PNG")
    p.add_argument("--no-cache", action="store_true", help="recompute reference features (no disk cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, grids)")


def _command_line() -> str:
    if sys.argv[1:2] == ["eval"]:
        return "fewstep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "(called in-process)"


def run(args: argparse.Namespace) -> int:
    from .evaluation import EvalSpec, InputError, evaluate

    check_output_folder(args.out, "--out")

    # the options of the same name, then the four that differ from their field
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSpec) if hasattr(args, f.name)}
    fields.update(imports=tuple(args.imports), cache=not args.no_cache, progress=not args.no_progress)
    fields["command"] = getattr(args, "command_line", None) or _command_line()  # args.command is the subcommand
    spec = EvalSpec(**fields)
    try:
        results = evaluate(spec)
    except (InputError, FileNotFoundError) as e:
        print(f"fewstep eval: error: {e}", file=sys.stderr)
        return 2
    if results.get("protocol") == "restoration":
        from .evaluation.restoration import _markdown

        print(_markdown(results))
        print(f"wrote {args.out}/results.json and {args.out}/results.md")
        return 0
    from .evaluation.run import markdown_table

    print(markdown_table(results))
    print(f"wrote {args.out}/results.json and {args.out}/results.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .errors import main_guard

    p = OneLineParser(
        prog="python -m eval.eval_cmd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command_line = "python -m eval.eval_cmd " + " ".join(shlex.quote(a) for a in argv)
    return main_guard("eval", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
