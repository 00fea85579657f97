"""TrigFlow view of any teacher path, for the continuous-time consistency objectives (sCM, TBCM).

TrigFlow (Lu & Song 2024): x_theta = cos(theta) x0 + sin(theta) sigma_d z, z ~ N(0, I), theta in
[0, pi/2]. The consistency function is parameterised through F (eq. 7 of the sCM paper),

    f(x, theta) = cos(theta) x - sin(theta) sigma_d F(x, theta),

and the probability-flow ODE is dx/dtheta = sigma_d F_teacher (the exact DDIM step in these
coordinates is x' = cos(d) x - sin(d) dxdt for a step of d radians).

No network here is TrigFlow-native: a teacher-architecture `Denoiser` is queried at the point of
its own path with the same signal-to-noise ratio, and F is read off its x0 as
F = (cos(theta) x - x0) / (sigma_d sin(theta)), so f(x, theta) is exactly that x0. Angles are
kept as (B,) tensors in radians (`theta`), path times as `t` in [0, 1].
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..conditioning import cat_cond
from ..paths import TrigFlowPath, _bcast, _fp

__all__ = [
    "angle_of_t",
    "t_of_angle",
    "max_angle",
    "to_path",
    "F_from_x0",
    "net_F",
    "teacher_velocity",
    "student_F_jvp",
    "F_output_gain",
    "trigflow_ddim",
    "times_from_angles",
    "forward_ad_safe",
]

HALF_PI = math.pi / 2
# the flow path reaches pure noise exactly at theta = pi/2, where cos(theta) rounds to a tiny
# negative number in float32: training angles stay this far below pi/2.
ANGLE_MARGIN = 1e-4


def angle_of_t(path, t: Tensor | float, sigma_d: float) -> Tensor:
    """The TrigFlow angle with the same SNR as time t of `path`: atan2(sigma, sigma_d alpha)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64)
    if isinstance(path, TrigFlowPath):
        return TrigFlowPath.angle(t)
    a, s = path.alpha_sigma(t)
    return torch.atan2(s, sigma_d * a)


def t_of_angle(path, theta: Tensor, sigma_d: float) -> Tensor:
    """The time of `path` with the same SNR as angle theta (differentiable, forward AD too)."""
    if isinstance(path, TrigFlowPath):
        return TrigFlowPath.t_from_angle(theta)
    ratio = sigma_d * torch.sin(theta) / torch.cos(theta)  # sigma/alpha of the point
    return path.t_from_ratio(ratio).clamp(0, 1)


def max_angle(path, sigma_d: float) -> float:
    """The largest angle a teacher can be queried at: that of its t = 1 (pi/2 for a flow or a
    zero-terminal-SNR path; just below for SD-like schedules), less a small margin."""
    th = float(angle_of_t(path, torch.tensor(1.0, dtype=torch.float64), sigma_d))
    return min(th, HALF_PI - ANGLE_MARGIN)


def to_path(x: Tensor, theta: Tensor, path, sigma_d: float) -> tuple[Tensor, Tensor]:
    """Move a TrigFlow point (x, theta) to `path` at equal SNR: returns (x_path, t_path).

    The scale is alpha_path / cos(theta); at equal SNR (alpha, sigma) of both paths are
    proportional, so it equals |(alpha, sigma)_path| / |(cos, sigma_d sin)|, which stays finite
    at theta = pi/2 (where `fewstep.paths.convert` would divide by cos = 0)."""
    x = _fp(x)
    theta = theta.to(x.dtype)
    t = t_of_angle(path, theta, sigma_d)
    if isinstance(path, TrigFlowPath):
        return x, t
    a, s = path.alpha_sigma(t)
    norm_trig = torch.sqrt(torch.cos(theta) ** 2 + (sigma_d * torch.sin(theta)) ** 2)
    scale = torch.sqrt(a * a + s * s) / norm_trig
    return x * _bcast(scale, x), t


def F_from_x0(x: Tensor, theta: Tensor, x0: Tensor, sigma_d: float) -> Tensor:
    """F = (cos(theta) x - x0) / (sigma_d sin(theta)), the TrigFlow output implied by x0."""
    c, s = _bcast(torch.cos(theta), x), _bcast(torch.sin(theta), x)
    return (c * x - x0) / (sigma_d * s)


def net_F(net, x: Tensor, theta: Tensor, cond, sigma_d: float, path, guidance: Tensor | float = 1.0) -> Tensor:
    """F of a teacher-architecture network at TrigFlow point (x, theta), through its x0 at the
    same-SNR point of `path`. With guidance != 1 the CFG output is used (affine, so CFG on x0 is
    CFG on F)."""
    x = _fp(x)
    theta = theta.to(x.dtype)
    xp, tp = to_path(x, theta, path, sigma_d)
    x0 = _fp(net(xp, tp, cond, guidance, output="x0"))
    return F_from_x0(x, theta, x0, sigma_d)


def teacher_velocity(teacher, x: Tensor, theta: Tensor, cond, sigma_d: float, path,
                     guidance: Tensor | float = 1.0) -> Tensor:
    """The PF-ODE velocity dx/dtheta = sigma_d F_teacher (CFG baked in), without grad."""
    with torch.no_grad():
        return sigma_d * net_F(teacher, x, theta, cond, sigma_d, path, guidance)


