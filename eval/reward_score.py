"""The reward of a Flash-DMD run's samples, measured on a fixed set rather than read off the training
log (which logs one batch every `log.every` steps and swings with it).

Every run samples the same noise seeds and class labels (labels cycle 0..9); the reward (default
`digits_class`: log p of the requested class under the digits reward classifier, not a judge) is
averaged over the samples, with a 95% bootstrap interval, and each run after the first is compared
with the first on the same samples (paired bootstrap of the difference). The reward classifier's own
accuracy on the requested class is printed beside it.

    python eval/reward_score.py --run runs/flash_distill_only --run runs/flash_with_reward \
        [--weights student_ema] [--steps 4] [--num-samples 1000] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--run", action="append", required=True, help="a training run dir (repeat; the first is the baseline)"
    )
    ap.add_argument("--weights", default="student_ema", choices=("student", "student_ema"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward", default="digits_class")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from fewstep.errors import UserError
    from fewstep.evaluation.panel import mean_ci
    from fewstep.evaluation.sources import load_source
    from fewstep.objectives.rewards import make_reward

    for run in args.run:
        if not Path(run).is_dir():
            raise UserError(f"--run {run}: no such run folder")
    reward = make_reward(args.reward, None)
    n = int(args.num_samples)
    labels = torch.arange(n) % 10
    seeds = list(range(args.seed, args.seed + n))
    rows, base = [], None
    for run in args.run:
        src = load_source(run, student_weights=args.weights)
        images, _ = src.generate(args.steps, seeds, labels=labels, progress=False)
        with torch.no_grad():
            r = reward(images, {"class_labels": labels}).float()
            hit = None
            if hasattr(reward, "classifier"):
                hit = (reward.classifier.logits(images).argmax(dim=1) == labels).float().mean().item()
        row = {
            "run": run,
            "reward_mean": float(r.mean()),
            "reward_ci95": mean_ci(r, args.bootstrap, args.seed),
            "reward_classifier_accuracy": hit,
        }
        if base is None:
            base = r
        else:
            d = r - base
            row["difference_vs_first"] = float(d.mean())
            row["difference_ci95"] = mean_ci(d, args.bootstrap, args.seed)
        rows.append(row)
        print(f"{run}: reward {row['reward_mean']:.4f}", flush=True)
    lines = [
        f"{args.reward} reward, {n} samples, {args.steps} steps, {args.weights}, seeds {args.seed}..{args.seed + n - 1}",
        "| run | mean reward [95% CI] | minus the first run [95% CI] | reward classifier's accuracy |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lo, hi = row["reward_ci95"]
        diff = (
            f"{row['difference_vs_first']:+.4f} [{row['difference_ci95'][0]:+.4f}, {row['difference_ci95'][1]:+.4f}]"
            if "difference_vs_first" in row
            else "-"
        )
        acc = "-" if row["reward_classifier_accuracy"] is None else f"{100 * row['reward_classifier_accuracy']:.1f}%"
        lines.append(f"| {row['run']} | {row['reward_mean']:.4f} [{lo:.4f}, {hi:.4f}] | {diff} | {acc} |")
    print("\n".join(lines))
    if args.out:
        from fewstep.errors import script_command
        from fewstep.evaluation.inputs import atomic_write_json

        command = script_command("eval/reward_score.py", argv)
        atomic_write_json(Path(args.out), {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    from fewstep.errors import main_guard

    sys.exit(main_guard("reward_score", main))
