"""Training throughput and memory of the entry point.

    nice -n 5 python eval/bench_train.py throughput [--steps 30] [--processes 1 2] [--out runs/bench_train]
    nice -n 5 python eval/bench_train.py lora [--steps 10]

throughput: for every registered objective that is importable, its digits VP preset
(configs/digits/<...>_vp.yaml, or configs/digits/dsm.yaml) is trained for --steps steps through
`fewstep.training.run`, once per process count (1: a subprocess; 2: torchrun, gloo on CPU), each
in a fresh process so that peak memory is its own. Seconds per iteration are measured from the
metrics records (first record excluded: start-up), peak memory is the process's peak resident set
(and CUDA peak when a GPU is used), both for process 0.

lora: trainable parameters, optimizer-state bytes and measured peak resident memory of a dsm
student as a full copy vs LoRA on the embedded teacher's DiT (rank 16) and on tiny models of the
real families (tests/tiny.py; rank 2, since their layers are only 8-32 wide).

The embedded teacher is loaded with `fewstep.pipeline_teacher.load_teacher("digits-vp")`; where its
weights are not in the tree yet, the same DiT architecture (fewstep/digits/models.py) is built
with random weights, which trains at the same speed and memory. The table says which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # objective -> digits preset (VP teacher)
    "dsm": "digits/dsm.yaml",
    "dmd": "digits/dmd_1step_vp.yaml",
    "dmd2": "digits/dmd2_1step_vp.yaml",
    "decoupled_dmd": "digits/ddmd_4step_vp.yaml",
    "lcm": "digits/lcm_4step_vp.yaml",
    "scm": "digits/scm_2step_vp_secant.yaml",
    "tbcm": "digits/tbcm_2step_vp_secant.yaml",
    "tdm": "digits/tdm_4step_vp.yaml",
}


# ---- the teacher ------------------------------------------------------------------------------
def digits_bundle(real_data: bool):
    """(bundle, "trained" | "random init"): the embedded VP teacher, or its architecture."""
    import torch

    from fewstep.training.bundle import TeacherBundle, bundle_from_teacher

    try:
        from fewstep.pipeline_teacher import load_teacher

        t = load_teacher("digits-vp")
        return bundle_from_teacher(t, "digits-vp", "cpu"), "trained"
    except Exception:
        pass
    from diffusers import DDIMScheduler

    from fewstep.denoiser import Denoiser
    from fewstep.digits.models import LATENT_SHAPE, NULL_CLASS, build_dit
    from fewstep.paths import path_from_scheduler_config

    torch.manual_seed(0)
    bb = build_dit()
    path = path_from_scheduler_config(dict(DDIMScheduler(timestep_spacing="trailing").config))
    den = Denoiser(bb, path)
    real = None
    if real_data:

        def real():
            g = torch.Generator().manual_seed(0)
            return torch.randn(1797, *LATENT_SHAPE, generator=g), torch.arange(1797) % 10

    return TeacherBundle(
        denoiser=den,
        latent_shape=LATENT_SHAPE,
        source="digits-vp (architecture)",
        family="dit",
        num_classes=10,
        null_class=NULL_CLASS,
        real_data=real,
    ), "random init"


# ---- one measured run (runs inside the worker process) ------------------------------------------
def worker(objective: str, steps: int, out: Path) -> None:
    import torch

    from fewstep.config import load_config
    from fewstep.training import run
    from fewstep.training.memory import current_rss_bytes, peak_memory_bytes

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    preset = ROOT / "configs" / PRESETS.get(objective, "-")
    over = [
        f"output_dir={out}",
        "overwrite=true",
        f"steps={steps}",
        "log.every=1",
        "log.trackers=[]",
        "log.progress=false",
        "checkpoint.every=0",
        "log.sample_every=0",
        "log.sample_count=4",
    ]
    if preset.is_file():
        cfg = load_config(preset, over)
    else:  # no digits preset yet: the objective's defaults
        preset = None
        cfg = load_config(None, over + [f"objective.name={objective}"])
    bundle, kind = digits_bundle(cfg.data.real_data)
    base = current_rss_bytes()
    res = run(cfg, teacher=bundle)
    peak = peak_memory_bytes()
    recs = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    t = [r["time_s"] for r in recs]
    sec_per_it = (t[-1] - t[0]) / max(1, len(t) - 1)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "bench.json").write_text(
            json.dumps(
                {
                    "objective": objective,
                    "preset": str(preset.relative_to(ROOT / "configs")) if preset else "(defaults)",
                    "teacher": kind,
                    "batch_size": cfg.data.batch_size,
                    "processes": int(os.environ.get("WORLD_SIZE", "1")),
                    "steps": steps,
                    "sec_per_it": sec_per_it,
                    "rss_peak": peak["rss_peak"],
                    "rss_before": base,
                    "cuda_peak": peak.get("cuda_peak"),
                    "phases_per_step": sum(1 for k in recs[-1] if k.startswith("loss/")),
                }
            )
        )


def _launch(objective: str, steps: int, processes: int, out: Path) -> dict | None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": os.environ.get("ACCELERATE_USE_CPU", "1"),
        "PYTHONPATH": str(ROOT),
    }
    args = [str(Path(__file__).resolve()), "worker", "--objective", objective, "--steps", str(steps), "--out", str(out)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if p.returncode != 0:
        print(f"  {objective} x{processes}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads((out / "bench.json").read_text())


def throughput(args) -> None:
    from fewstep.objectives.registry import REGISTRY

    rows = []
    for name in REGISTRY:
        for n in args.processes:
            t0 = time.time()
            r = _launch(name, args.steps, n, Path(args.out) / f"{name}_x{n}")
            if r is not None:
                r["wall_s"] = time.time() - t0
                rows.append(r)
                print(f"{name} x{n}: {r['sec_per_it']:.3f} s/it, peak RSS {r['rss_peak'] / 2**20:.0f} MiB", flush=True)
    print()
    print("| objective | preset | teacher | global batch | processes | s / iteration | peak RSS, process 0 (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['objective']} | {r['preset']} | {r['teacher']} | {r['batch_size']} | {r['processes']} | "
            f"{r['sec_per_it']:.3f} | {r['rss_peak'] / 2**20:.0f} |"
        )


# ---- full vs LoRA ------------------------------------------------------------------------------
def lora_worker(family: str, mode: str, steps: int, out: Path) -> None:
    import torch

    from fewstep.config import load_config
    from fewstep.training import run
    from fewstep.training.lora import make_factories
    from fewstep.training.memory import current_rss_bytes, peak_memory_bytes

    torch.set_num_threads(1)
    if family == "digits":
        bundle, kind = digits_bundle(False)
    else:
        sys.path.insert(0, str(ROOT))  # the tests package (tiny models of every family)
        from tests.dist.bundles import tiny_bundle

        bundle, kind = tiny_bundle(family), "tiny random"
    lora = mode == "lora"
    over = [
        f"output_dir={out}",
        "overwrite=true",
        f"steps={steps}",
        "log.every=1",
        "log.trackers=[]",
        "log.progress=false",
        "checkpoint.every=0",
        "log.sample_every=0",
        "log.sample_count=2",
        "ema.rate=0",
        "data.real_data=false",
        "objective.teacher_steps=2",
        f"lora.student={str(lora).lower()}",
        f"lora.rank={16 if family == 'digits' else 2}",
        f"lora.alpha={16 if family == 'digits' else 2}",
        "data.batch_size=8",
    ]
    if bundle.text:
        over.append(f"data.prompts={ROOT / 'configs' / 'prompts' / 'example_prompts.txt'}")
    cfg = load_config(ROOT / "configs" / "digits" / "dsm.yaml", over)
    make_student, _ = make_factories(cfg.lora, family=bundle.family)
    student = make_student(bundle.denoiser)
    total = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    del student
    base = current_rss_bytes()
    res = run(cfg, teacher=bundle)
    peak = peak_memory_bytes()
    recs = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    (out / "bench.json").write_text(
        json.dumps(
            {
                "family": family,
                "mode": mode,
                "teacher": kind,
                "params": total,
                "trainable": trainable,
                "state_bytes": trainable * 16,  # fp32 weight + grad + 2 AdamW moments of what trains
                "rss_delta": peak["rss_peak"] - base,
                "cuda_peak": peak.get("cuda_peak"),
                "sec_per_it": (recs[-1]["time_s"] - recs[0]["time_s"]) / max(1, len(recs) - 1),
            }
        )
    )


def lora_table(args) -> None:
    rows = []
    for fam in ["digits", "sd15", "sdxl", "pixart", "sd3", "flux"]:
        for mode in ("full", "lora"):
            out = Path(args.out) / f"lora_{fam}_{mode}"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "lora-worker",
                "--family",
                fam,
                "--mode",
                mode,
                "--steps",
                str(args.steps),
                "--out",
                str(out),
            ]
            p = subprocess.run(
                cmd,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                cwd=str(ROOT),
            )
            if p.returncode != 0:
                print(f"{fam} {mode}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads((out / "bench.json").read_text()))
            r = rows[-1]
            print(
                f"{fam} {mode}: trainable {r['trainable']} / {r['params']}, RSS delta {r['rss_delta'] / 2**20:.1f} MiB",
                flush=True,
            )
    print()
    print(
        "| teacher | student (LoRA rank) | parameters | trainable | weights+grads+AdamW of trainable (MiB) | "
        "peak RSS above start (MiB) | s / iteration |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "digits DiT (" + r["teacher"] + ")" if r["family"] == "digits" else f"tiny {r['family']}"
        mode = r["mode"] if r["mode"] == "full" else f"lora ({16 if r['family'] == 'digits' else 2})"
        print(
            f"| {name} | {mode} | {r['params']:,} | {r['trainable']:,} ({100 * r['trainable'] / r['params']:.1f}%) | "
            f"{r['state_bytes'] / 2**20:.2f} | {r['rss_delta'] / 2**20:.1f} | {r['sec_per_it']:.3f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    t.add_argument("--out", default="runs/bench_train")
    lo = sub.add_parser("lora")
    lo.add_argument("--steps", type=int, default=10)
    lo.add_argument("--out", default="runs/bench_train")
    w = sub.add_parser("worker")
    w.add_argument("--objective", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--out", required=True)
    lw = sub.add_parser("lora-worker")
    lw.add_argument("--family", required=True)
    lw.add_argument("--mode", choices=["full", "lora"], required=True)
    lw.add_argument("--steps", type=int, required=True)
    lw.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "throughput":
        throughput(a)
    elif a.cmd == "lora":
        lora_table(a)
    elif a.cmd == "worker":
        worker(a.objective, a.steps, Path(a.out))
    else:
        lora_worker(a.family, a.mode, a.steps, Path(a.out))


if __name__ == "__main__":
    main()
