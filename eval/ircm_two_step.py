"""IR-CM at two steps: the intermediate time, chosen on the train split, scored on the held-out set.

A consistency model's multistep sampler evaluates f at t_0 = 1, then re-noises its x0 estimate to an
intermediate time t_1 and evaluates f again. Where t_1 lies is a free choice of the sampler: the
consistency-model literature picks it by a search on a sample-quality measure. This benchmark does
that search honestly, on the train split's pairs (never the held-out images), for both re-noising
rules of the restoration sampler:

    fresh  new Gaussian noise at t_1 (DDIM with eta = 1; the consistency-model sampler)
    ddim   the noise implied by the first evaluation (DDIM with eta = 0; deterministic)

The criterion is the mean PSNR over the three degradations. Then it scores, on all held-out images,
the 1-step sampler, the default 2-step sampler (t_1 = 0.5, fresh) and the chosen 2-step samplers
with the `restoration` protocol's metrics (optionally the judge panel).

    python eval/ircm_two_step.py --run runs/ircm --out runs/ircm_two_step [--panel]

Writes <out>/results.json and prints the tables. One thread.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _restore(model, pairs, times, renoise, seed):
    """`fewstep.restoration.restore` with the sampler's times and re-noising rule replaced."""
    import dataclasses

    import torch

    from fewstep.restoration import restore

    steps = len(times) - 1
    sampler = dataclasses.replace(model, times={steps: list(times)}, renoise=renoise)
    return restore(sampler, pairs.condition, steps, generator=torch.Generator().manual_seed(seed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="an IR-CM training run dir (or an exported restoration student)")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default="student", help="student or student_ema")
    p.add_argument("--mid-times", default="0.02,0.05,0.1,0.2,0.3,0.5,0.7,0.9", help="candidate t_1 (comma-separated)")
    p.add_argument("--select-images", type=int, default=359, help="train-split images per degradation for the search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--panel", action="store_true", help="also score the held-out rows with the judge panel")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from fewstep.digits.restoration import DEGRADATIONS, restoration_pairs
    from fewstep.evaluation.inputs import InputError, atomic_write_json
    from fewstep.evaluation.restoration import restoration_scores
    from fewstep.restoration import load_restorer

    try:
        mids = sorted({float(x) for x in a.mid_times.split(",") if x.strip()})
    except ValueError:
        print(f"error: --mid-times {a.mid_times!r}: give numbers in (0, 1), comma-separated", file=sys.stderr)
        return 2
    if not mids or not all(0 < m < 1 for m in mids):
        print(f"error: --mid-times {a.mid_times!r}: every intermediate time must lie in (0, 1)", file=sys.stderr)
        return 2
    out = Path(a.out)
    if (out / "results.json").exists():
        print(f"error: {out}/results.json exists; choose another --out", file=sys.stderr)
        return 2
    try:
        model = load_restorer(a.run, weights=a.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --run {a.run}: {e}", file=sys.stderr)
        return 2

    # the search: train split, PSNR only
    select = {k: restoration_pairs(k, "train", limit=a.select_images) for k in DEGRADATIONS}

    def mean_psnr(times, renoise):
        per = {}
        for k, pr in select.items():
            x = _restore(model, pr, times, renoise, a.seed)
            per[k] = restoration_scores(x, pr.target, pr.labels, metrics=("psnr",), bootstrap=0)["psnr"]
        return sum(per.values()) / len(per), per

    search = {"1 step": mean_psnr([1.0, 0.0], "fresh")}
    print(f"train split, {a.select_images} images per degradation: 1 step mean PSNR {search['1 step'][0]:.2f}")
    chosen = {}
    for renoise in ("fresh", "ddim"):
        best = None
        for m in mids:
            mean, per = mean_psnr([1.0, m, 0.0], renoise)
            search[f"2 steps, t1={m}, {renoise}"] = (mean, per)
            print(
                f"  2 steps t1={m:<5} {renoise:<5}: mean PSNR {mean:.2f}  "
                + "  ".join(f"{k} {v:.2f}" for k, v in per.items())
            )
            if best is None or mean > best[1]:
                best = (m, mean)
        chosen[renoise] = best[0]
    print(f"chosen t1 (train split): fresh {chosen['fresh']}, ddim {chosen['ddim']}")

    # held-out scores
    rows_spec = [("1 step", [1.0, 0.0], "fresh"), ("2 steps, t1=0.5, fresh (default)", [1.0, 0.5, 0.0], "fresh")]
    for renoise in ("fresh", "ddim"):
        rows_spec.append((f"2 steps, t1={chosen[renoise]}, {renoise} (chosen)", [1.0, chosen[renoise], 0.0], renoise))
    metrics = ("psnr", "ssim", "judge_dist", "class_acc", "fid") + (("panel",) if a.panel else ())
    held = {k: restoration_pairs(k, "heldout") for k in DEGRADATIONS}
    rows = []
    for name, times, renoise in rows_spec:
        for k, pr in held.items():
            x = _restore(model, pr, times, renoise, a.seed)
            try:
                s = restoration_scores(x, pr.target, pr.labels, metrics=metrics, bootstrap=200, seed=a.seed)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            row = {"sampler": name, "times": times, "renoise": renoise, "degradation": k, **s}
            rows.append(row)
            med = f"  panel FID median {s['panel']['fid_median']:.2f}" if a.panel and "fid_median" in s["panel"] else ""
            print(
                f"held-out {k:<5} {name:<38} PSNR {s['psnr']:.2f} [{s['psnr_ci'][0]:.2f}, {s['psnr_ci'][1]:.2f}]"
                f"  SSIM {s['ssim']:.3f}  judge FID {s['fid']:.2f}{med}"
            )
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "run": a.run,
        "weights": a.weights,
        "command": " ".join(sys.argv),
        "selection": {"split": "train", "images_per_degradation": a.select_images, "criterion": "mean PSNR"},
        "search": {k: {"mean_psnr": v[0], "psnr": v[1]} for k, v in search.items()},
        "chosen": chosen,
        "rows": rows,
    }
    atomic_write_json(out / "results.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
