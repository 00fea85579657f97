"""Benchmark the consistency objectives (LCM, sCM, TBCM) on the embedded digits teachers.

    python eval/bench_consistency.py --config configs/digits/lcm_4step_vp.yaml
    python eval/bench_consistency.py --config configs/digits/scm_2step_flow.yaml steps=600 --out runs/bench/scm
    python eval/bench_consistency.py --config configs/digits/tbcm_2step_vp.yaml --eval-only
    python eval/bench_consistency.py --teacher digits-vp            # the teacher at 50 steps only
    python eval/bench_consistency.py --config configs/digits/scm_2step_vp.yaml --out runs/bench/scm \
        --intermediate-angles 1.1,1.3,1.4                           # 2-step sampler sweep, no training

Top to bottom:
  1. load the preset (`fewstep.config.load_config`, `key=value` overrides after it);
  2. train: with the entry point `fewstep.training.run` when it exists (--loop entry), else with
     the loop below, which follows the entry point's order (per phase: loss, backward, clip the
     group's gradient norm, skip non-finite updates, step, zero every gradient, after_step);
     wall-clock time of training is recorded;
  3. evaluate the student at 1, 2 and 4 steps (and, unless --no-teacher, the teacher at 50 steps)
     with `fewstep.evaluation` on the digits protocol: 2,000 samples, labels i % 10, seed 0, FID on
     the digits-judge features against all 1,797 real digits, judge class accuracy;
  4. print a markdown table and write <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from fewstep.config import load_config, resolve_group
from fewstep.evaluation import EvalSpec, evaluate
from fewstep.evaluation.inputs import atomic_write_json

TEACHER_STEPS = 50


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="preset YAML (configs/digits/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    p.add_argument("--out", default=None, help="run dir (default: the preset's output dir)")
    p.add_argument("--loop", choices=["auto", "entry", "builtin"], default="auto",
                   help="training loop: the entry point, the loop in this file, or the entry point when present")
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing run dir")
    p.add_argument("--steps-eval", default="1,2,4", help="student step counts to evaluate")
    p.add_argument("--num-samples", type=int, default=None, help="override the protocol's 2,000 (tuning only)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's 50-step row")
    p.add_argument("--teacher", default=None, help="evaluate only this teacher (digits-vp / digits-flow)")
    p.add_argument("--teacher-guidance", type=float, default=None,
                   help="CFG scale of the teacher row (default: the teacher's recommended scale)")
    p.add_argument("--intermediate-angles", default=None,
                   help="sCM/TBCM: score an already trained run (no training) at 2 steps with each of these "
                        "middle angles of the sampler [pi/2, a, 0]; writes <out>/bench_angles.json")
    p.add_argument("--weights", choices=("student", "student_ema"), default=None,
                   help="which final weights to score (default: student_ema when ema.rate > 0)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


# ---- 2. training ---------------------------------------------------------------------------------
def _entry_point():
    try:
        from fewstep.training import run  # noqa: F401
    except ImportError:
        return None
    return run


def train_builtin(cfg, run_dir: Path) -> dict:
    """The entry point's loop order, for when `fewstep.training.run` is not available."""
    from safetensors.torch import save_file

    from fewstep.digits.data import NUM_CLASSES, load_digits_tensors
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.pipeline_teacher import load_teacher

    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg.teacher.source)
    den = teacher.denoiser
    den.requires_grad_(False)
    latents = labels_all = None
    if cfg.data.real_data:
        images, labels_all = load_digits_tensors()
        latents = torch.cat([teacher.encode(images[i:i + 256]) for i in range(0, len(images), 256)])
    ctx = BuildContext(latent_shape=tuple(teacher.latent_shape), num_classes=NUM_CLASSES,
                       null_class=getattr(den.conditioner, "null_class", None), has_real_data=bool(cfg.data.real_data),
                       seed=cfg.seed, steps=cfg.steps, family=teacher.family)
    obj = build_objective(cfg.objective.name, cfg.objective.params, den, ctx)
    opts, clips = {}, {}
    for group in obj.groups:
        g = resolve_group(cfg, group)
        opts[group] = torch.optim.AdamW(trainable_parameters(obj, group), lr=g.lr, betas=tuple(g.betas),
                                        weight_decay=g.weight_decay, eps=g.eps)
        clips[group] = (g.grad_clip, g.warmup_steps, g.lr)
    nets = list(obj.nets.values())
    b = cfg.data.batch_size
    shape = (b, *teacher.latent_shape)
    log_path = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    skipped = 0
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        for step in range(cfg.steps):
            if latents is not None:
                idx = torch.randint(0, latents.shape[0], (b,))
                batch = {"cond": {"class_labels": labels_all[idx]}, "x0": latents[idx], "shape": shape}
            else:
                batch = {"cond": {"class_labels": torch.randperm(b) % NUM_CLASSES}, "shape": shape}
            batch.update(index=torch.arange(b), global_batch_size=b)
            for phase in obj.phases(step):
                clip, warm, lr = clips[phase]
                for pg in opts[phase].param_groups:
                    pg["lr"] = lr * min(1.0, (step + 1) / warm) if warm else lr
                loss, logs = obj.loss(phase, batch, step)
                loss.backward()
                params = trainable_parameters(obj, phase)
                norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
                if torch.isfinite(loss) and torch.isfinite(norm):
                    opts[phase].step()
                    ok = True
                else:
                    skipped += 1
                    ok = False
                for net in nets:
                    net.zero_grad(set_to_none=True)
                if ok and hasattr(obj, "after_step"):
                    obj.after_step(phase, step)
                if step % cfg.log.every == 0:
                    rec = {"step": step, "phase": phase, "grad_norm": float(norm), **logs,
                           "elapsed_s": time.perf_counter() - t0}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    print(json.dumps(rec), flush=True)
    wall = time.perf_counter() - t0
    student = obj.nets["student"]
    save_file({k: v.detach().contiguous().cpu() for k, v in student.backbone.state_dict().items()},
              str(run_dir / "student.safetensors"))
    card = {"teacher": cfg.teacher.source, "objective": cfg.objective.name, "params": cfg.objective.params,
            "sampling": obj.sampling, "steps": cfg.steps, "train_seconds": wall, "skipped_updates": skipped,
            "loop": "eval/bench_consistency.py builtin", "weights": "student.safetensors"}
    atomic_write_json(run_dir / "run_card.json", card)
    return {"train_seconds": wall, "skipped_updates": skipped, "loop": "builtin"}


