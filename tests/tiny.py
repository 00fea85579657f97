"""Tiny randomly initialised diffusers backbones of every family, wrapped as fewstep Denoisers.

    tiny = make_tiny("sdxl", prediction="v_prediction")
    x = torch.randn(2, *tiny.latent_shape)
    x0 = tiny.denoiser(x, 0.5, tiny.cond(2), guidance=3.0)

The models are the real diffusers classes at a few thousand to a few hundred thousand
parameters (as in diffusers' own tests), so a test exercises the same keyword arguments,
packing and output splitting as a full-size teacher. Output layers that diffusers zero-initialises
(DiT, PixArt, SD3, Flux final layers, adaLN gates) are perturbed so that outputs depend on the
inputs and gradients reach every layer. (One exception: in the last SD3 joint block the text
query projection `add_q_proj` gets a zero gradient, because diffusers drops the text stream's
output there; that is how SD3 is built.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.conditioning import Cond
from fewstep.denoiser import Denoiser
from fewstep.paths import FlowPath, VPPath

# sizes shared by the tiny models (and by tests that build matching text encoders)
TEXT_LEN = 6  # tokens per prompt
NUM_CLASSES = 10  # dit / unet class-conditional; the null class is NUM_CLASSES
SD15_TEXT_DIM = 16
SDXL_TEXT_DIM = 16  # cross-attention dim (two CLIP encoders concatenated, in the real thing)
SDXL_POOLED_DIM = 8
SDXL_TIME_DIM = 4  # addition_time_embed_dim; 6 time ids
PIXART_TEXT_DIM = 16  # caption_channels (T5 width)
SD3_TEXT_DIM = 16  # joint_attention_dim
SD3_POOLED_DIM = 12
FLUX_TEXT_DIM = 16
FLUX_POOLED_DIM = 8


@dataclass
class Tiny:
    """A tiny teacher: `.denoiser`, `.cond(batch_size, generator)`, `.latent_shape`, `.family`."""

    family: str
    denoiser: Denoiser
    latent_shape: tuple[int, int, int]
    make_cond: Callable[[int, torch.Generator | None], Cond] = field(repr=False)
    prediction: str = "epsilon"

    def cond(self, batch_size: int, generator: torch.Generator | None = None) -> Cond:
        """A random condition of the right shapes for `batch_size` samples (on the CPU)."""
        return self.make_cond(batch_size, generator)

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    @property
    def path(self):
        return self.denoiser.path


def vp_path(prediction: str = "epsilon") -> VPPath:
    """The SD/DiT training schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    return VPPath.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": prediction,
        }
    )


