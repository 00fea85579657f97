"""Benchmark any objective on the embedded digits teachers: preset -> train -> score -> teacher row
-> table, one command for every objective.

    python eval/bench.py --config configs/digits/dmd2_1step_vp.yaml steps=3000 --out runs/bench/dmd2_1step_vp_3k
    python eval/bench.py --config configs/digits/lcm_4step_vp.yaml --no-teacher --out runs/bench/lcm_4step_vp
    python eval/bench.py --config configs/digits/tdm_4step_vp.yaml --eval-only --weights student --out runs/bench/t
    python eval/bench.py --config configs/digits/scm_2step_vp.yaml --out runs/bench/scm \\
        --intermediate-angles 1.1,1.3,1.4          # sCM/TBCM: the 2-step sampler's middle angle, no training
    python eval/bench.py --teacher digits-vp --teacher-guidance 1.5     # a teacher's 50-step row only

Top to bottom:
  1. load the preset (`fewstep.config.load_config`; `key=value` overrides before or after the options);
  2. train it with the entry point `fewstep.training.run` in this process (into --out, replaced if it
     exists), then add the objective's own times for other step counts (`sampling.times_by_steps`,
     e.g. sCM's TrigFlow angles, TDM's grids) to the run card, so every step count is scored on the
     method's schedule; the run card's wall time (teacher loading, training, saving) is reported;
  3. score the student (its EMA weights when ema.rate > 0, or --weights) at every step count the run
     card has times for (or --steps-eval) with `fewstep.evaluation` on the digits protocol: 2,000
     samples, labels i % 10, sample i from seed i, FID and KID on the digits-judge features against
     all 1,797 real digits, the judge's class accuracy;
  4. unless --no-teacher, the teacher at 50 steps at the CFG scale the student was distilled with
     (the preset's objective.guidance, else the teacher card's; --teacher-guidance sets it), kept in
     --teacher-cache and reused while the teacher's weights are the same;
  5. print a markdown table and write <out>/bench.json (bench_<weights>.json for non-default weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads are slow on a shared machine (set
# before torch is imported, in main)

TEACHER_STEPS = 50
DEFAULT_METRICS = "fid,kid,class_acc"
NEEDS_ANGLES = ("scm", "tbcm")


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python eval/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="preset YAML (configs/digits/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    p.add_argument("--out", default=None, help="run dir (default: runs/bench/<preset file name>)")
    p.add_argument("--eval-only", action="store_true", help="score the run already in --out (no training)")
    p.add_argument(
        "--steps-eval",
        default=None,
        help="student step counts to score, comma separated (default: those the run card has times for)",
    )
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"metrics to compute (default {DEFAULT_METRICS})")
    p.add_argument("--num-samples", type=int, default=None, help="fewer than the protocol's 2,000 (tuning only)")
    p.add_argument(
        "--weights",
        choices=("student", "student_ema"),
        default=None,
        help="which final weights to score (default: student_ema when the preset has ema.rate > 0)",
    )
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's 50-step row")
    p.add_argument("--teacher", default=None, help="score only this teacher at 50 steps (digits-vp / digits-flow)")
    p.add_argument(
        "--teacher-guidance",
        type=float,
        default=None,
        help="the teacher row's CFG scale (default: the preset's objective.guidance, else the teacher card's)",
    )
    p.add_argument("--teacher-cache", default="runs/bench/teachers", help="folder of the teachers' results")
    p.add_argument("--refresh-teacher", action="store_true", help="score the teacher again even if cached")
    p.add_argument(
        "--intermediate-angles",
        default=None,
        help="sCM/TBCM: score the run in --out (no training) at 2 steps with each of these middle "
        "angles of the sampler [pi/2, a, 0]; writes <out>/bench_angles_<weights>.json",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the machine is shared; more threads oversubscribe it)",
    )
    args, extra = p.parse_known_args(argv)  # key=value overrides may also come after the options
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(args.overrides) + extra
    bad = [a for a in args.overrides if "=" not in a]
    if bad:
        p.error(f"not a key=value override of the preset: {' '.join(bad)}")
    _check(p, args)
    return args


def _floats(p: argparse.ArgumentParser, flag: str, text: str, kind=float) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not vals:
        p.error(f"{flag}: empty list")
    return vals


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory options by name before anything is loaded."""
    if args.teacher:
        if args.config or args.overrides:
            p.error("--teacher scores a teacher alone: give it without --config and overrides")
        if args.no_teacher or args.eval_only or args.intermediate_angles:
            p.error("--teacher cannot be combined with --no-teacher, --eval-only or --intermediate-angles")
    elif not args.config:
        p.error("--config is required (or --teacher NAME to score a teacher alone)")
    if args.steps_eval is not None:
        args.steps_eval = _floats(p, "--steps-eval", args.steps_eval, int)
        if any(s < 1 for s in args.steps_eval):
            p.error(f"--steps-eval: step counts must be >= 1, got {args.steps_eval}")
    if args.intermediate_angles is not None:
        args.intermediate_angles = _floats(p, "--intermediate-angles", args.intermediate_angles)
        if args.eval_only or args.steps_eval is not None:
            p.error("--intermediate-angles scores a trained run at 2 steps: drop --eval-only / --steps-eval")
    args.metrics = [m for m in args.metrics.split(",") if m.strip()]
    if not args.metrics:
        p.error("--metrics: empty list")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")