def train_entry(run, cfg, run_dir: Path) -> dict:
    cfg.output_dir = str(run_dir)
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    _complete_sampling(cfg, run_dir)
    return {"train_seconds": wall, "loop": "fewstep.training.run"}


def _build_for_sampling(cfg):
    """The objective of `cfg`, built only to read its sampler."""
    from fewstep.denoiser import copy_denoiser
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.pipeline_teacher import load_teacher

    teacher = load_teacher(cfg.teacher.source)
    ctx = BuildContext(latent_shape=tuple(teacher.latent_shape), has_real_data=bool(cfg.data.real_data),
                       make_student=lambda t: copy_denoiser(t), make_copy=lambda t: copy_denoiser(t))
    return build_objective(cfg.objective.name, cfg.objective.params, teacher.denoiser, ctx)


def sweep_angles(cfg, config_path: str, overrides: list[str], run_dir: Path, angles: list[float],
                 num_samples: int | None, command: str, weights: str = "student") -> list[dict]:
    """Score the trained student in run_dir at 2 steps with the sampler [pi/2, a, 0] for each a
    (the angles mapped to the teacher's times by the objective itself); nothing is retrained and
    the run dir's card and bench.json are left as they are."""
    if cfg.objective.name not in ("scm", "tbcm"):
        raise SystemExit(f"--intermediate-angles applies to scm/tbcm presets, not {cfg.objective.name!r}")
    if not (run_dir / "run_card.json").is_file():
        raise SystemExit(f"--intermediate-angles scores a trained run: {run_dir}/run_card.json is missing")
    rows = []
    for a in angles:
        c = load_config(config_path, [*overrides, f"objective.intermediate_angle={a}"])
        times = _build_for_sampling(c).sampling_times(2)
        for r in eval_source(str(run_dir), [2], run_dir / f"eval_angle_{a:g}_{weights}", num_samples, command,
                             times=times, weights=weights):
            rows.append({**r, "intermediate_angle": a,
                         "name": f"{cfg.objective.name} ({cfg.teacher.source}, {weights}), angle {a:g}"})
    return rows


