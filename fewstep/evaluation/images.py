"""Generated images as `fewstep eval` keeps them: uint8 RGB (B, 3, H, W), resized exactly as
reference folders are read, saved one PNG each or as one grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_uint8", "resize_uint8", "save_images"]


def to_uint8(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) float in [-1, 1] -> (B, 3, H, W) uint8, rounded as a saved PNG is."""
    from ..digits.data import to_uint8_rgb

    return to_uint8_rgb(images)


def resize_uint8(images: Tensor, size: int | None) -> Tensor:
    """Resize uint8 (B, 3, H, W) images to size x size exactly as reference folders are read
    (PIL bicubic on the shorter side, centre crop)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    from PIL import Image

    from .inputs import _resize_center_crop

    out = [
        torch.from_numpy(np.array(_resize_center_crop(Image.fromarray(im.permute(1, 2, 0).numpy()), size))).permute(
            2, 0, 1
        )
        for im in images
    ]
    return torch.stack(out).contiguous()


def _pil(im: Tensor):
    from PIL import Image

    a = im.permute(1, 2, 0).numpy()
    if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        return Image.fromarray(a[..., 0], mode="L")  # grayscale: convert("RGB") gives the same pixels back
    return Image.fromarray(a, mode="RGB")


def save_images(images: Tensor, folder: Path, names: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for im, n in zip(images, names):
        _pil(im).save(folder / f"{n}.png")