def perturb_(module: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    """Add small noise to parameters that are exactly zero (diffusers zero-initialises final
    projections and adaLN modulations), so outputs depend on inputs and every weight gets a
    gradient."""
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() and bool((p == 0).all()):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def _randn(shape, generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# ---- builders: each returns (backbone, latent_shape, make_cond, conditioner kwargs) ----------------
def _dit(seed):
    from diffusers import DiTTransformer2DModel

    bb = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        norm_num_groups=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )

    def cond(b, g):
        return {"class_labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}

    return bb, (4, 8, 8), cond, {}


def _pixel_unet(**kw):
    """The tiny pixel-space UNet2DModel (8x8, two levels) that the unet and restore families share."""
    from diffusers import UNet2DModel

    blocks = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
    size = {"sample_size": 8, "out_channels": 1, "layers_per_block": 1, "block_out_channels": (8, 16)}
    return UNet2DModel(**size, **blocks, norm_num_groups=4, attention_head_dim=8, **kw)


def _unet(seed):
    # pixel-space class-conditional UNet: one reserved class (NUM_CLASSES) is the null label
    bb = _pixel_unet(in_channels=1, num_class_embeds=NUM_CLASSES + 1)

    def cond(b, g):
        return {"class_labels": torch.randint(0, NUM_CLASSES, (b,), generator=g)}

    return bb, (1, 8, 8), cond, {"null_class": NUM_CLASSES}


def _restore(seed):
    # pixel-space image-conditioned UNet: the degraded image is concatenated on the channels
    bb = _pixel_unet(in_channels=2)

    def cond(b, g):
        return {"image": _randn((b, 1, 8, 8), g)}

    return bb, (1, 8, 8), cond, {}


def _sd15(seed):
    from diffusers import UNet2DConditionModel

    bb = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD15_TEXT_DIM,
        attention_head_dim=2,
    )
    g = torch.Generator().manual_seed(seed + 1)
    null = _randn((1, TEXT_LEN, SD15_TEXT_DIM), g)  # stands for the encoding of ""

    def cond(b, g):
        return {"encoder_hidden_states": _randn((b, TEXT_LEN, SD15_TEXT_DIM), g)}

    return bb, (4, 8, 8), cond, {"null_embeds": null}


def _sdxl(seed):
    from diffusers import UNet2DConditionModel

    bb = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_DIM,
        transformer_layers_per_block=(1, 1),
    )

    def cond(b, g):
        # time ids: original size, crop top-left, target size (pixels = 8 x latent size)
        time_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).expand(b, 6).clone()
        return {
            "encoder_hidden_states": _randn((b, TEXT_LEN, SDXL_TEXT_DIM), g),
            "text_embeds": _randn((b, SDXL_POOLED_DIM), g),
            "time_ids": time_ids,
        }

    return bb, (4, 8, 8), cond, {"zero_null": True}


def _pixart(seed):
    from diffusers import PixArtTransformer2DModel

    bb = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=PIXART_TEXT_DIM,
        use_additional_conditions=False,
        norm_num_groups=4,
    )
    g = torch.Generator().manual_seed(seed + 1)
    null = _randn((1, TEXT_LEN, PIXART_TEXT_DIM), g)
    null_mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    null_mask[:, :1] = 1  # "" is one end-of-sequence token

    def cond(b, g):
        lengths = torch.randint(2, TEXT_LEN + 1, (b,), generator=g)
        mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
        return {"encoder_hidden_states": _randn((b, TEXT_LEN, PIXART_TEXT_DIM), g), "encoder_attention_mask": mask}

    return bb, (4, 8, 8), cond, {"null_embeds": null, "null_mask": null_mask}


def _sd3(seed):
    from diffusers import SD3Transformer2DModel

    bb = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=SD3_POOLED_DIM,
        pos_embed_max_size=8,
    )
    g = torch.Generator().manual_seed(seed + 1)
    null = _randn((1, TEXT_LEN, SD3_TEXT_DIM), g)
    null_pooled = _randn((1, SD3_POOLED_DIM), g)

    def cond(b, g):
        return {
            "encoder_hidden_states": _randn((b, TEXT_LEN, SD3_TEXT_DIM), g),
            "pooled_projections": _randn((b, SD3_POOLED_DIM), g),
        }

    return bb, (4, 8, 8), cond, {"null_embeds": null, "null_pooled": null_pooled}


def _flux(seed, guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    # latents (4, 8, 8) are packed into 2x2 patches: 16 channels per token
    bb = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )

    def cond(b, g):
        return {
            "encoder_hidden_states": _randn((b, TEXT_LEN, FLUX_TEXT_DIM), g),
            "pooled_projections": _randn((b, FLUX_POOLED_DIM), g),
        }

    kw = {}
    if not guidance_embeds:  # a Flux without guidance input can take true CFG with a null prompt
        g = torch.Generator().manual_seed(seed + 1)
        kw = {"null_embeds": _randn((1, TEXT_LEN, FLUX_TEXT_DIM), g), "null_pooled": _randn((1, FLUX_POOLED_DIM), g)}
    return bb, (4, 8, 8), cond, kw