def _complete_sampling(cfg, run_dir: Path) -> None:
    """The run card keeps the training times only; add the objective's times for 1, 2 and 4
    steps (`times_by_steps`, which `fewstep eval` reads) so every step count uses the method's
    own schedule (e.g. sCM's TrigFlow angles) rather than uniform times."""
    card_path = run_dir / "run_card.json"
    card = json.loads(card_path.read_text())
    obj = _build_for_sampling(cfg)
    card["sampling"] = {**card.get("sampling", {}), **json.loads(json.dumps(obj.sampling))}
    atomic_write_json(card_path, card)


# ---- 3. evaluation --------------------------------------------------------------------------------
def eval_source(source: str, steps: list[int], out: Path, num_samples: int | None, command: str,
                guidance: float | None = None, times: list[float] | None = None,
                weights: str = "student") -> list[dict]:
    spec = EvalSpec(pipeline=source, steps=steps, protocol="digits", num_samples=num_samples, guidance=guidance,
                    metrics=("fid", "class_acc"), out=str(out), progress=False, command=command, times=times,
                    student_weights=weights)
    res = evaluate(spec)
    rows = []
    for r in res["rows"]:
        m = r.get("metrics", {})
        rows.append({"source": source, "steps": r["steps"], "fid": _val(m.get("fid")),
                     "class_acc": _val(m.get("class_acc")), "guidance": r.get("guidance"),
                     "times": r.get("times"), "num_samples": r.get("num_samples")})
    return rows


def _val(m: dict | None) -> float | None:
    """The number of one metric entry of `fewstep eval`'s results ({"value": ..., provenance})."""
    return None if m is None else float(m["value"])


def table(rows: list[dict]) -> str:
    lines = ["| model | steps | guidance | FID | class acc | samples | train min |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tm = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-"
        acc = f"{r['class_acc']:.3f}" if r.get("class_acc") is not None else "-"
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {r.get('guidance')} | {fid} | {acc} | {r.get('num_samples')} | {tm} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python eval/bench_consistency.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows: list[dict] = []
    if args.teacher:
        out = Path(args.out or f"runs/bench/teacher_{args.teacher}")
        for r in eval_source(args.teacher, [TEACHER_STEPS], out / "eval", args.num_samples, command,
                             args.teacher_guidance):
            rows.append({**r, "name": f"{args.teacher} (teacher)"})
        atomic_write_json(out / "bench.json", {"command": command, "rows": rows})
        print(table(rows))
        return 0
    if not args.config:
        raise SystemExit("--config is required (or --teacher)")
    cfg = load_config(args.config, args.overrides)
    cfg.validate()
    run_dir = Path(args.out) if args.out else cfg.run_dir()
    default_weights = "student_ema" if cfg.ema.rate > 0 else "student"
    weights = args.weights or default_weights
    if args.intermediate_angles:
        angles = [float(a) for a in args.intermediate_angles.split(",") if a.strip()]
        rows = sweep_angles(cfg, args.config, args.overrides, run_dir, angles, args.num_samples, command, weights)
        atomic_write_json(run_dir / f"bench_angles_{weights}.json",
                          {"command": command, "config": args.config, "overrides": args.overrides, "rows": rows})
        print(table(rows))
        return 0
    info: dict = {}
    if not args.eval_only:
        run = _entry_point() if args.loop in ("auto", "entry") else None
        if args.loop == "entry" and run is None:
            raise SystemExit("--loop entry: fewstep.training.run is not available")
        info = train_entry(run, cfg, run_dir) if run is not None else train_builtin(cfg, run_dir)
        print(f"trained {cfg.steps} steps in {info['train_seconds'] / 60:.1f} min ({info['loop']})", flush=True)
    else:
        card = run_dir / "run_card.json"
        if card.is_file():
            info = {"train_seconds": json.loads(card.read_text()).get("train_seconds")}
    steps = [int(s) for s in args.steps_eval.split(",") if s.strip()]
    ev = run_dir / ("eval" if weights == "student" else f"eval_{weights}")
    for r in eval_source(str(run_dir), steps, ev, args.num_samples, command, weights=weights):
        rows.append({**r, "name": f"{cfg.objective.name} ({cfg.teacher.source}, {weights})", **info})
    if not args.no_teacher:
        for r in eval_source(cfg.teacher.source, [TEACHER_STEPS], run_dir / "eval_teacher", args.num_samples, command,
                             args.teacher_guidance):
            rows.append({**r, "name": f"{cfg.teacher.source} (teacher)"})
    name = "bench.json" if weights == default_weights else f"bench_{weights}.json"
    atomic_write_json(run_dir / name, {"command": command, "config": args.config,
                                       "overrides": args.overrides, "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
