"""Train the embedded restoration teacher: a pixel-space UNet2DModel conditioned on the degraded
image (concatenated on the channels), saved as a stock `LDMSuperResolutionPipeline` folder with
a JSON card.

    python train/train_restoration_teacher.py --out fewstep/digits/weights/restoration_teacher

Top to bottom: (1) the training pairs (the train split of `fewstep.digits.restoration`, fresh
degradations every step: a kind drawn uniformly per image, fresh noise), (2) the path (DDIM,
v-prediction, squared-cosine betas), (3) the UNet trained through the fewstep `Denoiser` on the
native target with an EMA, (4) the pipeline folder (UNet, the hand-set pixel VQModel,
DDIMScheduler) and the card `fewstep/digits/weights/restoration_teacher.json`. Seeded and
deterministic on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_teacher import cosine_lr  # noqa: E402  (the digits teachers' schedule)

from fewstep.denoiser import Denoiser  # noqa: E402
from fewstep.digits.data import load_digits_tensors  # noqa: E402
from fewstep.digits.models import count_parameters  # noqa: E402
from fewstep.digits.restoration import (  # noqa: E402
    DEGRADATIONS,
    TrainingDegrader,
    build_pixel_vqvae,
    build_unet,
    restoration_split,
)
from fewstep.export import atomic_folder  # noqa: E402
from fewstep.paths import VPPath  # noqa: E402

CARD = Path(__file__).resolve().parents[1] / "fewstep" / "digits" / "weights" / "restoration_teacher.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="LDMSuperResolutionPipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay (with a 1+s/10+s warm-up)")
    p.add_argument("--limit-data", type=int, default=None, help="use the first N training digits only (smoke tests)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-card", action="store_true", help="do not write the card")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()

    # ---- 1. training pairs -------------------------------------------------------------------
    train_idx, _ = restoration_split()
    if args.limit_data is not None:
        train_idx = train_idx[: args.limit_data]
    x32, _ = load_digits_tensors()
    x8, _ = load_digits_tensors(size=8)
    targets, lows = x32[train_idx], x8[train_idx]
    n = targets.shape[0]
    degrader = TrainingDegrader(DEGRADATIONS)

    # ---- 2. path -------------------------------------------------------------------------------
    scheduler = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    path = VPPath.from_config(scheduler.config)

    # ---- 3. the UNet through the Denoiser -------------------------------------------------------
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    denoiser = Denoiser(unet, path)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    running, last_loss = 0.0, float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, args.steps, args.warmup, floor=0.05)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = targets[idx]
        cond_img, _ = degrader(x0, lows[idx], gen)
        eps = torch.randn(x0.shape, generator=gen)
        i = torch.randint(0, path.num_train_timesteps, (args.batch,), generator=gen)
        t = ((i + 1).double() / path.num_train_timesteps).float()
        x_t = path.add_noise(x0, eps, t)
        target = path.from_x0_eps(x0, eps, t)
        pred = denoiser(x_t, t, {"image": cond_img}, output="native")
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            k = (step % args.log_every) + 1
            print(
                f"unet {step + 1:5d} loss {running / k:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step",
                flush=True,
            )
            last_loss, running = running / k, 0.0
    wall_unet = time.time() - t0

    # ---- 4. pipeline folder and card ------------------------------------------------------------
    final = UNet2DModel.from_config(ema.config)
    final.load_state_dict(ema.state_dict())
    pipe = LDMSuperResolutionPipeline(vqvae=build_pixel_vqvae(), unet=final.eval(), scheduler=scheduler)
    out = Path(args.out)
    with atomic_folder(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    wall = time.time() - t_start
    card = {
        "command": "python "
        + " ".join(
            shlex.quote(a) for a in [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
        ),
        "folder": str(out),
        "pipeline": "LDMSuperResolutionPipeline (pixel space: vqvae is the hand-set 8-bit decoder)",
        "seed": args.seed,
        "threads": args.threads,
        "prediction": "v_prediction",
        "scheduler": "DDIMScheduler (squaredcos_cap_v2, trailing)",
        "degradations": list(DEGRADATIONS),
        "train_images": n,
        "unet": {
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "ema": args.ema,
            "params": count_parameters(final),
            "final_loss": round(last_loss, 5),
            "wall_s": round(wall_unet, 1),
        },
        "wall_s": round(wall, 1),
        "cpu_s": round(time.process_time(), 1),
        "torch": torch.__version__,
    }
    if not args.no_card:
        # scores are added by eval/restoration_bench.py for these very weights; a retrain drops them
        CARD.write_text(json.dumps(card, indent=2) + "\n")
    print(f"saved {out} in {wall:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
