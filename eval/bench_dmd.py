"""Benchmarks of the DMD family (DMD2, Decoupled DMD) on the embedded digits teachers, and the
memory saving of shared-base mode.

    python eval/bench_dmd.py train --config configs/digits/dmd2_1step_vp.yaml [key=value ...]
    python eval/bench_dmd.py train --config configs/digits/dmd2_4step_flow.yaml --eval-only
    python eval/bench_dmd.py teacher --teacher digits-vp          # the teacher at 50 steps
    python eval/bench_dmd.py memory                                # full copies vs LoRA vs shared base

train, top to bottom:
  1. load the preset (`fewstep.config.load_config`, `key=value` overrides after it);
  2. train with the entry point `fewstep.training.run` in this process; the wall time of the
     whole run (teacher loading, training, final grid and weights) is recorded;
  3. evaluate the student at its own step count (its EMA weights when ema.rate > 0) and the
     teacher at 50 steps with `fewstep.evaluation` on the digits protocol (2,000 samples, labels
     i % 10, seed 0, FID on the digits-judge features against the 1,797 real digits, judge class
     accuracy); the teacher samples with the preset's real-score CFG (objective.guidance, chosen
     as the teacher's best scale); its row is reused from runs/bench/teacher_<source>_w<w>_n<n>/
     when that exists;
  4. print a markdown table (with the student/teacher FID ratio) and write <out>/bench.json.

memory: for each backbone (the digits DiT, a small SDXL-class UNet) and each mode (full copies of
the teacher; LoRA student and fake score as separate modules on shared frozen tensors, the entry
point's lora.student / lora.fake; shared-base mode, one backbone with adapters switched per role)
a fresh process builds DMD2, runs a few training steps with AdamW, and reports the parameter
bytes held (every distinct tensor of every role, the teacher included) and the peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

TEACHER_STEPS = 50


# ---- evaluation ---------------------------------------------------------------------------------
def _val(m: dict | None) -> float | None:
    """The number of one metric entry of `fewstep eval`'s results ({"value": ..., provenance})."""
    return None if m is None else float(m["value"])


def evaluate_source(source: str, steps: int, out: Path, num_samples: int | None, command: str,
                    guidance: float | None = None, weights: str = "student") -> dict:
    """One row {"fid", "class_acc", ...} of `fewstep.evaluation` on the digits protocol."""
    from fewstep.evaluation import EvalSpec, evaluate

    spec = EvalSpec(pipeline=source, steps=[steps], protocol="digits", num_samples=num_samples,
                    metrics=("fid", "class_acc"), out=str(out), progress=False, command=command,
                    guidance=guidance, student_weights=weights)
    t0 = time.perf_counter()
    res = evaluate(spec)
    r = res["rows"][0]
    m = r.get("metrics", {})
    return {"source": source, "steps": r["steps"], "fid": _val(m.get("fid")), "class_acc": _val(m.get("class_acc")),
            "guidance": r.get("guidance"), "times": r.get("times"), "num_samples": r.get("num_samples"),
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def teacher_row(source: str, num_samples: int | None, command: str, guidance: float | None,
                refresh: bool = False) -> dict:
    """The teacher's 50-step row at CFG `guidance` (None: its card's), computed once per protocol
    and kept under runs/bench."""
    out = Path("runs/bench") / f"teacher_{Path(source).name}_w{guidance}_n{num_samples or 2000}"
    cached = out / "row.json"
    if cached.is_file() and not refresh:
        return {**json.loads(cached.read_text()), "reused": str(cached)}
    row = evaluate_source(source, TEACHER_STEPS, out / "eval", num_samples, command, guidance=guidance)
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(row, indent=1))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | steps | FID | class acc | train wall (min) |", "|---|---|---|---|---|"]
    for r in rows:
        tm = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-"
        acc = f"{r['class_acc']:.3f}" if r.get("class_acc") is not None else "-"
        fid = f"{r['fid']:.2f}" if r.get("fid") is not None else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {fid} | {acc} | {tm} |")
    return "\n".join(lines)