@contextlib.contextmanager
def forward_ad_safe(*modules: nn.Module) -> Iterator[None]:
    """Forward-mode AD needs the math SDPA kernel (the fused CPU kernels have no forward
    derivative) and no gradient checkpointing; both are restored on exit."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flagged = []
    for m in modules:
        for sub in m.modules():
            if getattr(sub, "gradient_checkpointing", False) is True:
                flagged.append(sub)
                sub.gradient_checkpointing = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for sub in flagged:
            sub.gradient_checkpointing = True


def F_output_gain(path, theta: Tensor, sigma_d: float, like: Tensor) -> Tensor:
    """|dF / d(network output)| per sample (B,): how strongly the student's native output moves F
    at angle theta. x0 is affine in the output on every path, so the slope is read off the path's
    own conversion (no branching on prediction type): 1/cos(theta) for eps-prediction (ill-
    conditioned near pure noise), bounded for v-prediction and flow."""
    xp, tp = to_path(_fp(like), theta.to(_fp(like).dtype), path, sigma_d)
    one = torch.ones_like(xp[:1]).expand_as(xp)
    slope = path.to_x0_eps(xp, one, tp)[0] - path.to_x0_eps(xp, torch.zeros_like(xp), tp)[0]
    slope = slope.flatten(1)[:, 0].abs()
    return slope / (sigma_d * torch.sin(theta.to(slope.dtype)))


def student_F_jvp(student, x: Tensor, theta: Tensor, dxdt: Tensor, cond, sigma_d: float, path,
                  delta: float | None = None, theta_max: float = HALF_PI) -> tuple[Tensor, Tensor]:
    """(F, dF/dtheta along the ODE, times cos sin) without grad, with one `torch.func.jvp`:
    tangents (cos sin dxdt, cos sin) as in the sCM paper (Alg. 1); the cos sin factor keeps the
    tangent bounded at both ends.

    delta (radians): instead of the exact derivative, the central secant over [theta - delta,
    theta + delta] along the same line (x +- d dxdt), inside (0, theta_max]. A network's
    instantaneous time derivative (what the JVP returns, exactly) can be dominated by variation on
    a scale far below any sampling step: training at integer DDPM timesteps leaves it
    unconstrained between them, and the small digits teachers show it on both paths (at angle 1.45
    the exact time derivative of F is 4.4x (VP) and 1.8x (flow) its secant over ten timestep
    indices, `python eval/tangent_smoothness.py`). The secant sees the trend over the interval.
    Three no-grad passes (F at the point and at both ends) instead of the JVP."""
    if isinstance(student, nn.parallel.DistributedDataParallel):
        student = student.module  # a no-grad pass needs no gradient synchronisation
    x = _fp(x).detach()
    theta = theta.to(x.dtype).detach()
    dxdt = _fp(dxdt).detach()
    if delta is not None:
        return _student_F_secant(student, x, theta, dxdt, cond, sigma_d, path, float(delta), theta_max)
    cs = torch.cos(theta) * torch.sin(theta)
    v_x = _bcast(cs, x) * dxdt

    def fn(xx: Tensor, th: Tensor) -> Tensor:
        return net_F(student, xx, th, cond, sigma_d, path)

    modules = [student] if isinstance(student, nn.Module) else []
    with torch.no_grad(), forward_ad_safe(*modules):
        F, JF = torch.func.jvp(fn, (x, theta), (v_x, cs))
    return F.detach(), JF.detach()


def _student_F_secant(student, x: Tensor, theta: Tensor, dxdt: Tensor, cond, sigma_d: float, path,
                      delta: float, theta_max: float) -> tuple[Tensor, Tensor]:
    """`student_F_jvp` with `delta`: unwrapped student, detached float inputs."""
    d_up = torch.clamp(theta_max - theta, min=0.0).clamp(max=delta)
    d_dn = torch.clamp(theta - 1e-4, min=0.0).clamp(max=delta)
    with torch.no_grad():
        both = torch.cat([x + _bcast(d_up, x) * dxdt, x - _bcast(d_dn, x) * dxdt, x])
        th = torch.cat([theta + d_up, theta - d_dn, theta])
        cond3 = cat_cond(cond, cond, cond) if cond is not None else None
        F_up, F_dn, F = net_F(student, both, th, cond3, sigma_d, path).chunk(3)
    cs = torch.cos(theta) * torch.sin(theta)
    JF = _bcast(cs / (d_up + d_dn).clamp_min(1e-12), x) * (F_up - F_dn)
    return F.detach(), JF.detach()


def trigflow_ddim(x: Tensor, dxdt: Tensor, step: Tensor | float) -> Tensor:
    """The exact DDIM move of `step` radians towards the data: cos(step) x - sin(step) dxdt."""
    if not torch.is_tensor(step):
        step = torch.tensor(float(step), dtype=x.dtype)
    step = step.to(device=x.device, dtype=x.dtype)
    return _bcast(torch.cos(step), x) * x - _bcast(torch.sin(step), x) * dxdt


def times_from_angles(angles: Sequence[float], path, sigma_d: float) -> list[float]:
    """TrigFlow sampling angles (decreasing, ending at 0) as times of `path` at equal SNR, so
    the generic `fewstep.samplers.sample(..., renoise="fresh")` runs the student on them. An
    angle at or above the path's own t = 1 angle maps to t = 1 (the sampler's pure-noise start)."""
    top = float(angle_of_t(path, torch.tensor(1.0, dtype=torch.float64), sigma_d))
    out = []
    for a in angles:
        a = float(a)
        if a >= top - 1e-9 or a >= HALF_PI - 1e-9:
            out.append(1.0)
        elif a <= 0:
            out.append(0.0)
        else:
            out.append(float(t_of_angle(path, torch.tensor([a], dtype=torch.float64), sigma_d)[0]))
    return out
