"""Pixel-space `UNet2DModel` (DDPM / DDIM pipelines), unconditional or class-conditional
through `num_class_embeds` (one reserved class is the null label)."""

from __future__ import annotations

from ..conditioning import ClassConditioner
from .base import ATTN, UNET_CONV, Family, mid_block_tap, unet_time_embedding


def _not_image_conditioned(backbone) -> bool:
    from .restore import is_concat_unet  # the image-conditioned layout is the restore family's

    return not is_concat_unet(backbone)


def _conditioner(backbone, kw):
    return ClassConditioner(
        null_class=kw.get("null_class"), in_channels=backbone.config.get("in_channels"), kind="unet"
    )


def _null_kwargs(teacher):
    n = teacher.denoiser.backbone.config.get("num_class_embeds")
    return {"null_class": None if n is None else int(n) - 1}


def _num_classes(backbone, null_class):
    n = backbone.config.get("num_class_embeds")
    return (null_class if null_class is not None else n) if n else None


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="unet", text=False, backbone_classes=("UNet2DModel",), pipeline_classes=("DDPMPipeline", "DDIMPipeline"),
    conditioner=_conditioner, conditioner_kwargs=("null_class",), null_kwargs=_null_kwargs, num_classes=_num_classes,
    lora_targets=ATTN + UNET_CONV, gan_tap=mid_block_tap, time_embedding=unet_time_embedding, fsdp_wrap=("ResnetBlock2D",),
    matches=_not_image_conditioned,
    drives={},  # DDPMPipeline takes no class labels: no stock pipeline runs a class-conditional student
)
# fmt: on
