"""The adapter: any diffusers backbone + its noise path + its conditioning -> x0 at continuous t.

    x0_hat = denoiser(x_t, t, cond, guidance=w)     # t in [0, 1], float32 out

Objectives and samplers see only this; prediction type, native timesteps and the backbone's
keyword arguments live in the path and the conditioner.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import Cond, Conditioner, cat_cond, conditioner_for
from .paths import Path, _as_t, _bcast, _fp

__all__ = ["Denoiser", "apply_cfg"]


def apply_cfg(cond_out: Tensor, uncond_out: Tensor, scale: Tensor | float) -> Tensor:
    """Classifier-free guidance in the Imagen form u + w (c - u). Affine in the output, so it may
    be applied to eps, v, x0 or F alike; w = 1 gives the conditional output."""
    if torch.is_tensor(scale):
        scale = _bcast(scale.to(cond_out.dtype), cond_out)
    return uncond_out + scale * (cond_out - uncond_out)


class Denoiser(nn.Module):
    """Wrap a diffusers backbone as x0 = D(x_t, t, cond).

    Args:
        backbone:    a diffusers model (UNet2DModel, UNet2DConditionModel, DiT, PixArt, SD3, Flux).
        path:        the noise path of the backbone's training (see `fewstep.paths`).
        conditioner: how to call the backbone; chosen from the class when omitted.

    The backbone is kept in eval mode: diffusers' DiT drops class labels at random in training
    mode, and fewstep never wants that; gradient checkpointing does not need training mode.
    """

    def __init__(self, backbone: nn.Module, path: Path, conditioner: Conditioner | None = None, **cond_kwargs: Any):
        super().__init__()
        self.backbone = backbone
        self.path = path
        self.conditioner = conditioner or conditioner_for(backbone, **cond_kwargs)
        self.backbone.eval()

    def train(self, mode: bool = True):  # keep the backbone's label dropout off
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # ------------------------------------------------------------------------------------
    def output(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        """The backbone's native output (eps, v, flow velocity, ...) as float32, one pass."""
        tt = _as_t(t, x_t)
        self.conditioner.check(cond, x_t.shape[0])
        timestep = _fp(self.path.timestep(tt))
        out = self.conditioner.call(self.backbone, x_t.to(self.dtype), timestep, cond)
        if out.shape != x_t.shape:
            raise ValueError(f"backbone output shape {tuple(out.shape)} does not match input {tuple(x_t.shape)}")
        return _fp(out)  # float32, or float64 for float64 backbones (tests)

    def guided_output(
        self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None, guidance: Tensor | float = 1.0
    ) -> Tensor:
        """Native output with classifier-free guidance; cond and uncond run as one 2B batch.
        Guidance 1 (a float) runs the conditional pass only. A (B,) tensor gives each sample its
        own scale. Guidance-distilled backbones (Flux-dev) get the scale as an input instead."""
        if self.conditioner.guidance_embedded:
            g = guidance if torch.is_tensor(guidance) else torch.full((x_t.shape[0],), float(guidance))
            return self.output(x_t, t, {**(cond or {}), "guidance": g.to(x_t.device)})
        if not torch.is_tensor(guidance) and float(guidance) == 1.0:
            return self.output(x_t, t, cond)
        b = x_t.shape[0]
        tt = _as_t(t, x_t)
        both = self.output(torch.cat([x_t, x_t]), torch.cat([tt, tt]), cat_cond(cond, self.conditioner.null(cond, b)))
        c, u = both[:b], both[b:]
        return apply_cfg(c, u, guidance)

    def x0_eps(
        self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None, guidance: Tensor | float = 1.0
    ) -> tuple[Tensor, Tensor]:
        out = self.guided_output(x_t, t, cond, guidance)
        return self.path.to_x0_eps(x_t, out, t)

    def x0_cond_uncond(self, x_t: Tensor, t: Tensor | float, cond: Cond | None) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional x0 from one 2B pass (for objectives that use both,
        e.g. the CFG-augmentation term of Decoupled DMD and TDM)."""
        b = x_t.shape[0]
        tt = _as_t(t, x_t)
        t2 = torch.cat([tt, tt])
        x2 = torch.cat([x_t, x_t])
        both = self.output(x2, t2, cat_cond(cond, self.conditioner.null(cond, b)))
        x0 = self.path.to_x0_eps(x2, both, t2)[0]
        return x0[:b], x0[b:]

    def forward(
        self,
        x_t: Tensor,
        t: Tensor | float,
        cond: Cond | None = None,
        guidance: Tensor | float = 1.0,
        output: str = "x0",
    ):
        """The one entry point (so that DDP / FSDP wrappers see every pass).

        output: "x0" (default, (B, ...) float32), "x0_eps" (a pair), "native" (the guided
        native output), "cond_uncond" (conditional and unconditional x0 from one 2B pass)."""
        if output == "x0":
            return self.x0_eps(x_t, t, cond, guidance)[0]
        if output == "x0_eps":
            return self.x0_eps(x_t, t, cond, guidance)
        if output == "native":
            return self.guided_output(x_t, t, cond, guidance)
        if output == "cond_uncond":
            return self.x0_cond_uncond(x_t, t, cond)
        raise ValueError(f"output must be 'x0', 'x0_eps', 'native' or 'cond_uncond', got {output!r}")


def copy_denoiser(d: Denoiser, trainable: bool = True) -> Denoiser:
    """An independent copy (weights, path and conditioner shared by reference are immutable) used
    to initialise a student or a fake score from the teacher."""
    import copy

    bb = copy.deepcopy(d.backbone)
    bb.requires_grad_(trainable)
    return Denoiser(bb, d.path, d.conditioner)
