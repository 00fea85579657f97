"""The DMD2 discriminator: a small classifier head on the fake score's bottleneck features.

    layer, channels = feature_layer(backbone)             # which module feeds the head
    tap = FeatureTap(layer)                                # a forward hook, idle unless capturing
    head = DiscriminatorHead(channels, latent_hw)
    with tap.capture():
        fake(x_t, t, cond, output="native")                # the fake score's own forward pass
    logits = head(tap.take())                              # (B,)
    with tap.capture(stop=True):                           # only the features are wanted: the
        fake(x_t, t, cond, output="native")                #   pass ends after the tapped layer
    logits = head(tap.take())

The feature hook. The layer is, in this order: the module named by `objective.gan_feature_layer`
(a dotted path inside the backbone, e.g. "mid_block" or "blocks.3"; any nn.Module backbone),
else the family's tap (`Family.gan_tap` in `fewstep.families`: the UNet mid-block output
(B, C, h, w), or the image tokens (B, N, D) after a transformer block, laid back onto their
grid). A backbone of no known family without the key is refused with a message naming it. The
head follows DMD2's shape: strided 4x4 convolutions with GroupNorm and SiLU down to one logit.

The early exit. A pass that needs only the features (the GAN samples) is ended by the hook itself:
once the tapped layer has run, the hook raises a private exception that `capture(stop=True)`
swallows, so the layers after the tap (a UNet's whole decoder, a transformer's later blocks) never
run, forward or backward. It works through any wrapper that lets exceptions pass (the Denoiser,
shared-base role views, DDP) and needs nothing from the backbone. `FeatureTap(early_exit=False)`
turns it off (sharded backbones: FSDP's own hooks on the layers after the tap must run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..families import family_of

__all__ = [
    "FeatureTap",
    "DiscriminatorHead",
    "feature_layer",
    "output_width",
    "generator_gan_loss",
    "discriminator_gan_loss",
]


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
        return module, output_width(module, layer)
    fam = family_of(backbone)
    if fam is None:
        raise ValueError(
            f"objective.gan: {type(backbone).__name__} is of no known backbone family; set "
            "objective.gan_feature_layer to the dotted path of the layer whose output feeds the "
            "head (e.g. 'mid_block')"
        )
    return fam.gan_tap(backbone, block)


def output_width(module: nn.Module, layer: str) -> int:
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


class _FeaturesReady(Exception):
    """Raised by a stopping `FeatureTap` once the tapped layer has run; never leaves `capture`."""

    def __init__(self, tap: FeatureTap):
        super().__init__("GAN features captured")
        self.tap = tap


class FeatureTap:
    """Keeps the output of one block while `capture()` is open (so passes of other roles through
    a shared backbone are ignored). Tuple outputs (SD3 / Flux joint blocks return text and image
    streams) give their last tensor, the image tokens.

    Args:
        block:      the tapped module.
        early_exit: allow `capture(stop=True)` to end the pass after the tapped block; False makes
                    every pass run to the end (the features are the same either way).
    """

    def __init__(self, block: nn.Module, early_exit: bool = True):
        self.features: Tensor | None = None
        self.early_exit = bool(early_exit)
        self._on = False
        self._stop = False
        self._handle = block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if not self._on:
            return
        if isinstance(output, (tuple, list)):
            output = [o for o in output if torch.is_tensor(o)][-1]
        self.features = output
        if self._stop:
            raise _FeaturesReady(self)

    @contextmanager
    def capture(self, stop: bool = False) -> Iterator[FeatureTap]:
        """Record the tapped block's output during the passes run inside. With `stop` (and
        `early_exit`), the first pass ends right after the tapped block: its return value is
        never produced, so call the network for the features only."""
        self._on, self._stop, self.features = True, bool(stop) and self.early_exit, None
        try:
            yield self
        except _FeaturesReady as e:
            if e.tap is not self:
                raise
        finally:
            self._on = self._stop = False

    def take(self) -> Tensor:
        """The captured features (and forget them, so no graph is kept alive)."""
        if self.features is None:
            raise RuntimeError("the GAN feature hook saw no forward pass of the feature network")
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
