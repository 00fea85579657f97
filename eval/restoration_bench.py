"""Restoration benchmark of the embedded default: the teacher's rows and, for each preset given,
one training run and its rows, all with the `restoration` protocol (fewstep/evaluation/restoration.py).

    python eval/restoration_bench.py --teacher-steps 50 --out runs/restoration_bench \
        --config configs/digits/ircm_1step_restore.yaml --steps 1,2 \
        --config configs/digits/tadsr_1step_restore.yaml --steps 1 [--panel]

Writes <out>/teacher/results.json, <out>/<preset>/results.json (with the run's training wall time),
<out>/verdicts.json and prints one table per model, with each row's PSNR 95% bootstrap interval,
then the verdicts: every preset's rows (and the teacher's at fewer steps) against the teacher's
largest step count on each degradation (`restoration_verdicts`; PSNR by its intervals). With
--panel every row (clean targets, baselines, teacher, presets) is also scored by the judge panel:
its FID median [range] joins the table and the FID verdicts follow the claims rule
(fewstep.evaluation.panel). One thread (on a shared machine, run at most one per core); wall
times are upper bounds there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-steps", default="50", help="comma-separated DDIM steps for the teacher ('' to skip)")
    p.add_argument("--config", action="append", default=[], help="a restoration preset to train and score")
    p.add_argument("--steps", action="append", default=[], help="step counts for the matching --config")
    p.add_argument("--train-steps", type=int, default=None, help="override the presets' steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every preset")
    p.add_argument(
        "--student-weights",
        choices=["student", "student_ema"],
        default="student",
        help="the weights scored (student_ema needs ema.rate > 0)",
    )
    p.add_argument("--num-samples", type=int, default=None, help="held-out images per degradation (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-card", action="store_true", help="do not write the teacher's scores into its card")
    p.add_argument("--panel", action="store_true", help="also score every row with the judge panel (FID verdicts)")
    args = p.parse_args(argv)
    import torch

    from fewstep.config import load_config
    from fewstep.evaluation import EvalSpec
    from fewstep.evaluation.restoration import (
        RESTORATION_METRICS,
        _markdown,
        evaluate_restoration,
        restoration_verdicts,
        verdicts_markdown,
    )
    from fewstep.training import run

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    metrics = [*RESTORATION_METRICS, "panel"] if args.panel else None  # None: the protocol's
    rows = []  # every model's rows, named, for the verdicts against the teacher
    if args.teacher_steps:
        steps = [int(s) for s in args.teacher_steps.split(",")]
        res = evaluate_restoration(
            EvalSpec(
                pipeline="digits-restore",
                steps=steps,
                protocol="restoration",
                num_samples=args.num_samples,
                metrics=metrics,
                out=str(out / "teacher"),
                command=" ".join(sys.argv),
            )
        )
        rows += [{**r, "model": "teacher"} for r in res["rows"]]
        tables.append(_markdown(res))
        print(tables[-1], flush=True)
        if not args.no_card:  # the teacher's scores go to its card, beside the command that trained it
            from fewstep.digits.data import WEIGHTS_DIR

            card_file = WEIGHTS_DIR / "restoration_teacher.json"
            card = json.loads(card_file.read_text())
            card["scores"] = {"command": " ".join(["python"] + sys.argv), "rows": res["rows"]}
            card_file.write_text(json.dumps(card, indent=2) + "\n")
    if len(args.steps) not in (0, len(args.config)):
        raise SystemExit("give one --steps per --config (or none: 1)")
    for i, cfg_path in enumerate(args.config):
        name = Path(cfg_path).stem
        overrides = [f"output_dir={out / name / 'run'}", "overwrite=true", "log.progress=false"]
        if args.train_steps is not None:
            overrides.append(f"steps={args.train_steps}")
        overrides += list(args.set)
        cfg = load_config(cfg_path, overrides)
        t0 = time.time()
        result = run(cfg)
        wall = time.time() - t0
        steps = [int(s) for s in (args.steps[i] if args.steps else "1").split(",")]
        res = evaluate_restoration(
            EvalSpec(
                pipeline=str(result.run_dir),
                steps=steps,
                protocol="restoration",
                num_samples=args.num_samples,
                metrics=metrics,
                student_weights=args.student_weights,
                out=str(out / name),
                command=" ".join(sys.argv),
            )
        )
        rows += [{**r, "model": name} for r in res["rows"] if r["what"] == "student"]
        res["training"] = {"config": cfg_path, "overrides": overrides, "wall_s": round(wall, 1), "steps": result.steps}
        (out / name / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        tables.append(f"training wall {wall:.0f}s ({result.steps} steps)\n" + _markdown(res))
        print(tables[-1], flush=True)
    verdicts = restoration_verdicts(rows)
    (out / "verdicts.json").write_text(json.dumps(verdicts, indent=1) + "\n")
    if verdicts:
        tables.append("Verdicts against the teacher (claims rule):\n\n" + verdicts_markdown(verdicts))
        print(tables[-1], flush=True)
    (out / "tables.md").write_text("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
