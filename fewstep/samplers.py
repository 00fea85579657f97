"""Samplers are functions over an explicit list of times (t in [0, 1], decreasing, ending at 0).

    x0 = sample(denoiser, noise, times=[1.0, 0.0])            # one step: denoiser(noise, 1, cond)
    x0 = sample(denoiser, noise, times=path.sampling_times(50), guidance=4.0)   # teacher DDIM/Euler

Each step predicts x0 at t_i and moves to t_{i+1}, either deterministically (DDIM: keep the
implied noise; for a flow path this is exactly the Euler step) or by re-injecting fresh noise
(the multistep consistency / DMD2 sampler). Reaching t = 0 returns the x0 prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .denoiser import Denoiser

__all__ = ["sample", "sample_hybrid", "initial_noise", "check_times"]


def check_times(times: Sequence[float] | Tensor) -> list[float]:
    ts = [float(t) for t in (times.tolist() if torch.is_tensor(times) else times)]
    if len(ts) < 2:
        raise ValueError(f"times needs at least two entries (start and end), got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"times must be strictly decreasing, got {ts}")
    if ts[0] > 1 or ts[-1] < 0:
        raise ValueError(f"times must lie in [0, 1], got {ts}")
    return ts


def initial_noise(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Standard normal noise (float32), drawn on the CPU so that a seed gives the same noise on
    every device."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device or "cpu")


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Cond | None = None,
    times: Sequence[float] | Tensor = (1.0, 0.0),
    guidance: float | Tensor = 1.0,
    renoise: str = "ddim",
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
    callback: Callable[[int, float, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Run the denoiser along `times` and return the final sample (float32).

    Args:
        denoiser: the adapter (teacher or student).
        noise:    (B, C, H, W) standard normal noise; the start is noise * path.init_noise_sigma
                  (as a diffusers pipeline starts) unless `start` gives x at times[0].
        times:    decreasing times in [0, 1]; the last is usually 0 (then the x0 prediction is
                  returned); a last time above 0 returns x at that time.
        renoise:  "ddim" (deterministic, the teacher sampler and TDM's) or "fresh" (fresh noise
                  between steps: DMD2, LCM, sCM).
        generator: the source of the fresh noise (drawn on the CPU).
        callback: called as callback(i, t_i, x_t, x0_hat) after each prediction.
    """
    if renoise not in ("ddim", "fresh"):
        raise ValueError(f"renoise must be 'ddim' or 'fresh', got {renoise!r}")
    ts = check_times(times)
    path = denoiser.path
    x = start.float() if start is not None else noise.float() * path.init_noise_sigma
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        x0 = denoiser(x, t, cond, guidance)
        if callback is not None:
            callback(i, t, x, x0)
        if t_next == 0.0:
            return x0
        z = initial_noise(x.shape, generator, x.device) if renoise == "fresh" else None
        x = path.sampler_move(x, x0, t, t_next, renoise, z)
    return x


@torch.no_grad()
def sample_hybrid(
    teacher: Denoiser,
    student: Denoiser,
    noise: Tensor,
    cond: Cond | None = None,
    teacher_times: Sequence[float] = (1.0, 0.75),
    student_times: Sequence[float] = (0.75, 0.0),
    guidance: float = 1.0,
    student_renoise: str = "fresh",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diversity distillation: the teacher with CFG for the first step(s) (it sets the layout),
    the student for the rest. teacher_times[-1] must equal student_times[0]."""
    if abs(float(teacher_times[-1]) - float(student_times[0])) > 1e-12:
        raise ValueError("teacher_times must end where student_times begin")
    x = sample(teacher, noise, cond, teacher_times, guidance=guidance, renoise="ddim")
    return sample(student, noise, cond, student_times, renoise=student_renoise, generator=generator, start=x)
