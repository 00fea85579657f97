"""PixArt-alpha / -Sigma (`PixArtTransformer2DModel`): T5 embeddings with an attention mask,
learned-sigma output; the null condition is the T5 encoding of "" and its mask."""

from __future__ import annotations

from ..conditioning import PixArtConditioner
from .base import ATTN, FF, Drive, Family, t5_length, transformer_block_tap, transformer_time_embedding


def _conditioner(backbone, kw):
    return PixArtConditioner(
        kw.get("null_embeds"),
        kw.get("null_mask"),
        backbone.config.get("in_channels"),
        vae_scale_factor=kw.get("vae_scale_factor", 8),
    )


def _encode(t, prompts):
    pe, mask, _, _ = t.pipeline.encode_prompt(
        prompts, do_classifier_free_guidance=False, device=t.device, clean_caption=False, **t5_length(t)
    )
    return {"encoder_hidden_states": pe.float(), "encoder_attention_mask": mask.long()}


def _null_kwargs(t):
    e = t.encode_prompts([""])
    return {
        "null_embeds": e["encoder_hidden_states"],
        "null_mask": e["encoder_attention_mask"],
        "vae_scale_factor": t.vae_scale_factor,
    }


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="pixart", text=True, backbone_classes=("PixArtTransformer2DModel",),
    pipeline_classes=("PixArtAlphaPipeline", "PixArtSigmaPipeline"), encode_prompts=_encode,
    conditioner=_conditioner, conditioner_kwargs=("null_embeds", "null_mask", "vae_scale_factor"),
    null_kwargs=_null_kwargs, lora_targets=ATTN + FF, gan_tap=transformer_block_tap, time_embedding=transformer_time_embedding,
    drives={
        "PixArtAlphaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas"), one_step_output=1,
                                     begin_index=True),
        "PixArtSigmaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas")),
    },
)
# fmt: on
