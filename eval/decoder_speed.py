"""Per-image sampling time of a few-step student decoded by a small distilled VAE
(`fewstep distill-decoder`) or by the teacher's full VAE, against the teacher's own sampler
(DDIM, CFG in one batched pass) with the full decode.

    python eval/decoder_speed.py --student-pipeline exports/dmd2_1step_vp_tiny --full-pipeline exports/dmd2_1step_vp \
        [--teacher digits-vp] [--teacher-steps 50] [--guidance 1.5] [--images 50] [--batches 3] [--repeats 5] [--compile] [--out FILE]

The student pipelines are `fewstep export` folders (one with `--decoder`, one without), loaded by
fewstep's loader; the student samples on its run card's times. Repeats are interleaved over the
settings so that load on a shared machine hits all alike. In each repeat a setting samples
`--batches` batches of `--images` one after another, as a sampler serving a stream of requests does.
The first batch after another setting ran pays for cold caches, which the teacher's 50 network calls
per batch spread thin and a 1-step student's single call does not: it is reported apart ("first
batch"), and the steady state is the mean over the later batches. The median per image is reported
with and without the decode, and the teacher's steady time over each setting's (steady and first
batch). `--compile` compiles every network of every setting alike
(the three backbones and the three VAE decoders, `torch.compile` through `precision.compile`'s guard,
eager where one does not compile), after a longer warm-up that pays the compilation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student-pipeline", required=True, help="export with the small decoder")
    ap.add_argument("--full-pipeline", required=True, help="export of the same student with the full VAE")
    ap.add_argument("--teacher", default="digits-vp")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--batches", type=int, default=3, help="consecutive batches per setting and repeat (at least 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile every backbone and decoder alike")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.batches < 2:
        ap.error(f"--batches must be at least 2 (the first batch is reported apart), got {args.batches}")
    torch.set_num_threads(args.threads)

    from fewstep.pipeline_teacher import load_teacher
    from fewstep.samplers import initial_noise, sample

    teacher = load_teacher(args.teacher)
    small = load_teacher(args.student_pipeline)
    full = load_teacher(args.full_pipeline)
    card = (
        json.loads((Path(args.full_pipeline) / "fewstep_card.json").read_text())
        if (Path(args.full_pipeline) / "fewstep_card.json").is_file()
        else {}
    )
    s_times = (card.get("sampling") or {}).get("times") or [0.5, 0.0]
    t_times = teacher.path.sampling_times(args.teacher_steps).tolist()
    n = args.images
    noise = initial_noise((n, *teacher.latent_shape), torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(n) % 10}
    settings = {
        f"teacher, {args.teacher_steps} DDIM steps, CFG {args.guidance:g}, full VAE": (
            teacher.denoiser,
            t_times,
            args.guidance,
            teacher.decode,
        ),
        f"student, {len(s_times) - 1} step, full VAE": (full.denoiser, s_times, 1.0, full.decode),
        f"student, {len(s_times) - 1} step, small VAE ({type(small.vae).__name__})": (
            small.denoiser,
            s_times,
            1.0,
            small.decode,
        ),
    }
    if args.compile:
        from fewstep.training.compile import compile_backbones, compile_module

        compile_backbones([teacher.denoiser, full.denoiser, small.denoiser])
        for m in (teacher, full, small):
            compile_module(m.vae.decoder)
    res = {k: {"net": [], "total": [], "first": []} for k in settings}
    with torch.no_grad():
        for den, times, g, dec in settings.values():  # warm-up (and compilation, at the timed batch size)
            for m in (n, n) if args.compile else (5,):
                dec(sample(den, noise[:m], {"class_labels": cond["class_labels"][:m]}, times, g))
        for _ in range(args.repeats):
            for name, (den, times, g, dec) in settings.items():
                net, total = [], []
                for _ in range(args.batches):
                    t0 = time.perf_counter()
                    x = sample(den, noise, cond, times, g)
                    t1 = time.perf_counter()
                    dec(x)
                    t2 = time.perf_counter()
                    net.append((t1 - t0) / n)
                    total.append((t2 - t0) / n)
                res[name]["first"].append(total[0])
                res[name]["net"].append(statistics.mean(net[1:]))
                res[name]["total"].append(statistics.mean(total[1:]))
    names = list(settings)
    teacher_total = statistics.median(res[names[0]]["total"])
    rows = []
    for name in names:
        net, tot = statistics.median(res[name]["net"]), statistics.median(res[name]["total"])
        first = statistics.median(res[name]["first"])
        rows.append(
            {
                "setting": name,
                "net_ms_per_image": 1e3 * net,
                "total_ms_per_image": 1e3 * tot,
                "decode_ms_per_image": 1e3 * (tot - net),
                "first_batch_total_ms_per_image": 1e3 * first,
                "teacher_over_this": teacher_total / tot,
                "teacher_over_this_first_batch": teacher_total / first,
            }
        )
    lines = [
        f"batch {n}, {args.threads} thread(s), median of {args.repeats} interleaved repeats of {args.batches} "
        "consecutive batches; steady state = mean of batches 2 on"
        + (", every network compiled" if args.compile else ""),
        "| setting | network ms / image | decode ms / image | total ms / image | teacher (with decode) / this "
        "| first batch: total ms / image | teacher / this, first batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['net_ms_per_image']:.3f} | {r['decode_ms_per_image']:.3f} | "
            f"{r['total_ms_per_image']:.3f} | {r['teacher_over_this']:.1f}x | "
            f"{r['first_batch_total_ms_per_image']:.3f} | {r['teacher_over_this_first_batch']:.1f}x |"
        )
    print("\n".join(lines))
    from fewstep.errors import script_command

    command = script_command("eval/decoder_speed.py", argv)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
