"""Train the embedded digits teacher: a small AutoencoderKL, then a class-conditional DiT on its
latents, saved as a stock `DiTPipeline` folder with a JSON card.

    python train/train_teacher.py --kind vp   --out fewstep/digits/weights/teacher_vp
    python train/train_teacher.py --kind flow --out fewstep/digits/weights/teacher_flow \
        --vae-from fewstep/digits/weights/teacher_vp          # reuse the VP teacher's VAE
    accelerate launch train/train_teacher.py --kind vp --out /tmp/teacher_vp

Top to bottom: (1) data, (2) VAE (trained here, or loaded with --vae-from), (3) latents and the
scaling factor, (4) the path of the chosen kind, (5) the DiT trained through the fewstep
`Denoiser` on the native target of the path, with explicit label dropout and an EMA, (6) the
pipeline folder and the card. Seeded and deterministic on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting make a shared 2-core machine several times slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewstep.denoiser import Denoiser  # noqa: E402
from fewstep.digits.data import NUM_CLASSES, load_digits_tensors  # noqa: E402
from fewstep.digits.models import NULL_CLASS, build_dit, build_vae, count_parameters  # noqa: E402
from fewstep.export import atomic_folder  # noqa: E402
from fewstep.paths import FlowPath, VPPath  # noqa: E402

CARDS = Path(__file__).resolve().parents[1] / "fewstep" / "digits" / "weights" / "teachers.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["vp", "flow"], required=True, help="VP (DDIM, epsilon) or flow matching")
    p.add_argument("--out", required=True, help="DiTPipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    # VAE
    p.add_argument(
        "--vae-from", default=None, help="pipeline (or vae) folder whose VAE to reuse instead of training one"
    )
    p.add_argument(
        "--separate-stages",
        action="store_true",
        help="train the VAE (with --vae-threads), then start the DiT stage exactly as a separate "
        "`--vae-from` run on that VAE would: threads set to --threads, both random streams "
        "reseeded. One command for a teacher whose VAE and DiT were trained by two runs",
    )
    p.add_argument("--vae-threads", type=int, default=None, help="threads of the VAE stage (default --threads)")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-2, help="weight of the per-pixel KL term")
    p.add_argument(
        "--grad-weight", type=float, default=0.5, help="weight of the L1 loss on image gradients (sharpness)"
    )
    # DiT
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (with a 1+s/10+s warm-up)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    p.add_argument(
        "--flow-t", choices=["uniform", "logit_normal"], default="uniform", help="flow: how t is drawn in training"
    )
    p.add_argument("--limit-data", type=int, default=None, help="use the first N digits only (smoke tests)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-card", action="store_true", help="do not write the entry in teachers.json")
    return p.parse_args(argv)


def log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, flush=True)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    if args.separate_stages and args.vae_from:
        raise SystemExit("train/train_teacher.py: --separate-stages trains the VAE; it excludes --vae-from")
    torch.set_num_threads(args.vae_threads if args.separate_stages and args.vae_threads else args.threads)
    accelerator = Accelerator()
    device = accelerator.device
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)
    t_start = time.time()

    # ---- 1. data -------------------------------------------------------------------------
    images, labels = load_digits_tensors()  # (1797, 1, 32, 32) in [-1, 1], (1797,)
    if args.limit_data is not None:
        images, labels = images[: args.limit_data], labels[: args.limit_data]
    n = images.shape[0]
    images, labels = images.to(device), labels.to(device)

    # ---- 2. VAE ----------------------------------------------------------------------------
    vae_card: dict
    if args.vae_from:
        src = Path(args.vae_from)
        src = src / "vae" if (src / "vae").is_dir() else src
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"--vae-from: no VAE config.json in {src}")
        vae = AutoencoderKL.from_pretrained(src).to(device)
        vae_card = {"reused_from": str(args.vae_from)}
        log(accelerator, f"VAE loaded from {src} (scaling_factor {vae.config.scaling_factor:.4f})")
    else:
        t0 = time.time()
        vae = build_vae().to(device)
        opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        vae, opt = accelerator.prepare(vae, opt)
        vae.train()
        for step in range(args.vae_steps):
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * cosine_lr(step, args.vae_steps, 50, floor=0.05)
            idx = torch.randint(0, n, (args.vae_batch,), generator=gen).to(device)
            x = images[idx]
            post = accelerator.unwrap_model(vae).encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            rec = accelerator.unwrap_model(vae).decode(z).sample
            l1 = (rec - x).abs().mean()
            # L1 on horizontal and vertical differences keeps strokes sharp
            gl = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
            kl = post.kl().mean() / x[0].numel()  # per pixel
            loss = l1 + args.grad_weight * gl + args.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            if step % args.log_every == 0 or step == args.vae_steps - 1:
                log(accelerator, f"vae {step:5d} l1 {l1.item():.4f} grad {gl.item():.4f} kl/px {kl.item():.3f}")
        vae = accelerator.unwrap_model(vae)
        vae_card = {
            "steps": args.vae_steps,
            "batch": args.vae_batch,
            "lr": args.vae_lr,
            "kl_weight": args.kl_weight,
            "grad_weight": args.grad_weight,
            "wall_s": round(time.time() - t0, 1),
        }
    vae.eval().requires_grad_(False)

    # ---- 3. latents: the posterior mean, scaled to unit std ---------------------------------
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
        if not args.vae_from:
            vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        if args.separate_stages:  # from here on, as a fresh `--vae-from` run would go
            torch.set_num_threads(args.threads)
            torch.manual_seed(args.seed)
            gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)
            means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
            vae_card["separate_stages"] = {"vae_threads": args.vae_threads or args.threads}
        sf = float(vae.config.scaling_factor)
        latents = means * sf
        rec = torch.cat([vae.decode(latents[i : i + 256] / sf).sample for i in range(0, n, 256)])
        rec_l1 = (rec.clamp(-1, 1) - images).abs().mean().item()
    vae_card.update(scaling_factor=sf, recon_l1=round(rec_l1, 5), params=count_parameters(vae))
    log(
        accelerator,
        f"latents {tuple(latents.shape)} scaling_factor {sf:.4f} mean {latents.mean():.3f} "
        f"std {latents.std():.3f}; reconstruction L1 {rec_l1:.4f}",
    )

    # ---- 4. path ---------------------------------------------------------------------------------
    if args.kind == "vp":
        scheduler = DDIMScheduler(
            timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon"
        )
        path = VPPath.from_config(scheduler.config)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        path = FlowPath.from_config(scheduler.config)

    def draw_t(b: int) -> torch.Tensor:
        if args.kind == "vp":  # the discrete training indices i = 0..N-1 sit at t = (i + 1) / N
            i = torch.randint(0, path.num_train_timesteps, (b,), generator=gen)
            return ((i + 1).double() / path.num_train_timesteps).float()
        if args.flow_t == "logit_normal":
            return torch.sigmoid(torch.randn(b, generator=gen))
        return torch.rand(b, generator=gen)

    # ---- 5. DiT through the Denoiser ----------------------------------------------------------
    dit = build_dit().to(device)
    ema = copy.deepcopy(dit).requires_grad_(False)
    denoiser = Denoiser(dit, path)  # keeps the backbone in eval mode: dropout is ours
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    denoiser, opt = accelerator.prepare(denoiser, opt)
    t0 = time.time()
    running, last_loss = 0.0, float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, args.steps, args.warmup)
        idx = torch.randint(0, n, (args.batch,), generator=gen).to(device)
        x0 = latents[idx]
        y = labels[idx].clone()
        drop = (torch.rand(args.batch, generator=gen) < args.label_dropout).to(device)
        y[drop] = NULL_CLASS
        eps = torch.randn(x0.shape, generator=gen).to(device)
        t = draw_t(args.batch).to(device)
        x_t = path.add_noise(x0, eps, t)
        target = path.from_x0_eps(x0, eps, t)
        pred = denoiser(x_t, t, {"class_labels": y}, output="native")
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), accelerator.unwrap_model(denoiser).backbone.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            k = (step % args.log_every) + 1
            log(
                accelerator,
                f"dit {step + 1:5d} loss {running / k:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step",
            )
            last_loss, running = running / k, 0.0
    dit_wall = time.time() - t0

    # ---- 6. pipeline folder and card -------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        transformer = DiTTransformer2DModel.from_config(ema.config)
        transformer.load_state_dict(ema.state_dict())
        id2label = {i: str(i) for i in range(NUM_CLASSES)}
        pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
        # written beside the target and swapped in whole, so a reader never sees half a pipeline
        out = Path(args.out)
        with atomic_folder(out, overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        wall = time.time() - t_start
        card = {
            "command": "python "
            + " ".join(
                shlex.quote(a) for a in [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
            ),
            "kind": args.kind,
            "folder": str(out),
            "seed": args.seed,
            "threads": args.threads,
            "prediction": "epsilon" if args.kind == "vp" else "flow (v = eps - x0)",
            "scheduler": type(scheduler).__name__,
            "flow_t": args.flow_t if args.kind == "flow" else None,
            "latents": "posterior mean x scaling_factor",
            "images": n,
            "vae": vae_card,
            "dit": {
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "warmup": args.warmup,
                "ema": args.ema,
                "label_dropout": args.label_dropout,
                "weight_decay": args.weight_decay,
                "params": count_parameters(transformer),
                "final_loss": round(last_loss, 5),
                "wall_s": round(dit_wall, 1),
            },
            "wall_s": round(wall, 1),
            "cpu_s": round(time.process_time(), 1),  # all threads; wall time depends on the machine's load
            "torch": torch.__version__,
        }
        if not args.no_card:
            cards = json.loads(CARDS.read_text()) if CARDS.is_file() else {}
            # scores are written by eval/teacher_table.py for these very weights; a retrain drops them
            cards[args.kind] = card
            CARDS.parent.mkdir(parents=True, exist_ok=True)
            CARDS.write_text(json.dumps(cards, indent=2) + "\n")
        log(accelerator, f"saved {out} in {wall:.0f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
