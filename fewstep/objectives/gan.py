"""The DMD2 discriminator: a small classifier head on the fake score's bottleneck features.

    tap = FeatureTap(bottleneck_block(backbone))          # a forward hook, idle unless capturing
    head = DiscriminatorHead(channels, latent_hw)
    with tap.capture():
        fake(x_t, t, cond, output="native")                # the fake score's own forward pass
    logits = head(tap.features)                            # (B,)

The features are the UNet mid-block output (B, C, h, w) or, for transformers (DiT, PixArt, SD3,
Flux), the image tokens (B, N, D) after a chosen block, laid back onto their grid. The head
follows DMD2's shape: strided 4x4 convolutions with GroupNorm and SiLU down to one logit.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureTap", "DiscriminatorHead", "bottleneck_block", "generator_gan_loss", "discriminator_gan_loss"]


def bottleneck_block(backbone: nn.Module, block: int | None = None) -> tuple[nn.Module, int]:
    """The module whose output feeds the head, and its channel count.

    UNet2DModel / UNet2DConditionModel: `mid_block` (channels = last block_out_channels).
    Transformers: `transformer_blocks[block]` (default the middle one; channels = heads x head dim).
    """
    cfg = getattr(backbone, "config", {})
    mid = getattr(backbone, "mid_block", None)
    if mid is not None:
        return mid, int(cfg["block_out_channels"][-1])
    blocks = getattr(backbone, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        i = len(blocks) // 2 if block is None else int(block)
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"objective.gan_block={block} is out of range: the backbone has {len(blocks)} "
                             "transformer blocks")
        return blocks[i], int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    raise ValueError(f"objective.gan needs a backbone with a `mid_block` (UNet) or `transformer_blocks` "
                     f"(DiT, PixArt, SD3, Flux); {type(backbone).__name__} has neither")


class FeatureTap:
    """Keeps the output of one block while `capture()` is open (so passes of other roles through
    a shared backbone are ignored). Tuple outputs (SD3 / Flux joint blocks return text and image
    streams) give their last tensor, the image tokens."""

    def __init__(self, block: nn.Module):
        self.features: Tensor | None = None
        self._on = False
        self._handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if not self._on:
            return
        if isinstance(output, (tuple, list)):
            output = [o for o in output if torch.is_tensor(o)][-1]
        self.features = output

    @contextmanager
    def capture(self) -> Iterator["FeatureTap"]:
        self._on, self.features = True, None
        try:
            yield self
        finally:
            self._on = False

    def take(self) -> Tensor:
        """The captured features (and forget them, so no graph is kept alive)."""
        if self.features is None:
            raise RuntimeError("the GAN feature hook saw no forward pass of the fake score")
        f, self.features = self.features, None
        return f

    def remove(self) -> None:
        self._handle.remove()


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DiscriminatorHead(nn.Module):
    """Bottleneck features -> one logit per sample.

    Args:
        in_channels: feature channels (UNet mid-block channels, transformer width).
        latent_hw:   (H, W) of the latents, used to lay transformer tokens back onto their grid.
        width:       channels of the head's convolutions.

    The features are average-pooled to 4x4 (any resolution trains the same head), then two
    stride-2 4x4 convolutions with GroupNorm and SiLU reach 1x1, and a 1x1 convolution gives the
    logit.
    """

    def __init__(self, in_channels: int, latent_hw: tuple[int, int], width: int = 128):
        super().__init__()
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(in_channels), in_channels),
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
            nn.GroupNorm(_groups(width), width),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.GroupNorm(_groups(width), width),
            nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def grid(self, features: Tensor) -> Tensor:
        """(B, C, h, w) as it is; (B, N, D) tokens -> (B, D, h, w) with h/w the latents' aspect."""
        if features.ndim == 4:
            return features
        if features.ndim != 3:
            raise ValueError(f"GAN features must be (B, C, h, w) or (B, N, D), got {tuple(features.shape)}")
        b, n, d = features.shape
        hh, ww = self.latent_hw
        h = max(1, round(math.sqrt(n * hh / ww)))
        if n % h:
            h = 1
        return features.transpose(1, 2).reshape(b, d, h, n // h)

    def forward(self, features: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.grid(features.float()), 4)
        return self.net(x).flatten(1).mean(1)


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(x_hat)) (DMD2, eq. 6)."""
    return F.softplus(-logits_fake.float()).mean()


def discriminator_gan_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """softplus(D(sg x_hat)) + softplus(-D(x_real))."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
