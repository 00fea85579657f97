"""Sampling time per image of MSD's smaller students against a full-size student, on the
embedded digits teacher's architecture.

    python eval/msd_sampling_time.py [--teacher digits-vp] [--images 250] [--repeats 7] [--threads 1]
        [--decoder decoders/digits_w4]

Each student is the teacher's DiT class built by `fewstep.msd.small.smaller_student` at the given
width / depth (the full-size student is a copy of the teacher); time depends on the architecture
only, not on the trained weights. For each, one-step sampling (`fewstep.samplers.sample`, times
[t, 0]) of --images images in one batch is timed, with and without the VAE decode, repeats
interleaved over the students so that load on a shared machine hits all of them alike; the median
per image is reported, with the speed-up over the full-size student. With --decoder (a `fewstep
distill-decoder` folder) each student is also timed with that small decoder in place of the VAE,
the speed-up against the full-size student with the same small decoder. Prints a markdown table and
writes it (with the command) to --out as JSON when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-vp")
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--decoder", default=None, help="a `fewstep distill-decoder` folder: also time with it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fewstep.config import TeacherConfig
    from fewstep.denoiser import copy_denoiser
    from fewstep.msd.small import smaller_student
    from fewstep.samplers import initial_noise, sample
    from fewstep.training.bundle import load_bundle

    bundle = load_bundle(TeacherConfig(source=args.teacher), "cpu")
    small_decode = None
    if args.decoder:
        from fewstep.decoder import DecoderError, load_decoder

        try:
            small_decode = load_decoder(args.decoder)
        except (DecoderError, FileNotFoundError, ValueError) as e:
            print(f"error: --decoder {args.decoder}: {e}", file=sys.stderr)
            return 2
    teacher = bundle.denoiser
    students = {"full size (copy of the teacher)": (copy_denoiser(teacher, trainable=False), {})}
    for name, w, d in (("half depth", 1.0, 0.5), ("half width", 0.5, 1.0), ("half width and depth", 0.5, 0.5)):
        den, info = smaller_student(teacher, w, d)
        den.requires_grad_(False)
        students[name] = (den, info)
    n = args.images
    noise = initial_noise((n, *bundle.latent_shape), torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(n) % (bundle.num_classes or 10)}
    times = [0.5, 0.0]  # the digits 1-step presets' conditioning time
    res = {k: {"net": [], "total": [], "small": []} for k in students}
    with torch.no_grad():
        for den, _ in students.values():  # warm-up
            bundle.decode(sample(den, noise[:8], {"class_labels": cond["class_labels"][:8]}, times))
        for _ in range(args.repeats):
            for name, (den, _) in students.items():
                t0 = time.perf_counter()
                x = sample(den, noise, cond, times)
                t1 = time.perf_counter()
                bundle.decode(x)
                t2 = time.perf_counter()
                res[name]["net"].append((t1 - t0) / n)
                res[name]["total"].append((t2 - t0) / n)
                if small_decode is not None:
                    t3 = time.perf_counter()
                    small_decode(x)
                    res[name]["small"].append((t1 - t0 + time.perf_counter() - t3) / n)
    full = next(iter(res))
    rows = []
    for name, (den, info) in students.items():
        net, tot = statistics.median(res[name]["net"]), statistics.median(res[name]["total"])
        rows.append(
            {
                "student": name,
                "parameters": sum(p.numel() for p in den.backbone.parameters()),
                "changes": info.get("changes", {}),
                "net_ms_per_image": 1e3 * net,
                "total_ms_per_image": 1e3 * tot,
                "net_speedup": statistics.median(res[full]["net"]) / net,
                "total_speedup": statistics.median(res[full]["total"]) / tot,
            }
        )
        if small_decode is not None:
            sm = statistics.median(res[name]["small"])
            rows[-1]["small_decoder_ms_per_image"] = 1e3 * sm
            rows[-1]["small_decoder_speedup"] = statistics.median(res[full]["small"]) / sm
    head = "| student | backbone parameters | network ms / image | speed-up | with VAE decode ms / image | speed-up |"
    rule = "|---|---|---|---|---|---|"
    if small_decode is not None:
        head += " with the small decoder ms / image | speed-up |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['student']} | {r['parameters']:,} | {r['net_ms_per_image']:.3f} | {r['net_speedup']:.2f}x | "
            f"{r['total_ms_per_image']:.3f} | {r['total_speedup']:.2f}x |"
        )
        if small_decode is not None:
            line += f" {r['small_decoder_ms_per_image']:.3f} | {r['small_decoder_speedup']:.2f}x |"
        lines.append(line)
    print("\n".join(lines))
    from fewstep.errors import script_command

    command = script_command("eval/msd_sampling_time.py", argv or None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"command": command, "images": n, "repeats": args.repeats, "threads": args.threads, "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
