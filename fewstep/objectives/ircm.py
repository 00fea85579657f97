"""IR-CM: one- and two-step restoration by consistency on a mean-reverting SDE.

The states live on the mean-reverting SDE toward the degraded image mu = cond["image"]
(`fewstep.mean_reverting.MeanRevertingPath`): x_t = mu + (x0 - mu) a(t) + s(t) eps. The consistency
function is the student read at the same signal-to-noise ratio on its own path
(`MeanRevertingPath.to_path`), so it keeps the teacher's network, prediction type and stock
pipeline:

    f(x_t, t) = student(to_path(x_t, mu, t), cond)                         (x0 estimate)

On the grid t_n = n / grid, n ~ U{0..grid-1}, with one eps for both ends:
    x_{n+1} = marginal(x0, mu, eps, t_{n+1})
    x_n     = sde.step(x_{n+1}, teacher x0, mu, t_{n+1}, t_n)   consistency distillation (distill=true):
                                                                the teacher's probability-flow step
            = marginal(x0, mu, eps, t_n)                       consistency training (distill=false)
    L_cons  = pseudo_huber(f(x_{n+1}, t_{n+1}), sg f(x_n, t_n))      (sg f(x_0, 0) := x_0 at n = 0)
    L_og    = pseudo_huber(f(x_{n+1}, t_{n+1}), x0)                   origin-guided: ties every
              prediction to the clean origin, so the trivial constant solution of L_cons is not one
Linear-nonlinear decoupled training, as read here (the paper's exact schedule is unverified):
the first `decouple_steps` steps train the linear part alone, the origin-guided regression whose
target is linear in the data (x0 given x_t and mu), and only then the nonlinear consistency
coupling between grid neighbours joins with weight 1 (origin-guided weight `origin_weight`).

Batches carry real pairs: batch["x0"] (targets) and cond["image"] (degraded inputs). The student
samples from pure noise on its own path at `times` = DDIM's trailing grid of `num_steps` steps,
with fresh noise between steps (multistep consistency sampling), which the stock
`LDMSuperResolutionPipeline` runs with `eta=1` (`renoise: ddim`: the deterministic move, `eta=0`).

Named option (not the published method; default off): `refine_weight` adds a term that trains the
2-step sampler's second evaluation on the input the sampler gives it, a re-noised copy of the
student's own 1-step estimate (`IRCM.refine_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..mean_reverting import MeanRevertingPath
from . import _maths
from .base import Batch, GlobalBatchDraws, require_image_conditioned

__all__ = ["IRCMConfig", "IRCM", "build"]


@dataclass
class IRCMConfig:
    num_steps: int = 1  # the student's sampling steps (1 or 2): DDIM's trailing grid, fresh noise between
    distill: bool = True  # consistency distillation from the teacher; false: consistency training (no teacher)
    grid: int = 40  # intervals of the SDE time grid t_n = n / grid
    theta_min: float = 0.1  # mean-reversion rate theta(t) = theta_min + (theta_max - theta_min) t
    theta_max: float = 20.0  # bar_theta(1) = 10.05: a(1) = 4e-5, the end is the stationary N(mu, lam^2)
    lam: float = 1.0  # stationary noise std (1: the SDE's states map onto a VP teacher's without rescaling)
    origin_weight: float = 1.0  # weight of the origin-guided loss once the consistency loss is on
    decouple_steps: int = 200  # steps of the linear phase (origin-guided loss only); 0: coupled from the start
    huber_c: float = 0.03  # pseudo-Huber c in pixel units ([-1, 1] images)
    # named option, not the published method (0: off): weight of a second-step refinement term that
    # trains f at the 2-step sampler's intermediate time on the sampler's own move (`renoise`) from
    # the student's detached 1-step estimate, regressed onto x0
    refine_weight: float = 0.0
    renoise: str = "fresh"  # the 2-step sampler between its steps: fresh noise (eta=1) or ddim (eta=0, deterministic)

    def validate(self) -> None:
        if self.num_steps not in (1, 2):
            raise ValueError(f"objective.num_steps={self.num_steps}: IR-CM samples in 1 or 2 steps")
        if self.grid < 2:
            raise ValueError(f"objective.grid={self.grid}: must be >= 2")
        if not 0 <= self.theta_min <= self.theta_max or self.theta_max <= 0:
            raise ValueError(
                f"objective.theta_min/theta_max={self.theta_min}/{self.theta_max}: need 0 <= min <= max, max > 0"
            )
        if self.renoise not in ("fresh", "ddim"):
            raise ValueError(f"objective.renoise={self.renoise!r}: must be 'fresh' or 'ddim'")
        if not self.lam > 0:
            raise ValueError(f"objective.lam={self.lam}: must be > 0")
        if self.origin_weight < 0 or self.decouple_steps < 0 or self.huber_c < 0 or self.refine_weight < 0:
            raise ValueError(
                "objective.origin_weight, objective.decouple_steps, objective.huber_c and objective.refine_weight"
                " must be >= 0"
            )


class IRCM:
    def __init__(self, student: Denoiser, teacher: Denoiser, params: IRCMConfig, seed: int = 0):
        self.p = params
        self.seed = int(seed)
        self.sde = MeanRevertingPath(params.theta_min, params.theta_max, params.lam)
        self.nets = {"student": student, "teacher": teacher}
        self.groups = {"generator": ["student"]}
        # one consistency function samples at 1 and 2 steps: both grids go to the run card
        grids = {k: [float(t) for t in torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64)] for k in (1, 2)}
        self.sampling = {"times": grids[params.num_steps], "renoise": params.renoise, "times_by_steps": grids}

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def f(self, role: str, x_t: Tensor, t: Tensor, mu: Tensor, cond) -> Tensor:
        """The consistency function of a network: its x0 at the equal-SNR point of its own path."""
        net = self.nets[role]
        x_net, t_net = self.sde.to_path(x_t, mu, t, net.path)
        return net(x_net, t_net, cond)

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"ircm has one phase, 'generator'; got {phase!r}")
        x0, cond = batch.get("x0"), batch.get("cond")
        if x0 is None or cond is None or cond.get("image") is None:
            raise ValueError("ircm needs restoration pairs: batch['x0'] and cond['image'] (data.real_data=true)")
        x0 = x0.float()
        mu = cond["image"].float()
        b = x0.shape[0]
        draws = GlobalBatchDraws(batch, self.seed, step, rows=b, device=x0.device)
        n = draws.integers(self.p.grid)
        eps = draws.normal(*x0.shape[1:])
        t_hi = (n + 1).float() / self.p.grid
        t_lo = n.float() / self.p.grid
        x_hi = self.sde.marginal(x0, mu, eps, t_hi)
        pred = self.f("student", x_hi, t_hi, mu, cond)
        l_og = _maths.pseudo_huber(pred, x0, self.p.huber_c).mean()
        logs = {"origin": float(l_og.detach())}
        extra = torch.zeros((), device=x0.device)  # the refine option's term (0 when off)
        if self.p.refine_weight > 0:
            l_ref = self.refine_loss(x0, mu, cond, draws)
            extra = self.p.refine_weight * l_ref
            logs["refine"] = float(l_ref.detach())
        if step < self.p.decouple_steps:  # the linear phase: the origin-guided regression alone
            loss = l_og + extra
            return loss, {**logs, "consistency": float("nan"), "loss": float(loss.detach())}
        with torch.no_grad():
            if self.p.distill:
                x0_teacher = self.f("teacher", x_hi, t_hi, mu, cond)
                x_lo = self.sde.step(x_hi, x0_teacher, mu, t_hi, t_lo)
            else:
                x_lo = self.sde.marginal(x0, mu, eps, t_lo)
            target = self.f("student", x_lo, t_lo, mu, cond)
            at_origin = (n == 0).reshape(-1, *([1] * (x0.ndim - 1)))
            target = torch.where(at_origin, x_lo, target)  # the boundary f(x_0, 0) = x_0
        l_cons = _maths.pseudo_huber(pred, target, self.p.huber_c).mean()
        loss = l_cons + self.p.origin_weight * l_og + extra
        return loss, {**logs, "consistency": float(l_cons.detach()), "loss": float(loss.detach())}

    def refine_loss(self, x0: Tensor, mu: Tensor, cond, draws: GlobalBatchDraws) -> Tensor:
        """The `refine_weight` option: the 2-step sampler's second evaluation, trained on its own input.
        Exactly the sampler's first move (`fewstep.samplers.sample` on the student's path):

            x_1  = eps                                            the sampler's start at t = 1
            x0_1 = sg student(x_1, 1)                             the 1-step estimate
            x_m  = ddim_step(x_1, x0_1, 1, t_m)   (renoise ddim)  or  alpha(t_m) x0_1 + sigma(t_m) eps'  (fresh)
            L    = pseudo_huber(student(x_m, t_m), x0)            t_m: the 2-step grid's intermediate time
        """
        student = self.nets["student"]
        path = student.path
        eps1 = draws.normal(*x0.shape[1:])
        eps2 = draws.normal(*x0.shape[1:])  # drawn for both moves alike
        b = x0.shape[0]
        t1 = torch.ones(b, device=x0.device)
        t_m = torch.full((b,), self.sampling["times_by_steps"][2][1], device=x0.device)
        x_1 = eps1 * path.init_noise_sigma
        with torch.no_grad():
            x0_1 = student(x_1, t1, cond).float()
        x_m = path.sampler_move(x_1, x0_1, t1, t_m, self.p.renoise, eps2)  # the sampler's own move
        pred = student(x_m, t_m, cond)
        return _maths.pseudo_huber(pred, x0, self.p.huber_c).mean()


def build(params: IRCMConfig | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> IRCM:
    if not isinstance(params, IRCMConfig):
        params = IRCMConfig(**(params or {}))
    params.validate()
    require_image_conditioned("ircm", ctx)
    if not getattr(ctx, "has_real_data", True):
        raise ValueError("objective ircm trains on restoration pairs: set data.real_data=true (teacher digits-restore)")
    return IRCM(ctx.make_student(teacher), teacher, params, seed=getattr(ctx, "seed", 0))
