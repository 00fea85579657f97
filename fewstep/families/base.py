"""The record every backbone family fills in, and the pieces several families share.

A `Family` is everything fewstep knows about one kind of diffusers backbone: which classes it is,
which pipelines carry it, how it is called (its conditioner), how prompts become its condition,
where LoRA adapters go, which layer feeds the GAN head, whether it can take an LCM w-embedding,
and how its stock pipeline drives a scheduler (what export replays). Nothing outside
`fewstep/families/` names a backbone class; objectives and samplers ask the record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "ATTN",
    "FF",
    "JOINT",
    "SD_UNET",
    "UNET_CONV",
    "Drive",
    "Family",
    "mid_block_tap",
    "t5_length",
    "transformer_block_tap",
    "transformer_time_embedding",
    "unet_time_embedding",
    "unet_w_embedding",
]


@dataclass(frozen=True)
class Drive:
    """How a stock pipeline class drives its scheduler (read from diffusers' `__call__` of each
    class); export replays exactly these calls to check a scheduler configuration."""

    backbone: str  # the component that holds the network ("transformer" / "unet")
    init_sigma: bool  # latents *= scheduler.init_noise_sigma
    scale_input: bool  # calls scheduler.scale_model_input
    step_generator: bool  # passes its `generator` (and eta=0) to scheduler.step when accepted
    call_kwargs: tuple[str, ...]  # schedule arguments its __call__ forwards to set_timesteps
    flux_sigmas: bool = False  # FluxPipeline: sigmas default to linspace(1, 1/n, n), mu always passed
    one_step_output: int = 0  # PixArt-alpha takes step(...)[1] (pred_original_sample) at one step
    begin_index: bool = False  # calls scheduler.set_begin_index(0) before the loop
    step_on_scaled: bool = False  # DiTPipeline passes the scale_model_input output to step as the sample
    conditioning: str = "text"  # "labels" or "text"
    lora: str | None = None  # the keyword of `save_lora_weights` for its backbone, if it loads LoRA
    hybrid: bool = False  # __call__ takes latents, step callbacks and custom timesteps, so the
    #   model card's diffusers-only hybrid sampling snippet runs


def _always(backbone: nn.Module) -> bool:
    return True


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one record per family
class Family:
    """One backbone family. Callables take the backbone (or the `fewstep.pipeline_teacher.Teacher`) as
    their first argument, so a record holds no state.

    Fields (all required unless a default is given):
        name:               short name used in configs (`teacher.family`) and run cards.
        backbone_classes:   diffusers model class names of the family (subclasses match too).
        pipeline_classes:   diffusers pipeline class names that carry it; the first is the stock one.
        text:               True for text-to-image families, False for class-conditional ones.
        conditioner:        (backbone, kwargs) -> Conditioner: how the backbone is called.
        conditioner_kwargs: the keyword arguments `conditioner` reads (null_embeds, zero_null, ...).
        null_kwargs:        teacher -> conditioner kwargs of its null condition, following the
                            pipeline's own practice (the encoding of "", zeros, the null class).
        lora_targets:       module-name suffixes that get LoRA adapters by default.
        gan_tap:            (backbone, block) -> (module, channels): the layer whose output feeds
                            the GAN head (`block` is `objective.gan_block`, None for the default).
        drives:             pipeline class -> `Drive`: what export replays; empty when the family
                            has no stock pipeline export supports.
        encode_prompts:     (teacher, prompts) -> cond, through the pipeline's `encode_prompt`
                            (text families only).
        num_classes:        (backbone, null_class) -> number of classes (class-conditional only).
        w_embedding:        (backbone, dim) -> None: give a student a zero-initialised LCM
                            w-embedding input; None when the family has none.
        time_embedding:     backbone -> [(TimestepEmbedding, its time projection), ...]: every
                            embedding of the backbone's timestep, where a second time input goes
                            (BOOT's trajectory time, TwinFlow's target time); None: it cannot take one.
        matches:            backbone -> bool, to tell apart families that share a class
                            (SD1.5 and SDXL are both UNet2DConditionModel).
        latent_patch:       latents are packed into p x p patches around the call (Flux: 2), so
                            the backbone's in_channels is C p^2 and latent sides are multiples of p.
        default_latent_size: latent side when the backbone's `sample_size` is not it (Flux: the
                            pipeline's `default_sample_size`, 128).
        fsdp_wrap:          FSDP wrap units by class name; None: the model's `_no_split_modules`.
        image_conditioned:  the conditioning image is concatenated to the noisy input on the
                            channels (LDMSuperResolutionPipeline's layout), so a sample has
                            in_channels / 2 channels.
    """

    name: str
    backbone_classes: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    text: bool
    conditioner: Callable[[nn.Module, dict[str, Any]], Any]
    conditioner_kwargs: tuple[str, ...]
    null_kwargs: Callable[[Any], dict[str, Any]]
    lora_targets: tuple[str, ...]
    gan_tap: Callable[[nn.Module, int | None], tuple[nn.Module, int]]
    drives: Mapping[str, Drive] = field(default_factory=dict)
    encode_prompts: Callable[[Any, list[str]], dict[str, Any]] | None = None
    num_classes: Callable[[nn.Module, int | None], int | None] | None = None
    w_embedding: Callable[[nn.Module, int], None] | None = None
    time_embedding: Callable[[nn.Module], list[tuple[nn.Module, nn.Module]]] | None = None
    matches: Callable[[nn.Module], bool] = _always
    latent_patch: int = 1
    default_latent_size: int | None = None
    fsdp_wrap: tuple[str, ...] | None = None
    image_conditioned: bool = False

    def is_backbone(self, backbone: nn.Module) -> bool:
        """True when `backbone` is (a subclass of) one of the family's classes and matches."""
        names = {c.__name__ for c in type(backbone).__mro__}
        return bool(names & set(self.backbone_classes)) and self.matches(backbone)


# ---- LoRA target pieces (the choices of the LCM-LoRA / DMD2 SDXL recipes) -----------------------
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
FF = ("ff.net.0.proj", "ff.net.2")
JOINT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
# text UNets (SD1.5 / SDXL): attention, feed-forward, transformer in/out, resnets, up/down samplers
SD_UNET = ATTN + FF + ("proj_in", "proj_out") + UNET_CONV + ("downsamplers.0.conv", "upsamplers.0.conv")


# ---- GAN feature taps ----------------------------------------------------------------------------
def mid_block_tap(backbone: nn.Module, block: int | None = None) -> tuple[nn.Module, int]:
    """UNets: the mid-block output (B, C, h, w); C = the last `block_out_channels`."""
    return backbone.mid_block, int(backbone.config["block_out_channels"][-1])


def transformer_block_tap(backbone: nn.Module, block: int | None = None) -> tuple[nn.Module, int]:
    """Transformers: the image tokens (B, N, D) after `transformer_blocks[block]` (default the
    middle one); D = heads x head dim."""
    blocks = backbone.transformer_blocks
    i = len(blocks) // 2 if block is None else int(block)
    if not -len(blocks) <= i < len(blocks):
        raise ValueError(
            f"objective.gan_block={block} is out of range: the backbone has {len(blocks)} transformer blocks"
        )
    cfg = backbone.config
    return blocks[i], int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


# ---- LCM w-embedding -----------------------------------------------------------------------------
def unet_w_embedding(backbone: nn.Module, dim: int) -> None:
    """UNet2DConditionModel: a zero-initialised `time_embedding.cond_proj` of input size `dim`
    (the `time_cond_proj_dim` of LCM UNets), recorded in the config for export."""
    te = backbone.time_embedding
    if getattr(te, "cond_proj", None) is None:
        ref = te.linear_1.weight
        te.cond_proj = nn.Linear(dim, te.linear_1.in_features, bias=False).to(ref.device, ref.dtype)
        nn.init.zeros_(te.cond_proj.weight)
        backbone.register_to_config(time_cond_proj_dim=dim)


# ---- where the timestep is embedded (a second time input: BOOT, TwinFlow) ---------------------------
def transformer_time_embedding(backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """DiT / PixArt / SD3 / Flux: every module holding a `time_proj` and a `timestep_embedder`
    (DiT has one per block; Flux's guidance embedder is not the timestep's)."""
    return [
        (m.timestep_embedder, m.time_proj)
        for m in backbone.modules()
        if getattr(m, "time_proj", None) is not None and getattr(m, "timestep_embedder", None) is not None
    ]


def unet_time_embedding(backbone: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The diffusers UNets: `time_embedding` fed by `time_proj` (SDXL's add_embedding is not the
    timestep's)."""
    return [(backbone.time_embedding, backbone.time_proj)]


def t5_length(teacher: Any) -> dict[str, Any]:
    """`max_sequence_length=` for pipelines with a T5 encoder, when the teacher sets one."""
    n = getattr(teacher, "max_sequence_length", None)
    return {} if n is None else {"max_sequence_length": n}
