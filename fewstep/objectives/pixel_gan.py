"""A pixel-space discriminator: trainable heads on a frozen image backbone's feature maps.

Flash-DMD's adversarial term reads images, not noisy latents: the student's x0 prediction is
decoded to pixels and judged by heads on a frozen perception network's features (the paper uses a
segmentation model). Here

    feats = backbone(images)                  # frozen: a list of (B, C_i, h_i, w_i) feature maps
    logit = mean_i mean_hw head_i(feats[i])   # one patch head per map, averaged to one logit

`backbone` is what `pixel_backbone` names:
- "vae_encoder": the teacher's own VAE encoder (its input convolution, each down block and the mid
  block), which every latent teacher ships, so nothing is downloaded. It was trained to
  reconstruct images, not to classify them, so its features carry no judge's notion of class.
- "module.path:factory": any user backbone, e.g. a local segmentation model: `factory()` returns an
  nn.Module mapping images in [-1, 1] to a list of feature maps, with a `channels` attribute (one
  width per map).

The backbone is held outside the objective's networks: frozen, never trained, never saved. Only
the heads train (in the fake-score group, as DMD2's head does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import import_factory

__all__ = ["VAEEncoderFeatures", "PixelDiscriminator", "make_pixel_backbone"]


class VAEEncoderFeatures(nn.Module):
    """The feature maps of a diffusers VAE encoder: after conv_in, after each down block and after
    the mid block. Frozen; images in [-1, 1] (the VAE's own input convention)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        enc = getattr(vae, "encoder", None)
        if enc is None or not all(hasattr(enc, a) for a in ("conv_in", "down_blocks", "mid_block")):
            raise ValueError(
                f"objective.pixel_backbone='vae_encoder': the teacher's VAE ({type(vae).__name__}) has no "
                "diffusers encoder (conv_in, down_blocks, mid_block); name a backbone factory instead"
            )
        self.encoder = enc
        self.encoder.requires_grad_(False)
        widths = [enc.conv_in.out_channels]
        for blk in enc.down_blocks:
            widths.append(_out_channels(blk))
        widths.append(widths[-1])  # the mid block keeps the last width
        self.channels = widths

    def forward(self, images: Tensor) -> list[Tensor]:
        enc = self.encoder
        dt = enc.conv_in.weight.dtype
        h = enc.conv_in(images.to(dt))
        feats = [h]
        for blk in enc.down_blocks:
            h = blk(h)
            feats.append(h)
        h = enc.mid_block(h)
        feats.append(h)
        return [f.float() for f in feats]


def _out_channels(block: nn.Module) -> int:
    resnets = getattr(block, "resnets", None)
    if resnets:
        return int(resnets[-1].out_channels)
    raise ValueError(f"objective.pixel_backbone='vae_encoder': cannot read the width of {type(block).__name__}")


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class PixelDiscriminator(nn.Module):
    """One patch head per feature map (3x3 conv, GroupNorm, SiLU, 1x1 conv to a logit map); the
    logit of an image is the mean over heads of each head's spatial mean."""

    def __init__(self, channels: list[int], width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(int(c), width, 3, padding=1),
                nn.GroupNorm(_groups(width), width),
                nn.SiLU(),
                nn.Conv2d(width, 1, 1),
            )
            for c in channels
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(f"pixel discriminator: {len(feats)} feature maps for {len(self.heads)} heads")
        logits = [head(f.float()).flatten(1).mean(1) for head, f in zip(self.heads, feats)]
        return torch.stack(logits, 0).mean(0)


def make_pixel_backbone(name: str, vae: Any = None) -> nn.Module:
    """The frozen feature network `objective.pixel_backbone` names (see the module docstring)."""
    if name == "vae_encoder":
        if vae is None:
            raise ValueError(
                "objective.pixel_backbone='vae_encoder' needs a teacher with a VAE; this teacher has none "
                "(name a backbone factory, 'module.path:factory')"
            )
        net = VAEEncoderFeatures(vae)
    elif ":" in name:
        net = import_factory("objective.pixel_backbone", name)()
        if not isinstance(net, nn.Module) or not getattr(net, "channels", None):
            raise ValueError(
                f"objective.pixel_backbone={name!r}: the factory must return an nn.Module with a `channels` "
                "list (one width per feature map)"
            )
    else:
        raise ValueError(f"objective.pixel_backbone={name!r} is not 'vae_encoder' or 'module.path:factory'")
    net.requires_grad_(False)
    net.eval()
    return net
