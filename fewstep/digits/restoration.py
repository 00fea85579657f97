"""The embedded restoration default: three degradations of the 32x32 digits, a fixed train /
held-out split, and the stock diffusers networks of the restoration teacher.

    pairs = restoration_pairs("sr4", split="heldout")   # targets, degraded inputs, labels
    pairs.target      (N, 1, 32, 32) in [-1, 1]: the 32x32 digits the generative teachers use
    pairs.degraded    (N, 1, h, w): the degraded image at its own size (8x8 for sr4)
    pairs.condition   (N, 1, 32, 32): what the restoration network is given (sr4: bicubic x4)
    pairs.labels      (N,) the source digit's class

Degradations (`DEGRADATIONS`), all of the 32x32 target except sr4:
  sr4     the 8x8 original of scikit-learn (0..16 intensities -> [-1, 1]); the network sees its
          bicubic x4 upsampling. Note: the 32x32 targets ARE the bilinear upsampling of these
          8x8 images (fewstep/digits/data.py), so x4 super-resolution of this default has an
          exact linear answer; bicubic upsampling is the baseline the teacher is held against.
  noise   additive Gaussian noise of std NOISE_STD (in [-1, 1] units), not clamped.
  blur    Gaussian blur of std BLUR_SIGMA pixels (kernel BLUR_KERNEL, reflect padding).
The noise of the held-out set is fixed (a generator seeded by the image index), so every score
is computed on the same inputs.

Split: the fixed rule of `fewstep.digits.data.split_indices` (20% held out, seed 0): 1,438 train
and 359 held-out digits, the same for every degradation.

The teacher is a `LDMSuperResolutionPipeline` in pixel space: `unet` is a `UNet2DModel` whose
input is the noisy image with the conditioning image concatenated on the channels (as that
pipeline concatenates), and `vqvae` is a `VQModel` whose weights are set by hand (no training)
so that `decode` rounds an image to the 256 levels of an 8-bit image and returns it: a stock
"decoder" that leaves pixel-space samples as they are (see `build_pixel_vqvae`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IMAGE_SIZE, WEIGHTS_DIR, load_digits_tensors, split_indices

__all__ = [
    "DEGRADATIONS",
    "NOISE_STD",
    "BLUR_SIGMA",
    "BLUR_KERNEL",
    "TEACHER_DIR",
    "UNET_CONFIG",
    "RestorationPairs",
    "degrade",
    "condition_image",
    "restoration_pairs",
    "restoration_split",
    "build_unet",
    "build_pixel_vqvae",
    "bicubic_baseline",
]

DEGRADATIONS = ("sr4", "noise", "blur")
NOISE_STD = 0.4  # in [-1, 1] units (= 51 of 255 grey levels)
BLUR_SIGMA = 1.5  # pixels
BLUR_KERNEL = 9
TEACHER_DIR = WEIGHTS_DIR / "restoration_teacher"
_HELDOUT_NOISE_SEED = 20_260_415  # the held-out noise: generator seeded by this + the image index

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE,
    in_channels=2,  # the noisy image and the conditioning image (LDMSuperResolutionPipeline: C_latent * 2)
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(16, 32, 64),  # 32 -> 16 -> 8; small enough to train in ~20 min on one CPU thread
    down_block_types=("DownBlock2D",) * 3,  # no attention: digits need none, and it saves CPU time
    up_block_types=("UpBlock2D",) * 3,
    norm_num_groups=8,
)


def build_unet(**overrides: Any):
    """A freshly initialised restoration UNet (`UNET_CONFIG` with `overrides`)."""
    from diffusers import UNet2DModel

    unknown = sorted(set(overrides) - set(UNET_CONFIG))
    if unknown:
        raise ValueError(f"restoration UNet config: unknown key(s) {unknown}; known keys are {sorted(UNET_CONFIG)}")
    return UNet2DModel(**{**UNET_CONFIG, **overrides})


@torch.no_grad()
def build_pixel_vqvae():
    """A `VQModel` whose `decode(z)` returns z rounded to the 256 levels of an 8-bit image.

    Hand-set weights, nothing trained. With `norm_type="spatial"` the decoder's last norm is
    `norm(h) * conv_y(zq) + conv_b(zq)`; conv_y = 0 and conv_b = [+1, -1, 0, ...] give the
    channels (zq, -zq, 0, ...), and since silu(z) - silu(-z) = z, conv_out = [+1, -1] at the
    kernel centre returns zq. The codebook is the 256 values -1 + 2k/255 (vq_embed_dim 1), so the
    quantiser rounds to what saving the image as 8 bits would keep. The encoder is unused (the
    pipeline never encodes)."""
    from diffusers import VQModel

    vq = VQModel(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=1,
        sample_size=IMAGE_SIZE,
        num_vq_embeddings=256,
        norm_num_groups=32,
        vq_embed_dim=1,
        scaling_factor=1.0,
        norm_type="spatial",
        mid_block_add_attention=False,
    )
    for p in vq.parameters():
        p.zero_()
    vq.quantize.embedding.weight.copy_(torch.linspace(-1.0, 1.0, 256).unsqueeze(1))
    vq.post_quant_conv.weight.fill_(1.0)  # 1x1, 1 -> 1 channel: identity
    norm = vq.decoder.conv_norm_out  # SpatialNorm
    norm.conv_b.weight[0, 0] = 1.0
    norm.conv_b.weight[1, 0] = -1.0
    out = vq.decoder.conv_out
    k = out.kernel_size[0] // 2
    out.weight[0, 0, k, k] = 1.0
    out.weight[0, 1, k, k] = -1.0
    # the GroupNorm inside SpatialNorm keeps weight 1 so that norm(h) stays finite (it is then x 0)
    norm.norm_layer.weight.fill_(1.0)
    return vq.eval().requires_grad_(False)


# ---- degradations --------------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, size: int) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :]).float()


def blur(x: Tensor, sigma: float = BLUR_SIGMA, size: int = BLUR_KERNEL) -> Tensor:
    k = _gaussian_kernel(sigma, size).to(x)[None, None]
    pad = size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), k.expand(x.shape[1], 1, -1, -1), groups=x.shape[1])


def condition_image(degraded: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """The network's conditioning: the degraded image at the target size (bicubic when smaller)."""
    if degraded.shape[-1] == size and degraded.shape[-2] == size:
        return degraded
    return F.interpolate(degraded, size=(size, size), mode="bicubic", align_corners=False)


