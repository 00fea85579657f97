"""The DMD2 discriminator: a small classifier head on the fake score's bottleneck features.

    layer, channels = feature_layer(backbone)             # which module feeds the head
    tap = FeatureTap(layer)                                # a forward hook, idle unless capturing
    head = DiscriminatorHead(channels, latent_hw)
    with tap.capture():
        fake(x_t, t, cond, output="native")                # the fake score's own forward pass
    logits = head(tap.features)                            # (B,)

The feature hook. The layer is, in this order: the module named by `objective.gan_feature_layer`
(a dotted path inside the backbone, e.g. "mid_block" or "blocks.3"; any nn.Module backbone),
else the family's tap (`Family.gan_tap` in `fewstep.families`: the UNet mid-block output
(B, C, h, w), or the image tokens (B, N, D) after a transformer block, laid back onto their
grid). A backbone of no known family without the key is refused with a message naming it. The
head follows DMD2's shape: strided 4x4 convolutions with GroupNorm and SiLU down to one logit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import family_of

__all__ = ["FeatureTap", "DiscriminatorHead", "feature_layer", "generator_gan_loss", "discriminator_gan_loss"]


def feature_layer(backbone: nn.Module, layer: str | None = None, block: int | None = None) -> tuple[nn.Module, int]:
    """The module whose output feeds the head, and its channel count.

    Args:
        backbone: the fake score's network.
        layer:    `objective.gan_feature_layer`, a dotted module path inside `backbone`; None: the
                  family's tap.
        block:    `objective.gan_block`, the transformer block of the family tap (None: the middle).
    """
    if layer is not None:
        try:
            module = backbone.get_submodule(layer)
        except AttributeError as e:
            raise ValueError(
                f"objective.gan_feature_layer={layer!r} names no module of {type(backbone).__name__}: {e}"
            ) from e
        return module, _output_width(module, layer)
    fam = family_of(backbone)
    if fam is None:
        raise ValueError(
            f"objective.gan: {type(backbone).__name__} is of no known backbone family; set "
            "objective.gan_feature_layer to the dotted path of the layer whose output feeds the "
            "head (e.g. 'mid_block')"
        )
    return fam.gan_tap(backbone, block)


def _output_width(module: nn.Module, layer: str) -> int:
    """Channels of a named layer's output: its `out_channels` / `out_features` / `num_channels`,
    else those of its last such submodule (checked against the features at the first pass)."""
    inner = list(module.modules())[1:]
    for m in [module, *reversed(inner)]:
        for attr in ("out_channels", "out_features", "num_channels", "normalized_shape"):
            v = getattr(m, attr, None)
            if isinstance(v, (tuple, list)) and len(v) == 1:
                v = v[0]
            if isinstance(v, int) and v > 0:
                return v
    raise ValueError(
        f"objective.gan_feature_layer={layer!r}: cannot tell the output channels of "
        f"{type(module).__name__}; name a layer with a Conv / Linear / norm inside"
    )


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
    def capture(self) -> Iterator[FeatureTap]:
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
        self.in_channels = int(in_channels)
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
        x = self.grid(features.float())
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"GAN features have {x.shape[1]} channels (shape {tuple(features.shape)}) but the "
                f"head expects {self.in_channels}: objective.gan_feature_layer names a layer "
                "with another output width"
            )
        return self.net(F.adaptive_avg_pool2d(x, 4)).flatten(1).mean(1)


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(x_hat)) (DMD2, eq. 6)."""
    return F.softplus(-logits_fake.float()).mean()


def discriminator_gan_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """softplus(D(sg x_hat)) + softplus(-D(x_real))."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
