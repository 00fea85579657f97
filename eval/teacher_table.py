"""Score the embedded digits teachers: FID (digits judge, against all 1,797 real digits) and class
accuracy at several step counts, printed as a markdown table.

    # choose the guidance scale on a few hundred samples (50 steps)
    python eval/teacher_table.py --kind vp --sweep 1.5 2 3 4 --n 300 --steps 50
    # the table: 2,000 balanced samples, fixed seed, fixed guidance
    python eval/teacher_table.py --kind vp flow --guidance 2 --n 2000 --steps 1 2 4 8 25 50 --write-card

Sampling is fewstep's own teacher sampler (DDIM for VP, Euler for flow, the teacher's
`sampling_times(n)` schedule) with classifier-free guidance, then the VAE decoder. Labels are
balanced (i % 10) and the noise of sample i is the same at every step count.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads are slow on a shared machine

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from fewstep.digits.data import NUM_CLASSES, WEIGHTS_DIR  # noqa: E402
from fewstep.digits.embedded_teachers import load_digits_teacher  # noqa: E402
from fewstep.errors import script_command  # noqa: E402
from fewstep.evaluation.digits import digits_scores  # noqa: E402
from fewstep.samplers import initial_noise, sample  # noqa: E402


def generate(
    teacher, n: int, steps: int, guidance: float, seed: int, batch: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """n decoded samples (n, 1, 32, 32) in [-1, 1] with balanced labels, and the labels."""
    labels = torch.arange(n) % NUM_CLASSES
    noise = initial_noise((n, *teacher.latent_shape), torch.Generator().manual_seed(seed))
    times = teacher.path.sampling_times(steps)
    out = []
    for i in range(0, n, batch):
        y = labels[i : i + batch]
        z0 = sample(teacher.denoiser, noise[i : i + batch], {"class_labels": y}, times, guidance=guidance)
        out.append(teacher.decode(z0))
    return torch.cat(out), labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", nargs="+", choices=["vp", "flow"], default=["vp", "flow"])
    p.add_argument("--pipeline-dir", default=None, help="score another DiTPipeline folder (one --kind only)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (Imagen form u + w (c - u))")
    p.add_argument("--sweep", type=float, nargs="+", default=None, help="guidance scales to compare instead")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25, 50])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-card", action="store_true", help="store the scores in weights/teachers.json")
    args = p.parse_args(argv)
    if (args.guidance is None) == (args.sweep is None):
        p.error("give exactly one of --guidance or --sweep")
    if args.pipeline_dir and len(args.kind) != 1:
        p.error("--pipeline-dir needs exactly one --kind")
    if args.write_card and (args.sweep or args.pipeline_dir):
        p.error("--write-card stores the table of the shipped teachers at one guidance scale")
    torch.set_num_threads(args.threads)
    command = script_command("eval/teacher_table.py", argv)

    rows = []
    for kind in args.kind:
        teacher = load_digits_teacher(kind, pipeline_dir=args.pipeline_dir)
        for w in args.sweep or [args.guidance]:
            for steps in args.steps:
                t0 = time.time()
                images, labels = generate(teacher, args.n, steps, w, args.seed)
                s = digits_scores(images, labels)
                rows.append(
                    {
                        "kind": kind,
                        "guidance": w,
                        "steps": steps,
                        "fid": s["fid"],
                        "class_acc": s["class_acc"],
                        "n": s["n"],
                        "seconds": round(time.time() - t0, 1),
                    }
                )
                print(
                    f"# {kind} w={w} steps={steps}: fid {s['fid']:.3f} class_acc {s['class_acc']:.4f} "
                    f"({time.time() - t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )

    print(f"`{command}`\n")
    print("| teacher | sampler | guidance | steps (NFE) | FID (judge) | class acc | n |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sampler = "DDIM" if r["kind"] == "vp" else "Euler"
        nfe = r["steps"] * (2 if r["guidance"] != 1 else 1)
        print(
            f"| {r['kind']} | {sampler} | {r['guidance']:g} | {r['steps']} ({nfe}) | {r['fid']:.2f} | "
            f"{100 * r['class_acc']:.1f}% | {r['n']} |"
        )

    if args.write_card:
        cards_file = WEIGHTS_DIR / "teachers.json"
        cards = json.loads(cards_file.read_text())
        for kind in args.kind:
            cards[kind]["guidance"] = args.guidance
            cards[kind]["scores"] = {
                "command": command,
                "judge": "fewstep.evaluation.digits.digits_scores",
                "seed": args.seed,
                "rows": [{k: r[k] for k in ("steps", "fid", "class_acc", "n")} for r in rows if r["kind"] == kind],
            }
        cards_file.write_text(json.dumps(cards, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
