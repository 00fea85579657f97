"""`fewstep distill-decoder`: a small `AutoencoderTiny` distilled from a teacher's VAE
(`fewstep.decoder`), written as a diffusers model folder that `fewstep export --decoder` puts into
an exported pipeline.

    fewstep distill-decoder --teacher digits-vp --out decoders/digits_tiny [--steps 3000] [--width 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from .errors import UserError, check_output_folder, finite_float, nonnegative_int, positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .decoder import DecoderParams

    d = DecoderParams()
    p.add_argument("--teacher", required=True, help="digits-vp, digits-flow, or a diffusers pipeline folder with a vae")
    p.add_argument("--out", required=True, help="folder to write (config.json, weights, decoder_card.json)")
    p.add_argument(
        "--latents", help="safetensors file with 'latents' (N, C, H, W), scaled as the teacher's VAE scales them"
    )
    p.add_argument(
        "--width", type=positive_int, default=d.width, help=f"decoder channels per level (default {d.width})"
    )
    p.add_argument(
        "--blocks",
        type=_block_counts,
        default=d.blocks,
        help=f"residual blocks per level: one count for every level, or one per level from the latent's "
        f"resolution up, comma-separated (e.g. 2,0,0: none at the image's resolution, where they cost most; "
        f"default {d.blocks})",
    )
    p.add_argument("--encoder-width", type=positive_int, default=d.encoder_width)
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=finite_float, default=d.lr)
    p.add_argument("--noise", type=finite_float, default=d.noise, help="latent perturbation, relative to their std")
    p.add_argument("--pool", type=positive_int, default=d.pool, help="perturbed copies of each latent (default 8)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _block_counts(text: str) -> int | tuple[int, ...]:
    """argparse type for --blocks: "N" or "N,N,..." (integers >= 0)."""
    parts = [part.strip() for part in str(text).split(",")]
    counts = tuple(nonnegative_int(part) for part in parts)
    return counts[0] if len(counts) == 1 else counts


def run(args: argparse.Namespace) -> int:
    import torch

    from .decoder import DecoderParams, distill_decoder, teacher_latents
    from .pipeline_teacher import load_teacher

    out = check_output_folder(args.out, "--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} is not empty (pass --overwrite to replace it)")
    if args.lr <= 0 or args.noise < 0:
        raise UserError("--lr must be > 0 and --noise >= 0")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = load_teacher(args.teacher)
    vae = getattr(teacher, "vae", None)
    if vae is None:
        raise UserError(f"--teacher {args.teacher}: a pixel-space teacher has no VAE to distil")
    p = DecoderParams(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(DecoderParams) if hasattr(args, f.name)}
    )
    latents = teacher_latents(vae, args.teacher, args.latents, p.seed)
    tiny, record = distill_decoder(vae, latents, p)
    record["teacher"] = args.teacher
    out.mkdir(parents=True, exist_ok=True)
    tiny.save_pretrained(str(out), safe_serialization=True)
    (out / "decoder_card.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"fewstep distill-decoder: wrote {out} (AutoencoderTiny, decoder {record['decoder_parameters']:,} parameters "
        f"vs {record['full_decoder_parameters']:,}; held-out PSNR {record['heldout_decoder_psnr_db']:.1f} dB "
        f"against the full decoder) in {record['seconds']:.0f}s"
    )
    return 0
