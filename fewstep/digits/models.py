"""The two networks of the embedded digits teacher, as stock diffusers classes.

    vae = build_vae()            # AutoencoderKL: (B, 1, 32, 32) in [-1, 1] <-> (B, 4, 8, 8) latents
    dit = build_dit()            # DiTTransformer2DModel on the (4, 8, 8) latents, 10 classes

Both are small enough to train on two CPU cores in minutes and to ship in the package (fp32, a
few MB). Stock classes only, so `DiTPipeline.from_pretrained(folder)` runs the teacher with no
fewstep code.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from torch import nn

__all__ = [
    "VAE_CONFIG",
    "DIT_CONFIG",
    "LATENT_SHAPE",
    "NULL_CLASS",
    "build_vae",
    "build_dit",
    "init_dit_",
    "count_parameters",
]

LATENT_SHAPE = (4, 8, 8)
# DiTPipeline feeds class 1000 as the unconditional label, so the label table must have 1001 rows:
# num_embeds_ada_norm = 1000 classes, plus the extra row that diffusers' LabelEmbedding adds when
# its class dropout (0.1, a constant of CombinedTimestepLabelEmbeddings) is non-zero. Only rows
# 0..9 and 1000 are ever trained.
NULL_CLASS = 1000

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=1,  # grey digits
    out_channels=1,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks = 2 downsamplings: 32 -> 8
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=LATENT_SHAPE[0],
    norm_num_groups=8,
    sample_size=32,
    mid_block_add_attention=False,  # 8x8 latents need no attention; saves time on CPU
    scaling_factor=1.0,  # replaced by 1 / std of the training latents
)

DIT_CONFIG: dict[str, Any] = dict(
    num_attention_heads=4,
    attention_head_dim=32,  # width 128
    in_channels=LATENT_SHAPE[0],
    out_channels=LATENT_SHAPE[0],  # no learned variance: DiTPipeline then uses all channels as eps / v
    num_layers=6,
    sample_size=LATENT_SHAPE[1],
    patch_size=2,  # 16 tokens
    num_embeds_ada_norm=NULL_CLASS,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
    attention_bias=True,
)


def build_vae(**overrides: Any) -> AutoencoderKL:
    """A freshly initialised digits VAE (`VAE_CONFIG` with `overrides`)."""
    _check_keys(overrides, VAE_CONFIG, "VAE")
    return AutoencoderKL(**{**VAE_CONFIG, **overrides})


def build_dit(**overrides: Any) -> DiTTransformer2DModel:
    """A freshly initialised digits DiT (`DIT_CONFIG` with `overrides`), see `init_dit_`."""
    _check_keys(overrides, DIT_CONFIG, "DiT")
    return init_dit_(DiTTransformer2DModel(**{**DIT_CONFIG, **overrides}))


@torch.no_grad()
def init_dit_(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """adaLN-Zero (Peebles & Xie, 2023, sec. 3.2), which diffusers leaves to pretrained weights:
    the adaLN modulation of every block and the final modulation and output layer start at zero,
    so every block starts as the identity and the network starts by predicting zero. Everything
    else keeps diffusers' default initialisation (in particular N(0, 1) label embeddings, which
    give the class signal full strength from the first step of a short training)."""
    for block in dit.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)  # shift/scale/gate of attention and MLP
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):  # final adaLN modulation and output
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return dit


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_keys(overrides: dict, base: dict, name: str) -> None:
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"{name} config: unknown key(s) {unknown}; known keys are {sorted(base)}")
