"""Benchmark TDM on the embedded digits teachers: train a preset with the entry point, then score the
student (and the teacher at 50 steps) on the digits protocol.

    python eval/bench_tdm.py --config configs/digits/tdm_4step_vp.yaml
    python eval/bench_tdm.py --config configs/digits/tdm_2step_flow.yaml steps=600 --out runs/bench/tdm_2f
    python eval/bench_tdm.py --config configs/digits/tdm_4step_vp.yaml --eval-only --out runs/bench/tdm_4step_vp

Top to bottom:
  1. load the preset (`fewstep.config.load_config`, `key=value` overrides after it);
  2. train with the entry point `fewstep.training.run` (wall time recorded in the run card), then
     add TDM's own grids at 1 / 2 / 4 steps (`sampling.times_by_steps`, all starting at t_total)
     to the run card, so the other step counts are scored on TDM's grid rather than a uniform one;
  3. score with `fewstep.evaluation.evaluate` on the digits protocol: 2,000 samples, labels i % 10,
     sample i from seed i, FID on the digits-judge features against all 1,797 real digits, KID, and
     the judge's class accuracy; the student at --steps-eval, the teacher at 50 steps (its card's
     guidance; the teacher's result is reused from --teacher-cache when present);
  4. print a markdown table and write <out>/bench.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads are slow on a shared machine

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch  # noqa: E402

from fewstep.config import load_config
from fewstep.evaluation import EvalSpec, evaluate
from fewstep.evaluation.inputs import atomic_write_json

TEACHER_STEPS = 50
METRICS = ["fid", "kid", "class_acc"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset YAML (configs/digits/tdm_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    p.add_argument("--out", default=None, help="run dir (default: runs/bench/<preset name>)")
    p.add_argument("--eval-only", action="store_true", help="score an existing run dir")
    p.add_argument("--steps-eval", default=None, help="student step counts to score (default: 1,2 and the preset's)")
    p.add_argument("--num-samples", type=int, default=None, help="fewer than the protocol's 2,000 (tuning only)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's 50-step row")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="the teacher row's CFG scale (default: the teacher card's recommendation)")
    p.add_argument("--student-weights", choices=["student", "student_ema"], default=None,
                   help="which final weights to score (default: student_ema when the preset has ema.rate > 0)")
    p.add_argument("--teacher-cache", default="runs/bench/teachers", help="folder for the teachers' results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; more threads oversubscribe it)")
    return p.parse_args(argv)


def _score(pipeline: str, steps: list[int], out: Path, num_samples: int | None, command: str,
           guidance: float | None = None, student_weights: str = "student") -> dict:
    spec = EvalSpec(pipeline=pipeline, steps=steps, protocol="digits", num_samples=num_samples, metrics=METRICS,
                    out=str(out), progress=False, command=command, guidance=guidance,
                    student_weights=student_weights)
    return evaluate(spec)


def _rows(results: dict, label: str, train_s: float | None) -> list[dict]:
    rows = []
    for r in results["rows"]:
        m = r["metrics"]
        rows.append({"model": label, "steps": r["steps"], "nfe": r["nfe"], "guidance": r["guidance"],
                     "times": r["times"], "fid": m["fid"]["value"], "kid": m["kid"]["value"],
                     "class_acc": m["class_acc"]["value"], "num_samples": r["num_samples"], "train_s": train_s})
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | steps | NFE | guidance | FID | KID x1e3 | class acc | train time |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        t = "-" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']} | {r['guidance']:g} | {r['fid']:.2f} | "
                     f"{1e3 * r['kid']:.2f} | {100 * r['class_acc']:.1f}% | {t} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out or Path("runs") / "bench" / cfg.name.replace("/", "_"))
    cfg.output_dir = str(run_dir)
    params = cfg.objective.params
    k = int(params.get("num_steps", 4))
    steps_eval = [int(s) for s in args.steps_eval.split(",")] if args.steps_eval else sorted({1, 2, k})

    # 2. train -------------------------------------------------------------------------------------
    if not args.eval_only:
        from fewstep.objectives.tdm import student_times
        from fewstep.training import run

        cfg.overwrite = True
        cfg.log.progress = False
        t0 = time.perf_counter()
        res = run(cfg)
        print(f"trained {res.steps} steps in {time.perf_counter() - t0:.1f}s", flush=True)
        card_path = run_dir / "run_card.json"
        card = json.loads(card_path.read_text())
        t_total = float(params.get("t_total", 0.9))
        card["sampling"]["times_by_steps"] = {str(n): student_times(n, t_total) for n in sorted({1, 2, 4, k})}
        atomic_write_json(card_path, card)
    card = json.loads((run_dir / "run_card.json").read_text())
    train_s = float(card.get("wall_time_s", 0.0))  # the whole run, loading included

    # 3. score ---------------------------------------------------------------------------------------
    rows = []
    teacher = cfg.teacher.source
    if not args.no_teacher:
        n_tag = f"_n{args.num_samples}" if args.num_samples else ""
        g_tag = f"_w{args.teacher_guidance:g}" if args.teacher_guidance is not None else ""
        tdir = Path(args.teacher_cache) / f"{Path(teacher).name}_{TEACHER_STEPS}{n_tag}{g_tag}"
        tres = json.loads((tdir / "results.json").read_text()) if (tdir / "results.json").is_file() else None
        if tres is not None:  # reuse only a result of these very teacher weights
            from fewstep.evaluation.sources import load_source

            if tres.get("source", {}).get("backbone_sha256") != load_source(teacher).backbone_sha256():
                tres = None
        if tres is None:
            tres = _score(teacher, [TEACHER_STEPS], tdir, args.num_samples, command, guidance=args.teacher_guidance)
        rows += _rows(tres, f"{teacher} (teacher)", None)
    which = args.student_weights or ("student_ema" if cfg.ema.rate > 0 else "student")
    sres = _score(str(run_dir), steps_eval, run_dir / f"eval_{which}", args.num_samples, command,
                  student_weights=which)
    rows += _rows(sres, f"TDM {k}-step ({cfg.name}, {which})", train_s)

    # 4. report --------------------------------------------------------------------------------------
    md = table(rows)
    print(f"\n{command}\n\n{md}\n", flush=True)
    atomic_write_json(run_dir / "bench.json", {"command": command, "config": args.config,
                                               "overrides": args.overrides, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
