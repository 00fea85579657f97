"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025, NVlabs/rcm).

rCM is sCM plus a DMD term. It is built here from the two objectives that already hold the maths,
by composition (one `nets` dict shared by both, so a wrapped network is seen by both):

- the consistency part is the sCM objective (`scm.SCMObjective`: its TrigFlow conventions, its
  sampling of angles, its tangent with warm-up and normalisation, its loss and options);
- the score-regularisation part is DMD2's generator DM term and fake-score loss
  (`dmd.DMDObjective`: backward simulation with fresh noise, `_maths.dm_gradient`, the native-target
  denoising loss of the fake score), run on the student's backward-simulated samples.

Schedule (rCM's `is_student_phase`):

    step < dmd_start (= convert_steps + tangent_warmup):   ["generator"]   sCM loss only, no fake score
    after:  cycles of (critic_updates_per_student + 1) steps: critic_updates_per_student x ["fake_score"]
            (the fake score), then one ["generator"] with  L = scm_weight L_sCM + dmd_weight L_DM

The generator step ends each cycle (the published code starts it), so the fake score has adapted
to the student before the first DM gradient is taken, as DMD2 does here.

Sampling (rCM's `generate_samples_from_batch`): TrigFlow angles [atan(sigma_max), 1.5, 1.4, 1.0]
[:steps] then 0, fresh noise between steps, mapped to the student's path at equal SNR
(`_trigflow.times_from_angles`). The DM term's backward simulation uses the same grid, for
1..max_simulation_steps steps (the published `dmd_fix_timesteps` form; one student serves 1-4 steps).

Published defaults (rcm/configs/experiments/rcm/wan2pt1_t2v.py and the model's config): sd = 1;
sCM proposal log-normal(-0.8, 1.6) in tan(theta); critic : student 4 : 1; AdamW betas (0, 0.999),
weight decay 0.01, student lr 2e-6, fake score lr 4e-7 (`optim`, overridable by a preset);
loss weights 100 (sCM) and 1 (DMD), both summed over the latent, so the DM term weighs 1/100 of
the consistency term: here, with means and the surrogate's factor 0.5, dmd_weight = 2/100.

Known differences from the published code, kept to reuse this project's machinery:
- the tangent warm-up is sCM's (r scales cos sin x + sd JF) where rCM writes
  -cos sqrt(1 - r^2 sin^2)(F- - F_teacher) - (r cos sin x + JF); both equal sCM's tangent at r = 1,
  and the DM term only runs after the warm-up;
- the sCM weighting is this project's (`weighting`, `adaptive_weighting`) where rCM weighs all
  angles alike;
- the DM re-noising time is DMD2's uniform draw in [dm_t_min, dm_t_max] and the fake score is
  trained with DMD2's native-target loss (rCM: log-normal angles, x0 error / sin^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..denoiser import Denoiser
from . import _trigflow as tf
from ._maths import surrogate_loss
from .base import Batch, phase_loss, run_facts
from .dmd import DMDObjective, DMDParams
from .scm import SCMObjective, SCMParams, _check, _student_path

__all__ = ["RCMParams", "RCMObjective", "rcm_angles", "build"]

RCM_MID_ANGLES = (1.5, 1.4, 1.0)  # rCM's backward_timesteps (TrigFlow angles)


@dataclass
class RCMParams(SCMParams):
    """sCM's keys (the consistency part) with rCM's defaults, plus the DMD part's."""

    sigma_data: float = 1.0  # rCM: sd = 1 (TrigFlow with unit data std)
    p_mean: float = -0.8  # rCM's sCM proposal: tan(theta) log-normal(-0.8, 1.6)
    p_std: float = 1.6
    tangent_warmup: int = 1000  # rCM (Wan 2.1): 1000; the DM term starts when it ends
    num_steps: int = 1  # student sampling steps (1-4)
    sigma_max: float = 80.0  # the sampler's first angle is atan(sigma_max) = 1.558
    mid_angles: list[float] = field(default_factory=lambda: list(RCM_MID_ANGLES))
    # the sampler's later angles, [1.5, 1.4, 1.0][:steps - 1]
    scm_weight: float = 1.0  # weight of the consistency loss
    dmd_weight: float = 0.02  # weight of DMD's surrogate loss (rCM's 1 : 100, see the docstring)
    dmd_start: int | None = None  # first step of the DM term and the critic (None: the end of
    #   the conversion steps and the tangent warm-up)
    critic_updates_per_student: int = 4  # fake-score updates per student update after dmd_start (rCM 4 or 9)
    max_simulation_steps: int = 4  # backward simulation of 1..this many student steps for the DM term
    dmd_guidance: float | None = None  # CFG of the real score in the DM term (None: `guidance`, as rCM)
    dm_t_min: float = 0.02  # DM re-noising times U[dm_t_min, dm_t_max] (DMD2's)
    dm_t_max: float = 0.98
    fake_t_min: float = 0.001  # the fake score's denoising times [fake_t_min, 1]

    def validate(self) -> None:
        _check_rcm(self)


def rcm_angles(
    num_steps: int, sigma_max: float = 80.0, mid: list[float] | tuple[float, ...] = RCM_MID_ANGLES
) -> list[float]:
    """rCM's sampling angles: [atan(sigma_max)] + mid[:num_steps - 1] + [0]."""
    return [math.atan(float(sigma_max))] + [float(a) for a in mid[: num_steps - 1]] + [0.0]


def _check_rcm(p: RCMParams) -> None:
    if p.sampling_angles is not None:
        raise ValueError(
            "objective.sampling_angles is not an rCM key: rCM samples at [atan(objective.sigma_max)] "
            "+ objective.mid_angles[:steps - 1]"
        )
    _check(p)
    mid = [float(a) for a in p.mid_angles]
    if p.sigma_max <= 0:
        raise ValueError(f"objective.sigma_max={p.sigma_max} must be > 0")
    top = math.atan(p.sigma_max)
    need = max(p.num_steps, p.max_simulation_steps) - 1
    if len(mid) < need:
        raise ValueError(
            f"objective.mid_angles needs at least {need} entries for objective.num_steps="
            f"{p.num_steps} / objective.max_simulation_steps={p.max_simulation_steps}, got {mid}"
        )
    if any(b >= a for a, b in zip([top] + mid, mid)) or (mid and mid[-1] <= 0):
        raise ValueError(
            f"objective.mid_angles must decrease within (0, atan(objective.sigma_max)={top:.4f}), got {mid}"
        )
    if not 1 <= p.num_steps <= 4 or not 1 <= p.max_simulation_steps <= 4:
        raise ValueError(
            "objective.num_steps and objective.max_simulation_steps must lie in 1..4 "
            f"(got {p.num_steps}, {p.max_simulation_steps})"
        )
    if p.critic_updates_per_student < 1:
        raise ValueError(f"objective.critic_updates_per_student={p.critic_updates_per_student} must be >= 1")
    if p.scm_weight < 0 or p.dmd_weight < 0 or p.scm_weight + p.dmd_weight == 0:
        raise ValueError(
            f"objective.scm_weight={p.scm_weight} and objective.dmd_weight={p.dmd_weight} must be >= 0 and not both 0"
        )
    if p.dmd_start is not None and p.dmd_start < 0:
        raise ValueError(f"objective.dmd_start={p.dmd_start} must be >= 0 or null")
    if p.dmd_guidance is not None and p.dmd_guidance <= 0:
        raise ValueError(f"objective.dmd_guidance={p.dmd_guidance} must be > 0")
    for lo, hi, name in ((p.dm_t_min, p.dm_t_max, "dm_t"), (p.fake_t_min, 1.0, "fake_t")):
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"objective.{name}_min / {name}_max must satisfy 0 <= min < max <= 1, got {lo}, {hi}")


class RCMObjective:
    """sCM + DMD regulariser. nets: "student" and "logvar" (group "generator"), "fake" (group
    "fake_score"), "teacher" (frozen). See the module docstring."""

    def __init__(
        self,
        params: RCMParams,
        teacher: Denoiser,
        student: Denoiser,
        fake: Denoiser,
        *,
        seed: int = 0,
        latent_shape: tuple[int, ...] = (4, 8, 8),
        device: Any = None,
    ):
        _check_rcm(params)
        self.p = params
        self.cm = SCMObjective(params, teacher, student, seed)
        self.path = self.cm.path
        sim_times = tf.times_from_angles(
            rcm_angles(params.max_simulation_steps, params.sigma_max, params.mid_angles), self.path
        )[:-1]
        dparams = DMDParams(
            variant="dmd2",
            num_steps=len(sim_times),
            student_times=sim_times,
            guidance=params.guidance if params.dmd_guidance is None else params.dmd_guidance,
            dm_t_min=params.dm_t_min,
            dm_t_max=params.dm_t_max,
            fake_t_min=params.fake_t_min,
            fake_updates_per_generator=params.critic_updates_per_student + 1,
        )
        dparams.validate()
        self.dm = DMDObjective(dparams, teacher, student, fake, seed=seed, latent_shape=latent_shape, device=device)
        # one dict for all: the entry point may swap an entry for a wrapped module
        self.nets = self.cm.nets
        self.nets["fake"] = fake
        self.dm.nets = self.nets
        self.groups = {"generator": list(self.cm.groups["generator"]), "fake_score": ["fake"]}
        self.dmd_start = (
            params.convert_steps + params.tangent_warmup if params.dmd_start is None else int(params.dmd_start)
        )
        self.sampling = self._sampling()
        self.optim = {  # rCM's published AdamW settings; a preset's optim.<group> overrides them
            "generator": {"lr": 2e-6, "betas": (0.0, 0.999), "weight_decay": 0.01},
            "fake_score": {"lr": 4e-7, "betas": (0.0, 0.999), "weight_decay": 0.01},
        }

    # ---- sampler ------------------------------------------------------------------------------
    def sampling_times(self, num_steps: int) -> list[float]:
        a = rcm_angles(num_steps, self.p.sigma_max, self.p.mid_angles)
        return tf.times_from_angles(a, self.path)

    def _sampling(self) -> dict[str, Any]:
        p = self.p
        out = {
            "times": self.sampling_times(p.num_steps),
            "renoise": "fresh",
            "angles": rcm_angles(p.num_steps, p.sigma_max, p.mid_angles),
            "times_by_steps": {str(n): self.sampling_times(n) for n in range(1, len(p.mid_angles) + 2)},
        }
        if p.student_prediction is not None:
            out["prediction_type"] = p.student_prediction
        return out

    # ---- schedule -----------------------------------------------------------------------------
    def dmd_active(self, step: int) -> bool:
        return step >= self.dmd_start and self.p.dmd_weight > 0

    def phases(self, step: int) -> list[str]:
        if not self.dmd_active(step):
            return ["generator"]
        cycle = self.p.critic_updates_per_student + 1
        return ["generator"] if (step - self.dmd_start + 1) % cycle == 0 else ["fake_score"]

    # ---- losses -------------------------------------------------------------------------------
    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        p = self.p
        loss, logs = self.cm.loss("generator", batch, step)
        logs = {"loss_scm": logs.pop("loss"), **logs}
        loss = p.scm_weight * loss
        logs["dmd"] = 0.0
        if self.dmd_active(step):
            rng = self.dm.draws(batch, step, "generator")
            x_hat, t_gen = self.dm.generate(batch, step, grad=True, rng=rng)
            g = self.dm._dm_grad(x_hat, batch.get("cond"), self.dm.p.guidance, rng)
            loss = loss + p.dmd_weight * surrogate_loss(x_hat, g)
            logs.update(dmd=1.0, dm_grad_norm=g.flatten(1).norm(dim=1).mean().item(), t_gen=float(t_gen))
        logs["loss_g"] = float(loss.detach())
        return loss, logs

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        return phase_loss(
            "rCM", {"generator": self.generator_loss, "fake_score": self._fake_score_loss}, phase, batch, step
        )

    def _fake_score_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if not self.dmd_active(step):
            raise ValueError(f"rCM: no fake-score update before objective.dmd_start={self.dmd_start} (step {step})")
        return self.dm.fake_score_loss(batch, step)


def build(params: RCMParams, teacher: Denoiser, ctx: Any) -> RCMObjective:
    """Registry builder for rCM (needs real data for its sCM part)."""
    _check_rcm(params)
    _student_path(params, teacher)
    if not bool(getattr(ctx, "has_real_data", True)):
        raise ValueError("objective 'rcm' needs real data (batch x0) for its sCM part: set data.real_data: true")
    student = ctx.make_student(teacher)
    fake = ctx.make_copy(teacher)
    return RCMObjective(params, teacher, student, fake, **run_facts(ctx))
