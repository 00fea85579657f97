"""DiT (`DiTTransformer2DModel` in a `DiTPipeline`): class-conditional latent transformer; the
embedded digits teachers are of this family."""

from __future__ import annotations

from ..conditioning import ClassConditioner
from .base import ATTN, FF, Drive, Family, transformer_block_tap, transformer_time_embedding


def _conditioner(backbone, kw):
    cfg = backbone.config
    # the null class is num_embeds_ada_norm (1000 in DiTPipeline): the label dropped in training
    return ClassConditioner(
        null_class=kw.get("null_class", cfg.get("num_embeds_ada_norm")), in_channels=cfg.get("in_channels"), kind="dit"
    )


def _null_kwargs(teacher):
    return {"null_class": teacher.denoiser.backbone.config.get("num_embeds_ada_norm")}


def _num_classes(backbone, null_class):
    return int(backbone.config.get("num_embeds_ada_norm") or 1000)


# the record is a table (related fields share a line): kept as written by the formatter
# fmt: off
FAMILY = Family(
    name="dit", text=False, backbone_classes=("DiTTransformer2DModel",), pipeline_classes=("DiTPipeline",),
    conditioner=_conditioner, conditioner_kwargs=("null_class",), null_kwargs=_null_kwargs, num_classes=_num_classes,
    lora_targets=ATTN + FF, gan_tap=transformer_block_tap, time_embedding=transformer_time_embedding,
    drives={"DiTPipeline": Drive("transformer", False, True, False, (), conditioning="labels", step_on_scaled=True)},
    # the output layer reuses the first block's embedding after the blocks ran, so the blocks
    # cannot be resharded separately: DiT is sharded as one unit
    fsdp_wrap=(),
)
# fmt: on
