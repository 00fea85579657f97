"""Pure maths shared by the objectives; each formula is written once here.

Shapes: x, targets (B, C, H, W) float32; per-sample weights (B,).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _mean_per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape(w.shape[0], *([1] * (like.ndim - 1)))


def dm_normaliser(x: Tensor, x0_real: Tensor, eps: float = 1e-8) -> Tensor:
    """DMD's per-sample normaliser mean_CHW |x - x0_real| (clamped at eps), shape [B]. Detached."""
    return _mean_per_sample((x.detach().float() - x0_real.detach().float()).abs()).clamp_min(eps)


def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-8, norm: Tensor | None = None) -> Tensor:
    """Distribution-matching gradient in x0 space with DMD's normalisation (Yin et al. 2024,
    eq. 8; DMD2): (x0_fake - x0_real) / mean_CHW |x - x0_real|, NaNs zeroed. Detached. `norm`
    ([B]) replaces the normaliser (a term normalised by another term's, Decoupled DMD's shared form)."""
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    w = dm_normaliser(x, x0_real, eps) if norm is None else norm
    return torch.nan_to_num((x0_fake - x0_real) / _bcast(w, x))


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean((x - sg(x - grad))^2), whose gradient w.r.t. x is grad / numel. The value itself
    is meaningless; log the norm of `grad`."""
    target = (x - grad).detach()
    return 0.5 * ((x.float() - target) ** 2).mean()


def cfg_augmentation(x0_cond: Tensor, x0_uncond: Tensor, scale: float) -> Tensor:
    """The CFG-augmentation direction of Decoupled DMD: (w - 1)(x0_c - x0_u); zero at w = 1."""
    return (scale - 1.0) * (x0_cond.float() - x0_uncond.float())


def dsm_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Denoising score matching: mean_b[w_b * mean_CHW (pred - target)^2]."""
    per = _mean_per_sample((pred.float() - target.float()) ** 2)
    if weight is not None:
        per = per * weight.float()
    return per.mean()


def pseudo_huber(x: Tensor, y: Tensor, c: float = 1e-3) -> Tensor:
    """Per-sample pseudo-Huber distance mean_CHW(sqrt((x - y)^2 + c^2) - c) (Song & Dhariwal
    2023, eq. 9 in its elementwise form used by LCM and TDM); c = 0 gives mean |x - y|."""
    d = x.float() - y.float()
    return _mean_per_sample(torch.sqrt(d * d + c * c) - c)


def mse_per_sample(x: Tensor, y: Tensor) -> Tensor:
    return _mean_per_sample((x.float() - y.float()) ** 2)


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    return (alpha.float() / sigma.float().clamp_min(1e-12)) ** 2


def input_gradient_only(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Tensor, Any]:
    """Evaluate `loss, extra = fn(leaf)` on a detached copy `leaf` of x and return (term, loss,
    extra), where term has the loss's value and d term / d x = d loss / d leaf. Its backward
    reaches only what produced x: torch.autograd.grad asks for the leaf's gradient alone, so the
    networks inside `fn` get no weight gradients (and none are computed), frozen or not."""
    leaf = x.detach().requires_grad_(True)
    loss, extra = fn(leaf)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach() + ((x - x.detach()) * g).sum(), loss.detach(), extra