def cmd_train(args, command: str) -> int:
    from fewstep.config import load_config
    from fewstep.training import run

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs/bench") / Path(args.config).stem
    cfg.output_dir = str(run_dir)
    cfg.validate()
    info: dict = {}
    if not args.eval_only:
        cfg.overwrite = True
        t0 = time.perf_counter()
        run(cfg)
        info["train_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"trained {cfg.steps} steps in {info['train_seconds'] / 60:.1f} min", flush=True)
    else:
        card = json.loads((run_dir / "run_card.json").read_text())
        info["train_seconds"] = card.get("wall_time_s")
    card = json.loads((run_dir / "run_card.json").read_text())
    n_steps = len(card["sampling"]["times"]) - 1
    weights = args.weights or ("student_ema" if cfg.ema.rate > 0 else "student")
    rows = [{**evaluate_source(str(run_dir), n_steps, run_dir / "eval", args.num_samples, command, weights=weights),
             "name": f"{cfg.objective.name} ({cfg.teacher.source}, {weights})", **info}]
    if not args.no_teacher:
        w = args.teacher_guidance if args.teacher_guidance is not None else cfg.objective.params.get("guidance")
        rows.append({**teacher_row(cfg.teacher.source, args.num_samples, command, w),
                     "name": f"{cfg.teacher.source} (teacher, CFG {w})"})
        s, t = rows[0], rows[1]
        if s["fid"] is not None and t["fid"]:
            print(f"student/teacher FID ratio {s['fid'] / t['fid']:.3f}; class accuracy difference "
                  f"{100 * (s['class_acc'] - t['class_acc']):+.1f} points", flush=True)
    (run_dir / "bench.json").write_text(json.dumps({"command": command, "config": args.config,
                                                    "overrides": args.overrides, "rows": rows}, indent=1))
    print(table(rows))
    return 0


def cmd_teacher(args, command: str) -> int:
    row = teacher_row(args.teacher, args.num_samples, command, args.guidance, refresh=True)
    print(table([{**row, "name": f"{args.teacher} (teacher)"}]))
    return 0


# ---- memory -------------------------------------------------------------------------------------
def _sdxl_class_unet():
    """A small UNet2DConditionModel with SDXL's structure (no attention in the first block, two
    cross-attention blocks with linear projections, text_time added conditions), ~1/100 the width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=256,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=64 + 6 * 32, norm_num_groups=32)


def _memory_child(backbone: str, mode: str, steps: int, batch: int, rank: int) -> dict:
    """Runs in its own process: build DMD2 in `mode`, train `steps` steps, measure."""
    from types import SimpleNamespace

    from fewstep.denoiser import Denoiser
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.paths import VPPath
    from fewstep.training.lora import lora_targets, make_factories

    torch.manual_seed(0)
    path = VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    if backbone == "digits-dit":
        try:
            from fewstep.pipeline_teacher import load_teacher

            teacher = load_teacher("digits-vp").denoiser
            source = "digits-vp teacher"
        except Exception:  # the embedded weights are not there: same architecture, random weights
            from fewstep.digits.models import build_dit

            teacher = Denoiser(build_dit(), path)
            source = "digits DiT architecture (random weights)"
        shape = (4, 8, 8)

        def cond(b):
            return {"class_labels": torch.arange(b) % 10}
    else:
        teacher = Denoiser(_sdxl_class_unet(), path, zero_null=True)
        source = "SDXL-class UNet2DConditionModel (random weights)"
        shape = (4, 32, 32)

        def cond(b):
            return {"encoder_hidden_states": torch.randn(b, 8, 256), "text_embeds": torch.randn(b, 64),
                    "time_ids": torch.tensor([256.0, 256, 0, 0, 256, 256]).expand(b, 6).clone()}
    teacher.requires_grad_(False)
    rss_teacher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the same adapter targets in both LoRA modes: the entry point's family default
    targets = lora_targets(teacher.backbone)
    lora = SimpleNamespace(student=mode == "lora", fake=mode == "lora", rank=rank, alpha=float(rank), dropout=0.0,
                           target_modules=targets)
    make_student, make_copy = make_factories(lora)
    ctx = BuildContext(latent_shape=shape, num_classes=10 if backbone == "digits-dit" else None, lora=lora,
                       make_student=make_student, make_copy=make_copy)
    obj = build_objective("dmd2", {"guidance": 2.0, "shared_base": mode == "shared"}, teacher, ctx)
    opts = {g: torch.optim.AdamW(trainable_parameters(obj, g), lr=1e-5) for g in obj.groups}
    seen, held, trainable = set(), 0, 0
    for net in list(obj.nets.values()) + [teacher]:
        for m in (net, getattr(net, "backbone", None)):
            for p in (m.parameters() if m is not None else []):
                if id(p) not in seen:
                    seen.add(id(p))
                    held += p.numel() * p.element_size()
                    trainable += p.numel() * p.element_size() if p.requires_grad else 0
    t0 = time.perf_counter()
    for step in range(steps):
        batch_d = {"cond": cond(batch), "shape": (batch, *shape)}
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, batch_d, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    return {"backbone": backbone, "source": source, "mode": mode, "lora_rank": rank if mode != "full" else None,
            "param_bytes": held, "trainable_bytes": trainable,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_teacher_bytes": rss_teacher, "steps": steps, "batch": batch,
            "seconds_per_step": round((time.perf_counter() - t0) / steps, 3)}


def cmd_memory(args, command: str) -> int:
    if args.child:
        b, mode = args.child.split(":")
        print("RESULT " + json.dumps(_memory_child(b, mode, args.steps, args.batch, args.rank[b])), flush=True)
        return 0
    rows = []
    for b in ("digits-dit", "sdxl-class"):
        for mode in ("full", "lora", "shared"):
            cmd = [sys.executable, __file__, "memory", "--child", f"{b}:{mode}", "--steps", str(args.steps),
                   "--batch", str(args.batch), "--rank-digits", str(args.rank["digits-dit"]),
                   "--rank-sdxl", str(args.rank["sdxl-class"])]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"memory child {b}:{mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[7:]))
            print(json.dumps(rows[-1]), flush=True)
    mib = 2**20
    lines = ["| backbone | mode | LoRA rank | parameter MiB held | trainable MiB | peak RSS MiB | RSS above teacher MiB "
             "| s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['mode']} | {r['lora_rank'] or '-'} | {r['param_bytes'] / mib:.1f} | "
                     f"{r['trainable_bytes'] / mib:.1f} | {r['peak_rss_bytes'] / mib:.0f} | "
                     f"{(r['peak_rss_bytes'] - r['rss_after_teacher_bytes']) / mib:.0f} | {r['seconds_per_step']} |")
    print("\n".join(lines))
    out_dir = Path(args.out or "runs/bench/dmd_memory")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a preset with the entry point, then score student and teacher")
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    t.add_argument("--out", default=None, help="run dir (default runs/bench/<preset>)")
    t.add_argument("--eval-only", action="store_true")
    t.add_argument("--no-teacher", action="store_true")
    t.add_argument("--num-samples", type=int, default=None, help="override the protocol's 2,000 (tuning only)")
    t.add_argument("--weights", choices=("student", "student_ema"), default=None,
                   help="which final weights to score (default: student_ema when ema.rate > 0)")
    t.add_argument("--teacher-guidance", type=float, default=None,
                   help="the teacher's CFG for its 50-step row (default: the preset's objective.guidance, the "
                        "real score's scale)")
    e = sub.add_parser("teacher", help="score a digits teacher at 50 steps")
    e.add_argument("--teacher", default="digits-vp")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the teacher card's)")
    e.add_argument("--num-samples", type=int, default=None)
    m = sub.add_parser("memory", help="shared-base memory saving")
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--rank-digits", type=int, default=16)
    m.add_argument("--rank-sdxl", type=int, default=32)
    m.add_argument("--out", default=None)
    m.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for q in (t, e, m):
        q.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared machine oversubscribes)")
    args, extra = p.parse_known_args(argv)  # key=value overrides may come after the options too
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.cmd != "train"):
        p.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if args.cmd == "train":
        args.overrides = list(args.overrides) + extra
    if args.cmd == "memory":
        args.rank = {"digits-dit": args.rank_digits, "sdxl-class": args.rank_sdxl}
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads if args.cmd != "memory" else 1)
    command = "python eval/bench_dmd.py " + " ".join(shlex.quote(a) for a in argv)
    return {"train": cmd_train, "teacher": cmd_teacher, "memory": cmd_memory}[args.cmd](args, command)


if __name__ == "__main__":
    sys.exit(main())