def bicubic_baseline(low: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Bicubic x4 upsampling of the 8x8 input, clamped to [-1, 1] (the SR baseline)."""
    return condition_image(low, size).clamp(-1, 1)


def degrade(kind: str, target: Tensor, low: Tensor | None, noise: Tensor | None = None) -> Tensor:
    """The degraded image of `kind` at its own size.

    Args:
        kind:   one of DEGRADATIONS.
        target: (B, 1, 32, 32) clean images in [-1, 1].
        low:    (B, 1, 8, 8) the 8x8 originals (sr4 only).
        noise:  (B, 1, 32, 32) standard normal draws (noise only).
    """
    if kind == "sr4":
        if low is None:
            raise ValueError("degrade('sr4', ...): the 8x8 originals are needed")
        return low
    if kind == "noise":
        if noise is None:
            raise ValueError("degrade('noise', ...): standard normal draws are needed")
        return target + NOISE_STD * noise
    if kind == "blur":
        return blur(target)
    raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {kind!r}")


@dataclass
class RestorationPairs:
    kind: str
    target: Tensor  # (N, 1, 32, 32)
    degraded: Tensor  # (N, 1, h, w)
    condition: Tensor  # (N, 1, 32, 32)
    labels: Tensor  # (N,)
    index: Tensor  # (N,) positions in scikit-learn's digits


def restoration_split() -> tuple[Tensor, Tensor]:
    """(train, held-out) indices into the 1,797 digits: the fixed rule of `split_indices`."""
    return split_indices(1797, val_fraction=0.2, seed=0)


def _heldout_noise(index: Tensor) -> Tensor:
    return torch.stack(
        [
            torch.randn(
                1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(_HELDOUT_NOISE_SEED + int(i))
            )
            for i in index
        ]
    )


def restoration_pairs(kind: str, split: str = "heldout", limit: int | None = None) -> RestorationPairs:
    """The fixed pairs of one degradation on one split ("train" or "heldout"); the noise of the
    noise degradation is a fixed function of the image index (so the pairs never change)."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {kind!r}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    train, held = restoration_split()
    index = train if split == "train" else held
    if limit is not None:
        index = index[:limit]
    x32, y = load_digits_tensors()
    x8, _ = load_digits_tensors(size=8)
    target, low = x32[index], x8[index]
    noise = _heldout_noise(index) if kind == "noise" else None
    deg = degrade(kind, target, low, noise)
    return RestorationPairs(kind, target, deg, condition_image(deg), y[index], index)


class TrainingDegrader(nn.Module):
    """Fresh degradations of training images, drawn from a generator: a kind uniformly from
    `kinds` per image, fresh noise for the noise degradation. Returns the conditioning images."""

    def __init__(self, kinds: tuple[str, ...] = DEGRADATIONS):
        super().__init__()
        bad = [k for k in kinds if k not in DEGRADATIONS]
        if bad or not kinds:
            raise ValueError(f"degradations must be a non-empty subset of {DEGRADATIONS}, got {list(kinds)}")
        self.kinds = tuple(kinds)

    def forward(self, target: Tensor, low: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        b = target.shape[0]
        which = torch.randint(0, len(self.kinds), (b,), generator=g)
        noise = torch.randn(target.shape, generator=g).to(target)
        cond = torch.empty_like(target)
        for j, kind in enumerate(self.kinds):
            m = (which == j).to(target.device)
            if m.any():
                cond[m] = condition_image(degrade(kind, target[m], low[m], noise[m]))
        return cond, which


def training_pairs(kinds: tuple[str, ...] = DEGRADATIONS):
    """For the training entry point: (real_data, pair_cond). `real_data()` gives the train
    split's 32x32 targets (N, 1, 32, 32) and labels; `pair_cond(indices, generator)` the
    condition {"image": (B, 1, 32, 32)} of those targets, freshly degraded (a kind drawn
    uniformly from `kinds` per image, fresh noise)."""
    train, _ = restoration_split()
    x32, y = load_digits_tensors()
    x8, _ = load_digits_tensors(size=8)
    targets, lows, labels = x32[train], x8[train], y[train]
    degrader = TrainingDegrader(kinds)

    def real_data() -> tuple[Tensor, Tensor]:
        return targets, labels

    def pair_cond(index: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        index = index.cpu().long()
        cond, _ = degrader(targets[index], lows[index], g)
        return {"image": cond}

    return real_data, pair_cond
