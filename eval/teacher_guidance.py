"""Sweep a digits teacher's guidance scale with the judge panel and name the scale that minimises
the panel's median FID and the one that maximises its median class accuracy.

    python eval/teacher_guidance.py --teacher digits-vp --scales 1 1.25 1.5 2 3 --num-samples 500
    python eval/teacher_guidance.py --teacher digits-flow --scales 1 1.25 1.5 2 --num-samples 500 --write-card

Each scale is one `fewstep eval` run (protocol digits, metric "panel", the teacher's sampler at
--steps steps) in <out>/w<scale>. With --write-card the result (both scales, every row, the
command and the sample count) goes into the teacher's card, fewstep/digits/weights/teachers.json,
under "guidance_choice", and the card's recommended "guidance" (the default of every command)
becomes the lowest-FID scale (with "guidance_reason" saying so).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import sys
from pathlib import Path

import torch

KINDS = {"digits-vp": "vp", "digits-flow": "flow"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", required=True, choices=sorted(KINDS))
    p.add_argument("--scales", type=float, nargs="+", required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="default runs/teacher_guidance/<teacher>")
    p.add_argument("--write-card", action="store_true", help="store the result in the teacher's card")
    args = p.parse_args(argv)
    bad = [w for w in args.scales if not math.isfinite(w) or w < 0]
    if bad:
        p.error(f"--scales: every scale must be a finite number >= 0, got {bad}")
    torch.set_num_threads(args.threads)
    from fewstep.errors import script_command

    command = script_command("eval/teacher_guidance.py", argv)
    from fewstep.evaluation import EvalSpec, evaluate

    out = args.out or Path("runs/teacher_guidance") / args.teacher
    rows = []
    for w in args.scales:
        res = evaluate(
            EvalSpec(
                pipeline=args.teacher,
                steps=[args.steps],
                num_samples=args.num_samples,
                seed=args.seed,
                metrics=("panel",),
                guidance=w,
                bootstrap=args.bootstrap,
                out=str(out / f"w{w:g}"),
                progress=False,
                command=command,
            )
        )
        pan = res["rows"][0]["metrics"]["panel"]
        members = {m["name"]: round(m["fid"], 3) for m in pan["members"]}
        rows.append(
            {
                "guidance": w,
                "fid_median": round(pan["panel"]["fid_median"], 3),
                "fid_range": [round(v, 3) for v in pan["panel"]["fid_range"]],
                "fid_median_ci": [round(v, 3) for v in pan["panel"]["fid_median_ci"]],
                "class_acc_median": round(pan["panel"]["class_acc_median"], 4),
                "fid_members": members,
            }
        )
        print(
            f"# w={w:g}: panel FID median {rows[-1]['fid_median']:.2f} {rows[-1]['fid_range']}, "
            f"class acc median {rows[-1]['class_acc_median']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    best_fid = min(rows, key=lambda r: r["fid_median"])["guidance"]
    best_acc = max(rows, key=lambda r: (r["class_acc_median"], -r["guidance"]))["guidance"]
    lines = [
        f"`{command}`",
        "",
        (
            f"{args.teacher}, {args.steps} steps, {args.num_samples} samples per scale "
            f"(labels i % 10, seed {args.seed}); FID against all 1,797 real digits."
        ),
        "",
        "| w | panel FID median [range] | median 95% CI | pixel-pca64 FID | class acc (panel median) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['guidance']:g} | {r['fid_median']:.2f} [{r['fid_range'][0]:.2f}, {r['fid_range'][1]:.2f}] | "
            f"{r['fid_median_ci'][0]:.2f}-{r['fid_median_ci'][1]:.2f} | "
            f"{r['fid_members'].get('fewstep-digits-pixel-pca64', float('nan')):.2f} | "
            f"{100 * r['class_acc_median']:.1f}% |"
        )
    lines += [
        "",
        (
            f"lowest panel FID at w = {best_fid:g}; highest class accuracy at w = {best_acc:g} "
            "(ties: the smaller scale)."
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "guidance.md").write_text(text)
    if args.write_card:
        from fewstep.digits.data import WEIGHTS_DIR

        cards_file = WEIGHTS_DIR / "teachers.json"
        cards = json.loads(cards_file.read_text())
        cards[KINDS[args.teacher]]["guidance_choice"] = {
            "command": command,
            "num_samples": args.num_samples,
            "steps": args.steps,
            "seed": args.seed,
            "measure": "median over the judge panel (fewstep.digits.panel) of FID against all 1,797 real digits, "
            "and of class accuracy",
            "lowest_fid": best_fid,
            "highest_class_acc": best_acc,
            "rows": rows,
        }
        card = cards[KINDS[args.teacher]]
        if card.get("guidance") != best_fid:
            print(f"recommended guidance {card.get('guidance')} -> {best_fid:g} (the lowest panel FID)")
        card["guidance"] = best_fid
        card["guidance_reason"] = (
            f"the recommended scale (the default of every command) is the panel's lowest-FID scale in "
            f"guidance_choice ({best_fid:g}); class accuracy is highest at {best_acc:g}"
        )
        tmp = cards_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cards, indent=2) + "\n")
        tmp.replace(cards_file)
        print(f"wrote guidance_choice into {cards_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
