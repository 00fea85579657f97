"""Pixel-space `UNet2DModel` (DDPM / DDIM pipelines), unconditional or class-conditional
through `num_class_embeds` (one reserved class is the null label)."""
from __future__ import annotations

from ..conditioning import ClassConditioner
from .base import ATTN, UNET_CONV, Family, mid_block_tap


def _conditioner(backbone, kw):
    return ClassConditioner(null_class=kw.get("null_class"), in_channels=backbone.config.get("in_channels"),
                            kind="unet")


def _null_kwargs(teacher):
    n = teacher.denoiser.backbone.config.get("num_class_embeds")
    return {"null_class": None if n is None else int(n) - 1}


def _num_classes(backbone, null_class):
    n = backbone.config.get("num_class_embeds")
    return (null_class if null_class is not None else n) if n else None


FAMILY = Family(
    name="unet",
    backbone_classes=("UNet2DModel",),
    pipeline_classes=("DDPMPipeline", "DDIMPipeline"),
    text=False,
    conditioner=_conditioner,
    conditioner_kwargs=("null_class",),
    null_kwargs=_null_kwargs,
    lora_targets=ATTN + UNET_CONV,
    gan_tap=mid_block_tap,
    drives={},  # DDPMPipeline takes no class labels: no stock pipeline runs a class-conditional student
    num_classes=_num_classes,
    fsdp_wrap=("ResnetBlock2D",),
)
