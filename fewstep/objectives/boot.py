"""BOOT: data-free distillation by bootstrapping along the teacher's trajectory (Gu et al. 2023).

The student g(eps, s) predicts the signal y_s = (x_s - sigma_s eps) / alpha_s of the teacher's
deterministic (DDIM / Euler) trajectory that starts from the noise eps at t = 1, for any
trajectory time s. One teacher DDIM step from t to s < t, written in signal space, is exactly

    y_s = y_t + (1 - e^{lambda_s - lambda_t}) (f(x_t, t) - y_t),    lambda = log(sigma / alpha)

(the signal-ODE step; e^{lambda_s - lambda_t} = sigma_s alpha_t / (alpha_s sigma_t)), so the
bootstrap target for g(eps, s) is that step taken from the student's own estimate at t:

    x_t_hat = alpha_t g(eps, t) + sigma_t eps
    y_s*    = sg[ g(eps, t) + (1 - e^{lambda_s - lambda_t}) (f_cfg(x_t_hat, t) - g(eps, t)) ]
    L_boot  = mean_b || g(eps, s) - y_s* ||^2

with f_cfg the teacher's x0 with classifier-free guidance (option `weighting: x_space` weighs each
sample by alpha_s^2, the same error measured on the trajectory point x_s; not the paper's form). The boundary condition ties the start
of the trajectory to the teacher: L_bound = || g(eps, 1) - sg f_cfg(eps, 1) ||^2 (at t = 1 the
first step's target is f_cfg itself, since alpha_1 = 0 on a flow path and ~0 on a VP one). Pairs
(t, s) are consecutive times of the teacher's own sampling grid (`path.sampling_times(intervals)`);
a share `boundary_fraction` of each batch trains the boundary instead. One-step sampling is
y_0 = g(eps, 0).

No data: the training inputs are Gaussian noise and the conditions only. `build` refuses a run
that provides real latents (`data.real_data: true` or `data.real_latents`), and `loss` refuses a
batch that carries them, so nothing real can reach the student.

How the student maps onto the teacher's backbone (so that export needs no custom code): the
student is the teacher's network fed the noise at a fixed input time `input_time` (1 on a flow
teacher; an eps VP teacher reads x0 = (x - sigma eps) / alpha, ill-conditioned at t = 1, so its
preset uses 0.5 as DMD2's VP preset does), with the trajectory time s as a second time input in
its time embedding (`_two_time`, mode "trajectory": zero at s = 1, so at initialisation
g(eps, 1) = the teacher's own x0 at the noise, which is the boundary condition up to CFG). The
output is read through the teacher's path at input_time, so the objective never asks the
prediction type. For sampling and export the s = 0 setting is folded into the time embedding's
bias, leaving a stock backbone that a pipeline runs for one step at input_time.

Few steps: g depends on eps alone, so more student calls cannot refine a sample; the student
gives any point x_s = alpha_s g(eps, s) + sigma_s eps of the trajectory in one call, which the
teacher can continue from (`trajectory_point`). Only the one-step sampler is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..paths import _bcast
from ..randomness import SampleDraws
from . import _maths
from ._two_time import TwoTimeDenoiser
from .base import Batch, checked_params, freeze, refuse_settings, unwrap

__all__ = ["BOOT", "BOOTParams", "build", "signal_step", "trajectory_point"]


@dataclass
class BOOTParams:
    guidance: float = 1.5  # teacher CFG scale w (Imagen form u + w (c - u)) in every target
    intervals: int = 16  # bootstrap pairs: consecutive times of path.sampling_times(intervals)
    input_time: float = 1.0  # time the student is fed with the noise (its one-step sampling time)
    boundary_fraction: float = 0.125  # share of each batch trained on the boundary g(eps, 1) = f_cfg(eps, 1)
    loss: str = "l2"  # "l2" or "pseudo_huber" in signal (x0) space
    huber_c: float = 0.03  # pseudo-Huber constant
    # per-sample weight of the loss: "none" (the loss in signal space, as written above) or "x_space"
    # (alpha_s^2: the error of the trajectory point x_s = alpha_s y_s + sigma_s eps that the student
    # implies; on an eps teacher the signal targets near t = 1 carry the teacher's error times 1 / alpha)
    weighting: str = "none"

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"objective.{key}={getattr(self, key)!r}: {msg}")

        if not (math.isfinite(self.guidance) and self.guidance >= 1.0):
            raise bad("guidance", "must be a finite CFG scale >= 1 (1 = conditional teacher)")
        if not isinstance(self.intervals, int) or isinstance(self.intervals, bool) or self.intervals < 1:
            raise bad("intervals", "needs an integer >= 1")
        if not 0.0 < float(self.input_time) <= 1.0:
            raise bad("input_time", "must lie in (0, 1]")
        if not 0.0 <= float(self.boundary_fraction) < 1.0:
            raise bad("boundary_fraction", "must lie in [0, 1)")
        if self.loss not in ("l2", "pseudo_huber"):
            raise bad("loss", "must be 'l2' or 'pseudo_huber'")
        if not self.huber_c >= 0:
            raise bad("huber_c", "must be >= 0")
        if self.weighting not in ("none", "x_space"):
            raise bad("weighting", "must be 'none' or 'x_space'")


def signal_step(path, y_t: Tensor, f: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One DDIM step from t to s in signal space: y_t + (1 - e^{lambda_s - lambda_t}) (f - y_t).
    e^{lambda_s - lambda_t} = sigma_s alpha_t / (alpha_s sigma_t), which is 0 where alpha_t = 0."""
    a_t, s_t = path.alpha_sigma(t)
    a_s, s_s = path.alpha_sigma(s)
    ratio = (s_s * a_t) / (a_s * s_t).clamp_min(1e-20)
    return y_t + _bcast(1.0 - ratio, y_t) * (f - y_t)


