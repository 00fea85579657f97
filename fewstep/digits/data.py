"""scikit-learn's digits (1,797 8x8 images, 10 classes, shipped inside the package) as 32x32
single-channel images in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
NUM_CLASSES = 10
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_digits_tensors(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, size, size) float32 in [-1, 1] (bilinear upsampling of the
    0..16 intensities) and their labels (N,) int64. Deterministic, no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed train / held-out split of range(n)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def to_uint8_rgb(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) images in [-1, 1] -> (B, 3, H, W) uint8, the input torch-fidelity
    extractors take. Rounds as PIL does when a pipeline saves an image."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x
