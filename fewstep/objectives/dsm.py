"""DSM: plain denoising-score-matching fine-tuning of a student (a baseline, and the objective the
training entry point is tested with).

    t ~ U[t_min, t_max], eps ~ N(0, I), x_t = alpha(t) x0 + sigma(t) eps
    L = mean_b[ mean_CHW (student_native(x_t, t) - native(x0, eps, t))^2 ]      (the teacher's own loss)

x0 is real latents when the batch carries them; otherwise (data-free) it is the teacher's own
`teacher_steps`-step DDIM sample with guidance `teacher_guidance`, made without gradients. One
optimizer group, "generator", trains the student; the student samples with the teacher's DDIM /
Euler sampler at `sampling_steps` steps.

All draws (t, eps, the teacher's starting noise) are per sample, functions of (seed, step, the
sample's index in the global batch) (`fewstep.randomness`), so a step sees the same numbers however
the global batch is split over processes and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..randomness import SampleDraws
from ..samplers import sample
from . import _maths
from .base import Batch, checked_params

__all__ = ["DSMConfig", "DSM", "build"]


@dataclass
class DSMConfig:
    t_min: float = 0.02  # lowest training time
    t_max: float = 1.0  # highest training time
    teacher_steps: int = 8  # data-free targets: teacher DDIM steps from noise
    teacher_guidance: float = 1.0  # data-free targets: teacher CFG scale (Imagen form)
    sampling_steps: int = 4  # the student's sampler: DDIM / Euler steps on the teacher's schedule

    def validate(self) -> None:
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(
                f"objective.t_min={self.t_min}, objective.t_max={self.t_max}: need 0 <= t_min < t_max <= 1"
            )
        if self.teacher_steps < 1:
            raise ValueError(f"objective.teacher_steps={self.teacher_steps}: must be >= 1")
        if self.sampling_steps < 1:
            raise ValueError(f"objective.sampling_steps={self.sampling_steps}: must be >= 1")
        if not self.teacher_guidance >= 1.0:
            raise ValueError(f"objective.teacher_guidance={self.teacher_guidance}: must be >= 1")


def _draws(batch: Batch, seed: int, step: int, shape: tuple[int, ...], device) -> tuple[Tensor, Tensor, Tensor]:
    """(u, eps, z) for this batch's samples, each row a function of (seed, step, global index)."""
    rng = SampleDraws.for_batch(batch, seed, step, "dsm", device, rows=shape[0])
    u = rng.uniform(dtype=torch.float64)
    eps = rng.normal(*shape[1:])
    z = rng.normal(*shape[1:])
    return u, eps, z


class DSM:
    def __init__(self, student: Denoiser, teacher: Denoiser, params: DSMConfig, seed: int = 0):
        self.p = params
        self.seed = int(seed)
        self.nets = {"student": student, "teacher": teacher}
        self.groups = {"generator": ["student"]}
        path = teacher.path
        self.sampling = {"times": [float(t) for t in path.sampling_times(params.sampling_steps)], "renoise": "ddim"}

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    @torch.no_grad()
    def _teacher_x0(self, z: Tensor, cond) -> Tensor:
        teacher = self.nets["teacher"]
        times = teacher.path.sampling_times(self.p.teacher_steps)
        return sample(teacher, z, cond, times, guidance=self.p.teacher_guidance, renoise="ddim")

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"dsm has one phase, 'generator'; got {phase!r}")
        shape = tuple(batch["shape"])
        cond = batch.get("cond")
        student = self.nets["student"]
        path = student.path
        u, eps, z = _draws(batch, self.seed, step, shape, _device(batch, cond))
        x0 = batch.get("x0")
        x0 = self._teacher_x0(z, cond) if x0 is None else x0.float()
        t = (self.p.t_min + (self.p.t_max - self.p.t_min) * u).float()
        x_t = path.add_noise(x0, eps, t)
        target = path.from_x0_eps(x0, eps, t)
        pred = student(x_t, t, cond, output="native")
        loss = _maths.dsm_loss(pred, target)
        return loss, {"loss": float(loss.detach())}


def _device(batch: Batch, cond) -> torch.device:
    x0 = batch.get("x0")
    if x0 is not None:
        return x0.device
    for v in (cond or {}).values():
        if torch.is_tensor(v):
            return v.device
    idx = batch.get("index")
    return idx.device if torch.is_tensor(idx) else torch.device("cpu")


def build(params: DSMConfig | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> DSM:
    params = checked_params(params, DSMConfig)
    return DSM(ctx.make_student(teacher), teacher, params, seed=getattr(ctx, "seed", 0))
