"""Stable Diffusion XL (`UNet2DConditionModel` with "text_time" added conditions): two CLIP
encoders, pooled text embeddings and size / crop time ids; the null condition is zeros
(`force_zeros_for_empty_prompt`, what DMD2 and LCM-LoRA-SDXL use) unless the pipeline says otherwise."""

from __future__ import annotations

import torch

from .base import Drive
from .sd15 import text_unet_family


def _encode(t, prompts):
    pe, _, pooled, _ = t.pipeline.encode_prompt(
        prompts, device=t.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    h, w = t.image_size
    # original size, crop top-left, target size: the SDXL pipeline's defaults for an h x w image
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=t.device).expand(len(prompts), 6)
    return {"encoder_hidden_states": pe.float(), "text_embeds": pooled.float(), "time_ids": time_ids.clone()}


def _null_kwargs(t):
    if t.pipeline.config.get("force_zeros_for_empty_prompt", True):
        return {"zero_null": True}
    e = t.encode_prompts([""])
    return {"null_embeds": e["encoder_hidden_states"], "null_pooled": e["text_embeds"]}


def _is_sdxl(backbone: torch.nn.Module) -> bool:
    return getattr(backbone, "config", {}).get("addition_embed_type") == "text_time"


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = text_unet_family(
    name="sdxl", pipeline_classes=("StableDiffusionXLPipeline",), matches=_is_sdxl,
    null_kwargs=_null_kwargs, encode_prompts=_encode,
    drives={"StableDiffusionXLPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"), begin_index=True,
                                               lora="unet_lora_layers", hybrid=True)},
)
# fmt: on
