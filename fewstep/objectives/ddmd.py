"""Decoupled DMD's generator gradient (ALGORITHMS.md sec. 3): the CFG-augmentation (CA) term and
the distribution-matching (DM) term, each re-noised at its own time, summed with their weights.
The maths is stated in `dmd.py`'s module docstring; `dmd.DMDObjective` calls `ddmd_gradient` for
the variant "ddmd" and adds the GAN and mean/variance terms itself."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..conditioning import Cond
from ..randomness import SampleDraws
from ._maths import cfg_augmentation, dm_gradient, dm_normaliser

__all__ = ["ca_gradient", "ddmd_gradient"]


def _renoised(obj: Any, x_hat: Tensor, drawn: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(x_tau, tau): x_hat (detached) noised at a drawn (tau, eps) on the objective's path."""
    tau, eps = drawn
    return obj.path.add_noise(x_hat.detach(), eps, tau), tau


def ca_gradient(
    obj: Any, x_hat: Tensor, cond: Cond | None, drawn: tuple[Tensor, Tensor], norm: Tensor | None = None
) -> Tensor:
    """The CA term, normalised like DMD's gradient: -(w - 1)(x0_c - x0_u) / mean|x_hat - x0_cfg|,
    re-noised below the generator's input time (dm_gradient(x, x0_cfg, x0_c) is exactly that
    quotient, since x0_c - x0_cfg = -(w-1)(c-u)). `norm` ([B], ca_normaliser "dm") replaces the
    divisor. Zero at w = 1, without a teacher pass. `obj` is the DMD objective (its teacher, path, params)."""
    p = obj.p
    if float(p.guidance) == 1.0:
        return torch.zeros_like(x_hat)
    x_tau, tau = _renoised(obj, x_hat, drawn)  # drawn over [ca_t_min, min(ca_t_max, t_gen)]: below the input time
    with torch.no_grad():
        x0_c, x0_u = obj.nets["teacher"](x_tau, tau, cond, output="cond_uncond")
    ca = cfg_augmentation(x0_c, x0_u, p.guidance)
    return dm_gradient(x_hat, x0_c + ca, x0_c, norm=norm)


def ddmd_gradient(
    obj: Any, x_hat: Tensor, cond: Cond | None, t_gen: float, rng: SampleDraws, logs: dict[str, float]
) -> tuple[Tensor, list[Tensor]]:
    """(g, gan): g = ca_weight * CA + dm_weight * DM (the DM term only with dm_kind "dm"), and gan =
    [term, adv] when the GAN term was computed on the DM pass (else []). Both terms' noise is drawn
    first, so a switched-off term changes nothing else; a zero-weight term is not computed."""
    p = obj.p
    ca_hi = p.ca_t_max if p.ca_schedule == "uncapped" else min(p.ca_t_max, float(t_gen))  # capped at the input time
    ca_draw = obj._draw(x_hat, p.ca_t_min, ca_hi, rng)
    dm_draw = obj._draw(x_hat, p.dm_t_min, p.dm_t_max, rng)
    if p.ca_schedule == "coupled":  # one re-noising for both terms, over the DM term's range
        ca_draw = dm_draw
    g, gan = torch.zeros_like(x_hat), []
    x0_dm, norm = None, None  # the DM term's (real, fake) x0 and, for ca_normaliser "dm", its normaliser
    if p.dm_kind == "dm" and p.dm_weight != 0:
        if obj._gan_on_dm_pass(1.0):
            *x0_dm, term, adv = obj._dm_x0_and_gan(x_hat, cond, 1.0, None, dm_draw)
            gan = [term, adv]
        else:
            x0_dm = obj._dm_x0(x_hat, cond, 1.0, None, dm_draw)
    if p.ca_normaliser == "dm" and p.ca_weight != 0:
        if x0_dm is None:  # CA only: the conditional teacher at the DM term's re-noising, for its scale
            x_tau, tau = _renoised(obj, x_hat, dm_draw)
            with torch.no_grad():
                x0_real = obj.nets["teacher"](x_tau, tau, cond, 1.0)
        else:
            x0_real = x0_dm[0]
        norm = dm_normaliser(x_hat, x0_real)
    if p.ca_weight != 0:
        g_ca = ca_gradient(obj, x_hat, cond, ca_draw, norm)
        logs["ca_grad_norm"] = g_ca.flatten(1).norm(dim=1).mean().item()
        g = g + p.ca_weight * g_ca
    if x0_dm is not None:
        g_dm = dm_gradient(x_hat, *x0_dm)
        logs["dm_grad_norm"] = g_dm.flatten(1).norm(dim=1).mean().item()
        g = g + p.dm_weight * g_dm
    return g, gan
