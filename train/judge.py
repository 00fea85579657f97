"""Train the digits judge (fewstep/digits/judge.py) on the train split of the digits and write
fewstep/digits/weights/judge.safetensors plus its card judge.json.

    OMP_NUM_THREADS=1 python train/judge.py              # about two minutes on one CPU core
    OMP_NUM_THREADS=1 python train/judge.py --seed 2 --arch vgg --width 16 --recipe strong \
        --name fewstep-digits-judge-vgg-s2 --out fewstep/digits/weights/panel/judge_vgg_s2.safetensors

The judge panel (fewstep/digits/panel.py) is made of judges trained by this script with different
seeds, architectures (--arch) and augmentation recipes (--recipe); `python train/judge.py --panel`
prints the command of every member.

Deterministic for a given seed and thread count (CPU only, deterministic algorithms). The
augmentation is light and geometric (random shifts of up to 3 px, rotations of up to 10
degrees, scaling by 0.9-1.1) so that the judge also reads slightly misplaced generated digits;
it adds no blur or noise, so the features stay sensitive to those defects (FID notices them).
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
import torch.nn.functional as F

from fewstep.digits.data import load_digits_tensors, split_indices
from fewstep.digits.judge import ARCHITECTURES, JUDGE_NAME, JUDGE_WEIGHTS, DigitsJudge, save_judge

# augmentation recipes: random affine warps (shift in pixels at 32x32, rotation in degrees, scale range, shear)
RECIPES = {
    "geometric": {"max_shift_px": 3.0, "max_rotation_deg": 10.0, "scale": (0.9, 1.1), "max_shear": 0.0},
    "strong": {"max_shift_px": 4.0, "max_rotation_deg": 15.0, "scale": (0.85, 1.15), "max_shear": 0.15},
    "light": {"max_shift_px": 1.0, "max_rotation_deg": 5.0, "scale": (0.95, 1.05), "max_shear": 0.0},
}

# the judge panel: every member is this script with these arguments (weights under fewstep/digits/weights/)
PANEL = {
    "fewstep-digits-judge-cnn3-s1": ["--seed", "1", "--arch", "cnn3", "--width", "16", "--recipe", "strong"],
    "fewstep-digits-judge-vgg-s2": ["--seed", "2", "--arch", "vgg", "--width", "16", "--recipe", "geometric"],
    "fewstep-digits-judge-vgg-s3": ["--seed", "3", "--arch", "vgg", "--width", "16", "--recipe", "light"],
}


def augment(
    x: torch.Tensor,
    g: torch.Generator,
    max_shift: float,
    max_rot_deg: float,
    scale_range: tuple[float, float],
    max_shear: float = 0.0,
) -> torch.Tensor:
    """Random affine warp of (B, 1, H, W) images in [-1, 1]; the background (-1) fills the edges."""
    b, _, h, _ = x.shape
    rot = (torch.rand(b, generator=g) * 2 - 1) * math.radians(max_rot_deg)
    scale = scale_range[0] + torch.rand(b, generator=g) * (scale_range[1] - scale_range[0])
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2 * max_shift / h)  # pixels -> [-1, 1] grid units
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    a, b_ = cos, -sin  # first row of the linear part: rotation / scale, then a shear [[1, k], [0, 1]]
    if max_shear > 0:  # drawn only when used, so the default recipe's random stream is unchanged
        k = (torch.rand(b, generator=g) * 2 - 1) * max_shear
        a, b_ = cos + k * sin, -sin + k * cos
    theta = torch.stack([torch.stack([a, b_, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # warp x + 1 so that zero padding is the -1 background
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(judge: DigitsJudge, x: torch.Tensor, y: torch.Tensor) -> float:
    judge.eval()
    return (judge.predict(x) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument(
        "--arch", default="cnn3", choices=sorted(ARCHITECTURES), help="convolutions per stage (default cnn3)"
    )
    p.add_argument("--recipe", default="geometric", choices=sorted(RECIPES), help="augmentation (default geometric)")
    p.add_argument("--max-shift", type=float, default=None, help="pixels, at 32x32 (default: the recipe's)")
    p.add_argument("--max-rot", type=float, default=None, help="degrees (default: the recipe's)")
    p.add_argument("--name", default=JUDGE_NAME, help="the extractor name written into the card")
    p.add_argument("--out", type=Path, default=JUDGE_WEIGHTS, help="weights file; the card goes next to it")
    p.add_argument("--panel", action="store_true", help="print the command of every panel member and exit")
    args = p.parse_args(argv)
    if args.panel:
        for name, a in PANEL.items():
            print(
                " ".join(
                    [
                        "OMP_NUM_THREADS=1 python train/judge.py",
                        *a,
                        "--name",
                        name,
                        "--out",
                        f"fewstep/digits/weights/panel/{name.removeprefix(JUDGE_NAME + '-')}.safetensors",
                    ]
                )
            )
        return {}
    aug = dict(RECIPES[args.recipe])
    if args.max_shift is not None:
        aug["max_shift_px"] = args.max_shift
    if args.max_rot is not None:
        aug["max_rotation_deg"] = args.max_rot

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(args.seed)

    x, y = load_digits_tensors()
    train_idx, val_idx = split_indices(x.shape[0])
    x_tr, y_tr, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    judge = DigitsJudge(width=args.width, feature_dim=args.feature_dim, arch=args.arch)
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    for epoch in range(args.epochs):
        judge.train()
        perm = torch.randperm(x_tr.shape[0], generator=g)
        total = 0.0
        for i in range(0, perm.numel(), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = augment(x_tr[idx], g, aug["max_shift_px"], aug["max_rotation_deg"], aug["scale"], aug["max_shear"])
            loss = F.cross_entropy(judge.logits(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  train loss {total / x_tr.shape[0]:.4f}  "
                f"held-out acc {accuracy(judge, x_val, y_val):.4f}",
                flush=True,
            )

    judge.eval()
    val_acc = accuracy(judge, x_val, y_val)
    train_acc = accuracy(judge, x_tr, y_tr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_judge(judge, args.out)
    card = {
        "name": args.name,
        "command": " ".join(["python train/judge.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "augmentation": {"recipe": args.recipe, **{k: list(v) if isinstance(v, tuple) else v for k, v in aug.items()}},
        "architecture": judge.config(),
        "parameters": sum(p.numel() for p in judge.parameters()),
        "data": "scikit-learn digits at 32x32, split_indices(1797, val_fraction=0.2, seed=0)",
        "train_n": int(x_tr.shape[0]),
        "heldout_n": int(x_val.shape[0]),
        "train_accuracy": round(train_acc, 6),
        "heldout_accuracy": round(val_acc, 6),
        "wall_time_s": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "weights_file": args.out.name,
        "weights_sha256": sha,
    }
    card_path = args.out.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))
    return card


if __name__ == "__main__":
    main()
