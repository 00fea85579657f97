"""Image-conditioned pixel-space `UNet2DModel` (restoration): the conditioning image is
concatenated to the noisy input on the channels, as `LDMSuperResolutionPipeline` concatenates it
(`in_channels = 2 * out_channels`). The embedded restoration teacher is of this family
(`fewstep.digits.restoration`).

    cond = {"image": (B, C, H, W)}     # the degraded image, already at the output size

No classifier-free guidance: there is no null image.
"""

from __future__ import annotations

import torch

from ..conditioning import Conditioner, _need
from .base import ATTN, UNET_CONV, Family, mid_block_tap, unet_time_embedding

USAGE = "{'image': (B, C, H, W)} (the degraded image at the output size)"


def is_concat_unet(backbone) -> bool:
    """A UNet2DModel whose input channels are twice its output channels and that has no class
    embedding: the image-conditioned layout."""
    cfg = backbone.config
    return (
        cfg.get("num_class_embeds") is None
        and cfg.get("class_embed_type") is None
        and int(cfg.get("in_channels", 0)) == 2 * int(cfg.get("out_channels", -1))
    )


class ImageConcatConditioner(Conditioner):
    """Call `backbone(cat([x, cond["image"]], 1), timestep)`."""

    def call(self, backbone, x, timestep, cond):
        _need(cond, ("image",), "image-conditioned UNet2DModel", USAGE)
        img = cond["image"]
        want = (x.shape[0], int(backbone.config["in_channels"]) - x.shape[1], *x.shape[2:])
        if not torch.is_tensor(img) or tuple(img.shape) != want:
            got = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f"cond['image'] must have shape {want} (batch, channels, height, width of x), got {got}")
        return backbone(torch.cat([x, img.to(x.dtype)], 1), timestep).sample

    def null(self, cond, batch):
        raise ValueError("the image-conditioned UNet has no unconditional input: use guidance 1")


def _conditioner(backbone, kw):
    return ImageConcatConditioner()


def _num_classes(backbone, null_class):
    return None


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="restore", text=False, backbone_classes=("UNet2DModel",), pipeline_classes=("LDMSuperResolutionPipeline",),
    conditioner=_conditioner, conditioner_kwargs=(), null_kwargs=lambda teacher: {}, num_classes=_num_classes,
    lora_targets=ATTN + UNET_CONV, gan_tap=mid_block_tap, time_embedding=unet_time_embedding, fsdp_wrap=("ResnetBlock2D",),
    matches=is_concat_unet, image_conditioned=True,
    drives={},  # students export through fewstep.restoration.export (the pipeline takes an image, not labels)
)
# fmt: on