def trajectory_point(path, g: Tensor, eps: Tensor, s: Tensor | float) -> Tensor:
    """x_s = alpha_s g(eps, s) + sigma_s eps: the teacher-trajectory point the student implies."""
    return path.add_noise(g, eps, s)


class BOOT:
    """BOOT. nets: "student" (a `TwoTimeDenoiser` in trajectory mode), "teacher" (frozen); one
    optimizer group, "generator", updated every step."""

    def __init__(self, student: nn.Module, teacher: Denoiser, params: BOOTParams, seed: int = 0):
        params.validate()
        self.p = params
        self.seed = int(seed)  # per-sample draws (fewstep.randomness)
        self.path = teacher.path
        freeze(teacher)
        self.nets: dict[str, nn.Module] = {"student": student, "teacher": teacher}
        self.groups = {"generator": ["student"]}
        self.grid = [float(t) for t in self.path.sampling_times(params.intervals).tolist()]
        self.sampling = {"times": [float(params.input_time), 0.0], "renoise": "fresh"}

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def g(self, eps: Tensor, s: Tensor, cond: Cond | None) -> Tensor:
        """The student's signal estimate y_s for noise eps (B, ...) and trajectory times s (B,)."""
        x_in = eps * self.path.init_noise_sigma
        return self.nets["student"](x_in, self.p.input_time, cond, target=s).float()

    def _teacher_x0(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        return self.nets["teacher"](x, t, cond, self.p.guidance).float()

    def draw(self, rng: SampleDraws, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: (t, s, boundary mask). Bootstrap samples take a consecutive grid pair
        t = grid[k], s = grid[k + 1]; boundary samples are trained at s = 1."""
        k = rng.integers(0, self.p.intervals).cpu()
        grid = torch.tensor(self.grid, dtype=torch.float32)
        t, s = grid[k], grid[k + 1]
        boundary = rng.uniform().cpu() < self.p.boundary_fraction
        s = torch.where(boundary, torch.ones_like(s), s)
        t = torch.where(boundary, torch.ones_like(t), t)
        return t.to(device), s.to(device), boundary.to(device)

    @torch.no_grad()
    def targets(self, eps: Tensor, t: Tensor, s: Tensor, boundary: Tensor, cond: Cond | None) -> Tensor:
        """y_s* per sample: the signal step from the student's own g(eps, t) with the teacher's
        CFG x0 at the point it implies, or f_cfg(eps, 1) on boundary samples."""
        g_t = self.g(eps, t, cond)
        x_hat = trajectory_point(self.path, g_t, eps, t)
        bmask = boundary.reshape(-1, *([1] * (eps.ndim - 1)))
        x_in = torch.where(bmask, eps * self.path.init_noise_sigma, x_hat)
        f = self._teacher_x0(x_in, t, cond)
        return torch.where(bmask, f, signal_step(self.path, g_t, f, t, s))

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"boot has one phase, 'generator'; got {phase!r}")
        if batch.get("x0") is not None:
            raise ValueError(
                "boot is data-free: the batch carries real latents (batch['x0']); set data.real_data: "
                "false and leave data.real_latents unset"
            )
        if "shape" not in batch:
            raise ValueError("boot: the batch needs 'shape' (B, C, H, W) for the noise")
        cond = batch.get("cond")
        shape = tuple(batch["shape"])
        dev = next(unwrap(self.nets["student"]).parameters()).device
        rng = SampleDraws.for_batch(batch, self.seed, step, "boot", dev, rows=shape[0])
        eps = rng.normal(*shape[1:])
        t, s, boundary = self.draw(rng, dev)
        target = self.targets(eps, t, s, boundary, cond)
        pred = self.g(eps, s, cond)
        if self.p.loss == "l2":
            per = _maths.mse_per_sample(pred, target)
        else:
            per = _maths.pseudo_huber(pred, target, self.p.huber_c)
        if self.p.weighting == "x_space":
            per = per * self.path.alpha_sigma(s)[0].float() ** 2
        loss = per.mean()
        d = per.detach()
        logs = {
            "loss_boot": float(d[~boundary].mean()) if (~boundary).any() else 0.0,
            "loss_boundary": float(d[boundary].mean()) if boundary.any() else 0.0,
            "boundary_share": float(boundary.float().mean()),
        }
        return loss, logs


def build(params: BOOTParams | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> BOOT:
    """The registry's builder. Refuses real data (the method is data-free) and activation
    checkpointing (the second time input is set per call)."""
    params = checked_params(params, BOOTParams)
    refuse_settings(
        ctx,
        has_real_data="data.real_data: boot is data-free (its training inputs are noise only); set "
        "data.real_data: false and leave data.real_latents unset",
        gradient_checkpointing="precision.gradient_checkpointing: boot's second time input is set per call and "
        "would be wrong in the recomputation; turn it off",
    )
    made = ctx.make_student(teacher)
    student = TwoTimeDenoiser(made.backbone, made.path, made.conditioner, mode="trajectory")
    return BOOT(student, teacher, params, seed=int(getattr(ctx, "seed", 0)))
