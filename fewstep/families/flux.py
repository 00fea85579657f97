"""Flux (`FluxTransformer2DModel`): latents packed into 2x2 patches, CLIP pooled + T5 text, a
flow-matching path with a resolution-dependent shift; Flux-dev takes its guidance scale as an
input (`guidance_embeds`)."""

from __future__ import annotations

from ..conditioning import FluxConditioner
from .base import ATTN, FF, JOINT, Drive, Family, t5_length, transformer_block_tap, transformer_time_embedding
from .sd3 import pooled_null_kwargs


def _conditioner(backbone, kw):
    return FluxConditioner(
        guidance_embeds=bool(backbone.config.get("guidance_embeds", False)),
        null_embeds=kw.get("null_embeds"),
        null_pooled=kw.get("null_pooled"),
        default_guidance=kw.get("default_guidance", 3.5),
    )


def _encode(t, prompts):
    pe, pooled, _ = t.pipeline.encode_prompt(prompts, None, device=t.device, **t5_length(t))
    return {"encoder_hidden_states": pe.float(), "pooled_projections": pooled.float()}


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="flux", text=True, backbone_classes=("FluxTransformer2DModel",), pipeline_classes=("FluxPipeline",),
    conditioner=_conditioner, conditioner_kwargs=("null_embeds", "null_pooled", "default_guidance"),
    null_kwargs=pooled_null_kwargs, encode_prompts=_encode, lora_targets=ATTN + FF + JOINT + ("proj_mlp", "proj_out"),
    gan_tap=transformer_block_tap, time_embedding=transformer_time_embedding, drives={"FluxPipeline": Drive(
        "transformer", False, False, False, ("sigmas",), flux_sigmas=True, begin_index=True,
        lora="transformer_lora_layers")},
    latent_patch=2, default_latent_size=128,  # FluxPipeline.default_sample_size
)
# fmt: on
