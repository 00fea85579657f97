"""Sample grids: the one grid writer of training, evaluation, the demo and `fewstep sample`,
built on torchvision's `make_grid`.

    grid = grid_image(images, nrow=10)       # (3, H', W') uint8, 2-pixel gaps
    save_grid(images, "samples/step_0001000.png", nrow=10)

`images` are float (B, C, H, W) in [-1, 1] or uint8 (B, C, H, W); C = 1 is shown as grey, C = 3
as RGB, any other C by its first channel (a latent grid). Each cell sits at row i // nrow,
column i % nrow, `pad` pixels from its neighbours and the border.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["as_uint8_rgb", "grid_image", "save_grid", "grid_to_pil"]


def as_uint8_rgb(images: Tensor) -> Tensor:
    """(B, C, H, W) float in [-1, 1] or uint8 -> (B, 3, H, W) uint8 (rounded as a saved PNG is)."""
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def grid_image(images: Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 0) -> Tensor:
    """One (3, rows * (H + pad) + pad, nrow * (W + pad) + pad) uint8 image of the B images,
    `nrow` a row (default: a square-ish grid), gaps filled with `pad_value` (0 black, 255 white)."""
    from torchvision.utils import make_grid

    x = as_uint8_rgb(images)
    if x.shape[0] == 0:
        raise ValueError("images: no images to put in a grid")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    if x.shape[0] == 1:  # make_grid returns a lone image without its border; keep the layout uniform
        x = torch.cat([x, torch.full_like(x, pad_value)])
        g = make_grid(x, nrow=2, padding=pad, pad_value=pad_value)
        return g[:, :, : x.shape[-1] + 2 * pad].contiguous()
    return make_grid(x, nrow=nrow, padding=pad, pad_value=pad_value)


def grid_to_pil(grid: Tensor):
    """A (3, H, W) uint8 grid as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2, pad_value: int = 0) -> Path:
    """Write `grid_image(images, nrow, pad, pad_value)` as a PNG at `path` (atomically: a reader
    never sees half a file). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid_to_pil(grid_image(images, nrow, pad, pad_value)).save(tmp)
    tmp.replace(path)
    return path