# ---- scoring --------------------------------------------------------------------------------------
def score(
    source: str,
    steps: list[int],
    out: Path,
    args,
    command: str,
    guidance: float | None = None,
    times: list[float] | None = None,
    weights: str = "student",
) -> dict:
    """`fewstep.evaluation.evaluate` on the digits protocol; its results.json as a dict."""
    from fewstep.evaluation import EvalSpec, evaluate

    spec = EvalSpec(
        pipeline=source,
        steps=steps,
        protocol="digits",
        num_samples=args.num_samples,
        metrics=list(args.metrics),
        out=str(out),
        progress=False,
        command=command,
        guidance=guidance,
        times=times,
        student_weights=weights,
    )
    return evaluate(spec)


def rows_of(results: dict, name: str, train_seconds: float | None = None) -> list[dict]:
    """One table row per scored step count."""
    rows = []
    for r in results["rows"]:
        m = r.get("metrics") or {}
        vals = {k: (None if m.get(k) is None else float(m[k]["value"])) for k in ("fid", "kid", "class_acc")}
        rows.append(
            {
                "name": name,
                "source": results.get("source", {}).get("source"),
                "steps": r["steps"],
                "nfe": r.get("nfe"),
                "guidance": r.get("guidance"),
                "times": r.get("times"),
                "num_samples": r.get("num_samples"),
                **vals,
                "train_seconds": train_seconds,
            }
        )
    return rows


def teacher_rows(source: str, args, command: str, guidance: float | None) -> list[dict]:
    """The teacher at 50 steps, from --teacher-cache when a result of these very weights with every
    requested metric is there."""
    from fewstep.evaluation.sources import load_source

    n_tag = f"_n{args.num_samples}" if args.num_samples else ""
    g_tag = f"_w{guidance:g}" if guidance is not None else ""
    folder = Path(args.teacher_cache) / f"{Path(source).name}_{TEACHER_STEPS}{n_tag}{g_tag}"
    res = None
    if (folder / "results.json").is_file() and not args.refresh_teacher:
        res = json.loads((folder / "results.json").read_text())
        same = res.get("source", {}).get("backbone_sha256") == load_source(source).backbone_sha256()
        has_all = all(k in (res["rows"][0].get("metrics") or {}) for k in args.metrics) if res.get("rows") else False
        res = res if same and has_all else None
    if res is None:
        res = score(source, [TEACHER_STEPS], folder, args, command, guidance=guidance)
    w = res["rows"][0].get("guidance") if res.get("rows") else guidance
    return rows_of(res, f"{source} (teacher, CFG {w})")