@dataclass(frozen=True)
class TinyFamily:
    """The tiny test model of one backbone family (`fewstep.families`): one entry per family."""

    backbone: Callable[..., tuple]  # (seed, **kw) -> (backbone, latent_shape, make_cond, conditioner kwargs)
    pipeline: Callable[..., Any]  # (backbone, prediction, seed) -> the family's diffusers pipeline
    flow_shift: float | None = None  # flow-matching families: the FlowPath shift; None: a VP teacher
    guidance: bool = True  # False: no unconditional input (the image-conditioned restore family)


def _pipe_dit(bb, prediction, seed):
    import diffusers

    return diffusers.DiTPipeline(
        transformer=bb,
        vae=tiny_vae(seed=seed),
        scheduler=ddim_scheduler(prediction),
        id2label={i: w for i, w in enumerate(_WORDS[12:22])},
    )


def _pipe_unet(bb, prediction, seed):
    import diffusers

    return diffusers.DDPMPipeline(unet=bb, scheduler=ddim_scheduler(prediction))


def _pipe_restore(bb, prediction, seed):
    import diffusers

    from fewstep.digits.restoration import build_pixel_vqvae

    return diffusers.LDMSuperResolutionPipeline(
        vqvae=build_pixel_vqvae(), unet=bb, scheduler=ddim_scheduler(prediction)
    )


def _pipe_sd15(bb, prediction, seed):
    import diffusers

    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_clip(SD15_TEXT_DIM, seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        unet=bb,
        scheduler=ddim_scheduler(prediction),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _pipe_sdxl(bb, prediction, seed):
    import diffusers

    half = SDXL_TEXT_DIM // 2
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed),
        text_encoder=tiny_clip(half, seed=seed),
        text_encoder_2=tiny_clip(SDXL_TEXT_DIM - half, projection=SDXL_POOLED_DIM, seed=seed + 1),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=bb,
        scheduler=ddim_scheduler(prediction),
        force_zeros_for_empty_prompt=True,
    )


def _pipe_pixart(bb, prediction, seed):
    import diffusers

    return diffusers.PixArtAlphaPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5(PIXART_TEXT_DIM, seed),
        vae=tiny_vae(seed=seed),
        transformer=bb,
        scheduler=ddim_scheduler(prediction),
    )


