"""`fewstep sample`: a grid of teacher samples, one row per class or prompt.

    fewstep sample --teacher digits-vp --steps 50 --guidance 3 --out grid.png       # 10 x 10 digits
    fewstep sample --teacher /models/sdxl --prompt "a red fox" --prompt "a lighthouse" \\
        --per-row 4 --steps 30 --guidance 5 --out grid.png

Rows are the classes 0..9 of the digits teachers (or --classes), or the given prompts; each
row holds --per-row samples from seeded noise (the same seed gives the same grid on any
device: noise is drawn on the CPU). The teacher runs DDIM / flow Euler on its own schedule
(--steps), or on explicit --times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, check_output_file, finite_float, positive_int, user_errors

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported when sampling starts, so that a bad option is answered at once
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        required=True,
        help="digits-vp, digits-flow, or a diffusers pipeline folder (or a hub id already cached)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=50, help="sampling steps on the teacher's schedule (default 50)"
    )
    p.add_argument(
        "--times",
        default=None,
        help="explicit decreasing times in [0, 1], comma separated (e.g. 1,0.75,0.5,0.25,0); overrides --steps",
    )
    p.add_argument(
        "--renoise",
        choices=("ddim", "fresh"),
        default="ddim",
        help="between steps keep the implied noise (ddim, the teacher sampler) or draw fresh noise",
    )
    p.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale (Imagen form; guidance-distilled Flux: its guidance "
        "input). Default: 1, or 3.5 for guidance-distilled Flux",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more rows)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument(
        "--classes",
        default=None,
        help="class ids or names for class-conditional teachers, comma separated (default 0..9)",
    )
    p.add_argument("--per-row", type=positive_int, default=10, help="samples per class / prompt (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=100, help="samples per denoiser batch")
    p.add_argument(
        "--resolution", type=positive_int, default=None, help="image size in pixels (default: the teacher's)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="backbone precision")
    p.add_argument("--out", default="grid.png", help="output PNG")


def num_real_classes(teacher, source: str) -> int | None:
    """How many real classes a class-conditional teacher has (its null class is not one)."""
    if str(source).startswith("digits"):
        from .digits.data import NUM_CLASSES

        return NUM_CLASSES
    from .families import family_by_name

    record = family_by_name(teacher.family)
    if record.num_classes is None:
        return None
    null = getattr(teacher.denoiser.conditioner, "null_class", None)
    return record.num_classes(teacher.denoiser.backbone, null)


def _rows(args, teacher) -> list:
    from .families import is_text

    if not is_text(teacher.family):
        if args.prompt or args.prompts_file:
            raise UserError(f"--prompt: {args.teacher} is class-conditional; use --classes")
        n = num_real_classes(teacher, args.teacher)
        if args.classes is None:
            return list(range(min(10, n or 10)))
        rows = [int(c) if c.strip().lstrip("-").isdigit() else c.strip() for c in args.classes.split(",") if c.strip()]
        if not rows:
            raise UserError(f"--classes {args.classes!r}: give class ids or names, comma separated")
        bad = [r for r in rows if isinstance(r, int) and not (0 <= r < (n if n is not None else r + 1))]
        if bad:
            raise UserError(
                f"--classes {args.classes!r}: {bad[0]} is not a class of {args.teacher} (its classes are 0..{n - 1})"
            )
        with user_errors("--classes", ValueError):
            teacher.encode_prompts(rows)  # names the teacher does not know are refused here
        return rows
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise UserError(
            f"{args.teacher} is a text-to-image teacher ({teacher.family}): give --prompt or --prompts-file"
        )
    return prompts


def parse_times(text: str) -> list[float]:
    """--times: finite, strictly decreasing times in [0, 1]; else a UserError naming the flag."""
    from .samplers import check_times

    try:
        ts = [finite_float(t) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--times {text!r}: give comma-separated finite numbers ({e})") from None
    with user_errors(f"--times {text!r}", ValueError):
        return check_times(ts)


def _times(args, teacher) -> list[float]:
    if args.times:
        return parse_times(args.times)
    return teacher.path.sampling_times(args.steps).tolist()


def image_grid(images: Tensor, rows: int, pad: int = 2) -> Tensor:
    """(rows * cols, C, H, W) in [-1, 1] -> (3, rows*(H+pad)+pad, cols*(W+pad)+pad) uint8, white gaps."""
    from .images import grid_image

    return grid_image(images, nrow=images.shape[0] // rows, pad=pad, pad_value=255)


def save_png(grid: Tensor, out: str | Path) -> Path:
    from .images import grid_to_pil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_to_pil(grid).save(out)
    return out


def sample_grid(
    teacher,
    rows: list,
    per_row: int,
    times: list[float],
    guidance: float,
    seed: int = 0,
    renoise: str = "ddim",
    batch_size: int = 100,
) -> Tensor:
    """Decoded samples (len(rows) * per_row, C, H, W) in [-1, 1], row-major."""
    import torch

    from .samplers import initial_noise, sample

    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    labels = [r for r in rows for _ in range(per_row)]
    n = len(labels)
    gen = torch.Generator().manual_seed(seed)
    noise = initial_noise((n, *teacher.latent_shape), gen)
    gen_fresh = torch.Generator().manual_seed(seed + 1)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            cond = teacher.encode_prompts(labels[i : i + batch_size])
            x = sample(
                teacher.denoiser,
                noise[i : i + batch_size].to(teacher.device),
                cond,
                times,
                guidance=guidance,
                renoise=renoise,
                generator=gen_fresh,
            )
            out.append(teacher.decode(x).cpu())
    return torch.cat(out)


def run(args) -> int:
    check_output_file(args.out, "--out")
    if args.prompts_file and not Path(args.prompts_file).is_file():
        raise UserError(f"--prompts-file {args.prompts_file!r}: no such file")
    if args.times:
        parse_times(args.times)
    import torch

    from .pipeline_teacher import load_teacher

    kw = {} if args.resolution is None else {"resolution": args.resolution}
    t0 = time.time()
    with user_errors(f"--teacher {args.teacher!r}", ValueError, OSError, named=args.teacher):
        teacher = load_teacher(args.teacher, device=args.device, dtype=getattr(torch, args.dtype), **kw)
    if teacher.pipeline is not None and hasattr(teacher.pipeline, "set_progress_bar_config"):
        teacher.pipeline.set_progress_bar_config(disable=True)
    rows = _rows(args, teacher)
    times = _times(args, teacher)
    guidance = args.guidance
    if guidance is None:
        guidance = 3.5 if teacher.denoiser.conditioner.guidance_embedded else 1.0
    t1 = time.time()
    images = sample_grid(teacher, rows, args.per_row, times, guidance, args.seed, args.renoise, args.batch_size)
    out = save_png(image_grid(images, len(rows)), args.out)
    print(
        f"{out}: {len(rows)} x {args.per_row} samples of {args.teacher} ({len(times) - 1} steps, guidance "
        f"{guidance:g}); load {t1 - t0:.1f} s, sampling {time.time() - t1:.1f} s"
    )
    return 0