def table(rows: list[dict]) -> str:
    lines = [
        "| model | steps | NFE | guidance | FID | KID | class acc | samples | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def fmt(v, f):
            return "-" if v is None else f(v)

        lines.append(
            f"| {r['name']} | {r['steps']} | {fmt(r.get('nfe'), str)} | {fmt(r.get('guidance'), str)} | "
            f"{fmt(r.get('fid'), lambda v: f'{v:.2f}')} | {fmt(r.get('kid'), lambda v: f'{v:.4g}')} | "
            f"{fmt(r.get('class_acc'), lambda v: f'{100 * v:.1f}%')} | {r.get('num_samples')} | "
            f"{fmt(r.get('train_seconds'), lambda v: f'{v / 60:.1f}')} |"
        )
    return "\n".join(lines)


# ---- training ---------------------------------------------------------------------------------------
def train(cfg, run_dir: Path) -> None:
    """Train with the entry point, then record the objective's times for every step count it knows
    in the run card (`fewstep eval` reads `sampling.times_by_steps`)."""
    from fewstep.evaluation.inputs import atomic_write_json
    from fewstep.training import run

    cfg.output_dir = str(run_dir)
    cfg.overwrite = True
    res = run(cfg)
    card_path = run_dir / "run_card.json"
    card = json.loads(card_path.read_text())
    card["sampling"] = {**card.get("sampling", {}), **json.loads(json.dumps(res.objective.sampling))}
    atomic_write_json(card_path, card)
    print(f"trained {res.steps} steps in {res.wall_time / 60:.1f} min", flush=True)


def card_steps(card: dict) -> list[int]:
    """The step counts a run card has student times for: the trained one and `times_by_steps`."""
    sampling = card.get("sampling") or {}
    steps = {len(sampling["times"]) - 1}
    steps |= {int(k) for k in (sampling.get("times_by_steps") or {})}
    return sorted(steps)


def sweep_angles(cfg, args, run_dir: Path, weights: str, command: str) -> list[dict]:
    """Score the trained student at 2 steps with the sampler [pi/2, a, 0] for each middle angle a
    (mapped to the teacher's times by the objective itself); nothing is retrained and the run's
    card and bench.json are left as they are."""
    from fewstep.config import load_config

    if cfg.objective.name not in NEEDS_ANGLES:
        raise SystemExit(f"--intermediate-angles applies to scm/tbcm presets, not {cfg.objective.name!r}")
    if not (run_dir / "run_card.json").is_file():
        raise SystemExit(f"--intermediate-angles scores a trained run: {run_dir}/run_card.json is missing")
    rows = []
    for a in args.intermediate_angles:
        c = load_config(args.config, [*args.overrides, f"objective.intermediate_angle={a}"])
        times = _objective_for_sampling(c).sampling_times(2)
        res = score(
            str(run_dir), [2], run_dir / f"eval_angle_{a:g}_{weights}", args, command, times=times, weights=weights
        )
        rows += [
            {**r, "intermediate_angle": a}
            for r in rows_of(res, f"{cfg.objective.name} ({cfg.teacher.source}, {weights}), angle {a:g}")
        ]
    return rows


def _objective_for_sampling(cfg):
    """The objective of `cfg`, built (untrained) only to read its sampler."""
    from fewstep.denoiser import copy_denoiser
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.pipeline_teacher import load_teacher

    teacher = load_teacher(cfg.teacher.source)
    ctx = BuildContext(
        latent_shape=tuple(teacher.latent_shape),
        has_real_data=bool(cfg.data.real_data),
        make_student=lambda t: copy_denoiser(t),
        make_copy=lambda t: copy_denoiser(t),
    )
    return build_objective(cfg.objective.name, cfg.objective.params, teacher.denoiser, ctx)


# ---- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch

    from fewstep.evaluation.inputs import atomic_write_json

    torch.set_num_threads(args.threads)
    from fewstep.errors import script_command

    command = script_command("eval/bench.py", argv)
    if args.teacher:
        rows = teacher_rows(args.teacher, args, command, args.teacher_guidance)
        print(table(rows))
        return 0
    from fewstep.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.validate()
    run_dir = Path(args.out) if args.out else Path("runs/bench") / Path(args.config).stem
    default_weights = "student_ema" if cfg.ema.rate > 0 else "student"
    weights = args.weights or default_weights
    record = {"command": command, "config": args.config, "overrides": args.overrides}
    if args.intermediate_angles:
        rows = sweep_angles(cfg, args, run_dir, weights, command)
        atomic_write_json(run_dir / f"bench_angles_{weights}.json", {**record, "rows": rows})
        print(table(rows))
        return 0
    if not args.eval_only:
        train(cfg, run_dir)
    elif not (run_dir / "run_card.json").is_file():
        raise SystemExit(f"--eval-only: {run_dir}/run_card.json is missing (train the run first)")
    card = json.loads((run_dir / "run_card.json").read_text())
    steps = args.steps_eval or card_steps(card)
    res = score(
        str(run_dir),
        steps,
        run_dir / ("eval" if weights == "student" else f"eval_{weights}"),
        args,
        command,
        weights=weights,
    )
    rows = rows_of(res, f"{cfg.objective.name} ({cfg.teacher.source}, {weights})", card.get("wall_time_s"))
    if not args.no_teacher:
        w = args.teacher_guidance if args.teacher_guidance is not None else cfg.objective.params.get("guidance")
        rows += teacher_rows(cfg.teacher.source, args, command, w)
        _print_ratio(rows)
    name = "bench.json" if weights == default_weights else f"bench_{weights}.json"
    atomic_write_json(run_dir / name, {**record, "rows": rows})
    print(table(rows))
    return 0


def _print_ratio(rows: list[dict]) -> None:
    """Student / teacher FID of the student's trained step count."""
    teacher = rows[-1]
    for s in rows[:-1]:
        if s.get("fid") is not None and teacher.get("fid"):
            print(f"{s['steps']} step(s): student/teacher FID ratio {s['fid'] / teacher['fid']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