def _pipe_sd3(bb, prediction, seed):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    h = 8  # two CLIPs of width 8 (padded to the joint width 16 by the pipeline), pooled 6 + 6
    return diffusers.StableDiffusion3Pipeline(
        transformer=bb,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(latent_channels=4, seed=seed, shift_factor=0.1),
        text_encoder=tiny_clip(h, projection=SD3_POOLED_DIM // 2, seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip(h, projection=SD3_POOLED_DIM // 2, seed=seed + 1),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5(SD3_TEXT_DIM, seed),
        tokenizer_3=tiny_t5_tokenizer(),
    )


def _pipe_flux(bb, prediction, seed):
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15
    )
    return diffusers.FluxPipeline(
        scheduler=sched,
        vae=tiny_vae(latent_channels=4, seed=seed, shift_factor=0.1),
        text_encoder=tiny_clip(FLUX_POOLED_DIM, seed=seed),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5(FLUX_TEXT_DIM, seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=bb,
    )


# the test models' table: one entry per family of fewstep.families (a test checks they agree)
TINY: dict[str, TinyFamily] = {
    "dit": TinyFamily(_dit, _pipe_dit),
    "unet": TinyFamily(_unet, _pipe_unet),
    "sd15": TinyFamily(_sd15, _pipe_sd15),
    "sdxl": TinyFamily(_sdxl, _pipe_sdxl),
    "restore": TinyFamily(_restore, _pipe_restore, guidance=False),
    "pixart": TinyFamily(_pixart, _pipe_pixart),
    "sd3": TinyFamily(_sd3, _pipe_sd3, flow_shift=3.0),
    "flux": TinyFamily(_flux, _pipe_flux, flow_shift=1.0),
}
FAMILIES = tuple(TINY)
VP_FAMILIES = tuple(f for f, t in TINY.items() if t.flow_shift is None and t.guidance)  # guided VP teachers
FLOW_FAMILIES = tuple(f for f, t in TINY.items() if t.flow_shift is not None)


def make_tiny(
    family: str, prediction: str = "epsilon", seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> Tiny:
    """A tiny randomly initialised teacher of `family` (one of FAMILIES).

    prediction: "epsilon" or "v_prediction" for the VP families (dit, unet, sd15, sdxl, pixart);
    the flow families (sd3, flux) always predict the flow velocity and ignore it.
    kwargs: flux only, `guidance_embeds` (default True: guidance-distilled like Flux-dev).
    """
    if family not in TINY:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    torch.manual_seed(seed)
    spec = TINY[family]
    bb, shape, cond, cond_kwargs = spec.backbone(seed, **kwargs)
    perturb_(bb, seed=seed)
    if dtype != torch.float32:
        _quiet_cast(bb, dtype)
    if spec.flow_shift is not None:
        path = FlowPath(1000, shift=spec.flow_shift)
        prediction = "flow"
    else:
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction must be 'epsilon' or 'v_prediction' for {family}, got {prediction!r}")
        path = vp_path(prediction)
    den = Denoiser(bb, path, **cond_kwargs)
    return Tiny(family, den, shape, cond, prediction)


def _quiet_cast(module: nn.Module, dtype: torch.dtype) -> None:
    # diffusers warns about modules to keep in float32 when a model is cast with .to(); the tiny
    # models have none, and the warning would only clutter test output.
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        logging.set_verbosity(level)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- whole pipelines: tiny backbone + tiny VAE + tiny text encoders and offline tokenizers ----------
_WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)


def tiny_clip_tokenizer(max_length: int = TEXT_LEN):
    """A CLIP BPE tokenizer built from a small word vocabulary (no download): whole words from
    `_WORDS`, other words fall back to letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in _WORDS:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = TEXT_LEN):
    """A T5 (unigram) tokenizer built from a small vocabulary (no download)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + [("\u2581", -3.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_clip(hidden: int, projection: int | None = None, seed: int = 0, vocab_size: int = 128):
    """A 2-layer CLIP text encoder (SDXL/SD3 read the penultimate layer); with `projection`, a
    CLIPTextModelWithProjection whose text_embeds are the pooled prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LEN,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def tiny_t5(d_model: int, seed: int = 0, vocab_size: int = 128):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=4,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def tiny_vae(channels: int = 3, latent_channels: int = 4, seed: int = 0, shift_factor: float | None = None):
    """An AutoencoderKL with 8x downsampling (as the real ones: pixel = 8 x latent)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=0.5,
        shift_factor=shift_factor,
        mid_block_add_attention=False,
    ).eval()


def ddim_scheduler(prediction: str = "epsilon"):
    """DDIM on the SD schedule with "trailing" spacing, no clipping, final alpha 1: the scheduler
    whose steps are exactly fewstep's DDIM on VPPath.sampling_times."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )


def make_tiny_pipeline(family: str, prediction: str = "epsilon", seed: int = 0, **kwargs: Any):
    """A complete diffusers pipeline of `family` around `make_tiny(family, ...)`'s backbone, with
    a tiny VAE, tiny text encoders and offline tokenizers, ready for `save_pretrained`.

    VP families get `ddim_scheduler(prediction)`; SD3 FlowMatchEuler with shift 3; Flux
    FlowMatchEuler with dynamic shifting (base/max image_seq_len 4/64, so an 8x8 latent gets
    mu = 0.5 + 12 * 0.65 / 60). kwargs go to make_tiny (flux: guidance_embeds)."""
    tiny = make_tiny(family, prediction=prediction, seed=seed, **kwargs)
    return TINY[family].pipeline(tiny.backbone, prediction, seed)
