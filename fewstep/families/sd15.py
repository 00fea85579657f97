"""Stable Diffusion 1.x / 2.x (`UNet2DConditionModel` without added conditions): CLIP text
embeddings; the null condition is the encoding of "". LCM pipelines share it."""
from __future__ import annotations

import torch

from ..conditioning import UNetTextConditioner
from .base import SD_UNET, Drive, Family, mid_block_tap, unet_w_embedding


def text_unet_conditioner(backbone, kw):
    """SD1.5 and SDXL: `UNetTextConditioner` (SDXL's added conditions are read from its config)."""
    return UNetTextConditioner(kw.get("null_embeds"), kw.get("null_pooled"), kw.get("zero_null", False))


def _encode(t, prompts):
    pe, _ = t.pipeline.encode_prompt(prompts, t.device, 1, False)
    return {"encoder_hidden_states": pe.float()}


def _null_kwargs(t):
    return {"null_embeds": t.encode_prompts([""])["encoder_hidden_states"]}


def _is_sd15(backbone: torch.nn.Module) -> bool:
    return getattr(backbone, "config", {}).get("addition_embed_type") != "text_time"


FAMILY = Family(
    name="sd15",
    backbone_classes=("UNet2DConditionModel",),
    pipeline_classes=("StableDiffusionPipeline", "LatentConsistencyModelPipeline"),
    text=True,
    conditioner=text_unet_conditioner,
    conditioner_kwargs=("null_embeds", "null_pooled", "zero_null"),
    null_kwargs=_null_kwargs,
    lora_targets=SD_UNET,
    gan_tap=mid_block_tap,
    drives={"StableDiffusionPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"),
                                             lora="unet_lora_layers")},
    encode_prompts=_encode,
    w_embedding=unet_w_embedding,
    matches=_is_sd15,
)
