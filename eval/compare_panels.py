"""Two methods compared over several training seeds, from their `eval/panel.py` results.

Each `--a` / `--b` is the output folder (or its `panel.json`) of `eval/panel.py` for one training
seed; the i-th `--a` is paired with the i-th `--b`. Every (training seed, evaluation seed) pair is
judged under the claims rule (`fewstep.evaluation.panel.compare`, a against b), every member of every
pair is counted where a's FID is the lower, and each member's mean FID over all pairs is given for
both sides. This is how the multi-seed comparisons in BENCHMARKS.md are computed.

    python eval/compare_panels.py --a runs/panel/ddf_t05 --a runs/panel/ddf_t05_s1 \
        --b runs/panel/dmd2f_t05 --b runs/panel/dmd2f_t05_s1 [--label-a ...] [--label-b ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load(path: str) -> dict:
    from fewstep.errors import UserError, read_json

    p = Path(path)
    if p.is_dir():
        p = p / "panel.json"
    if not p.is_file():
        raise UserError(f"{path}: no panel.json there (the --out folder of eval/panel.py)")
    rec = read_json(p)
    if not isinstance(rec, dict) or not rec.get("student_runs"):
        raise UserError(f"{p}: not an eval/panel.py result (no 'student_runs')")
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", action="append", required=True, help="panel folder of method a, one per training seed")
    ap.add_argument("--b", action="append", required=True, help="panel folder of method b, in the same seed order")
    ap.add_argument("--label-a", default="a")
    ap.add_argument("--label-b", default="b")
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = ap.parse_args(argv)

    from fewstep.evaluation.panel import compare_training_seeds, training_seeds_text

    c = compare_training_seeds([_load(p) for p in args.a], [_load(p) for p in args.b])
    print(training_seeds_text(args.label_a, args.label_b, c), end="")
    if args.out:
        from fewstep.errors import script_command
        from fewstep.evaluation.inputs import atomic_write_json

        command = script_command("eval/compare_panels.py", argv)
        atomic_write_json(Path(args.out), {"command": command, "a": args.a, "b": args.b, **c})
    return 0


if __name__ == "__main__":
    from fewstep.errors import main_guard

    sys.exit(main_guard("compare_panels", main))
