"""Stable Diffusion 1.x / 2.x (`UNet2DConditionModel` without added conditions): CLIP text
embeddings; the null condition is the encoding of "". LCM pipelines share it."""

from __future__ import annotations

import torch

from ..conditioning import UNetTextConditioner
from .base import SD_UNET, Drive, Family, mid_block_tap, unet_time_embedding, unet_w_embedding


def _conditioner(backbone, kw):
    # SDXL's added conditions are read from the backbone's config by the conditioner
    return UNetTextConditioner(kw.get("null_embeds"), kw.get("null_pooled"), kw.get("zero_null", False))


def text_unet_family(**fields) -> Family:
    """A `UNet2DConditionModel` family (SD1.5, SDXL): the call, LoRA targets (attention,
    feed-forward, transformer in/out, resnets, up/down samplers), the mid-block GAN tap and the
    LCM w-embedding are shared; `fields` give the rest."""
    return Family(
        backbone_classes=("UNet2DConditionModel",),
        text=True,
        conditioner=_conditioner,
        conditioner_kwargs=("null_embeds", "null_pooled", "zero_null"),
        lora_targets=SD_UNET,
        gan_tap=mid_block_tap,
        time_embedding=unet_time_embedding,
        w_embedding=unet_w_embedding,
        **fields,
    )


def _encode(t, prompts):
    pe, _ = t.pipeline.encode_prompt(prompts, t.device, 1, False)
    return {"encoder_hidden_states": pe.float()}


def _null_kwargs(t):
    return {"null_embeds": t.encode_prompts([""])["encoder_hidden_states"]}


def _is_sd15(backbone: torch.nn.Module) -> bool:
    return getattr(backbone, "config", {}).get("addition_embed_type") != "text_time"


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = text_unet_family(
    name="sd15", pipeline_classes=("StableDiffusionPipeline", "LatentConsistencyModelPipeline"), matches=_is_sd15,
    null_kwargs=_null_kwargs, encode_prompts=_encode,
    drives={"StableDiffusionPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"),
                                             lora="unet_lora_layers", hybrid=True)},
)
# fmt: on
