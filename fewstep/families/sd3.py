"""Stable Diffusion 3 (`SD3Transformer2DModel`): joint text embeddings (CLIP-L, CLIP-G and T5)
plus pooled projections, a flow-matching path; the null condition is the encoding of ""."""

from __future__ import annotations

from ..conditioning import SD3Conditioner
from .base import ATTN, FF, JOINT, Drive, Family, t5_length, transformer_block_tap, transformer_time_embedding


def _conditioner(backbone, kw):
    return SD3Conditioner(kw.get("null_embeds"), kw.get("null_pooled"), kw.get("zero_null", False))


def _encode(t, prompts):
    pe, _, pooled, _ = t.pipeline.encode_prompt(
        prompts, None, None, device=t.device, do_classifier_free_guidance=False, **t5_length(t)
    )
    return {"encoder_hidden_states": pe.float(), "pooled_projections": pooled.float()}


def pooled_null_kwargs(t):
    """SD3 and Flux: the encoding of "" as the null prompt and pooled embeddings."""
    e = t.encode_prompts([""])
    return {"null_embeds": e["encoder_hidden_states"], "null_pooled": e["pooled_projections"]}


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="sd3", text=True, backbone_classes=("SD3Transformer2DModel",), pipeline_classes=("StableDiffusion3Pipeline",),
    conditioner=_conditioner, conditioner_kwargs=("null_embeds", "null_pooled", "zero_null"),
    null_kwargs=pooled_null_kwargs, encode_prompts=_encode, lora_targets=ATTN + FF + JOINT,
    gan_tap=transformer_block_tap, time_embedding=transformer_time_embedding, drives={"StableDiffusion3Pipeline": Drive(
        "transformer", False, False, False, ("sigmas",), lora="transformer_lora_layers")},
)
# fmt: on
