"""TrigFlow view of any teacher path, for the continuous-time consistency objectives (sCM, TBCM).

TrigFlow (Lu & Song 2024): x_theta = cos(theta) x0 + sin(theta) sigma_d z, z ~ N(0, I), theta in
[0, pi/2]. The consistency function is parameterised through F (eq. 7 of the sCM paper),

    f(x, theta) = cos(theta) x - sin(theta) sigma_d F(x, theta),

and the probability-flow ODE is dx/dtheta = sigma_d F_teacher (the exact DDIM step in these
coordinates is x' = cos(d) x - sin(d) dxdt for a step of d radians).

The convention (SANA-Sprint, TBCM; the one place fewstep defines it)
---------------------------------------------------------------------
The TrigFlow state is sigma_d times the teacher's latent: x0 = sd * latent and the noise is
sd * z, so x / sd = cos(theta) latent + sin(theta) z is the teacher's own point up to scale, at

    sigma / alpha = tan(theta)         (a flow teacher: time s = sin / (sin + cos)),

for every sigma_d. sigma_d therefore only scales the state, the proposal theta = atan(e^tau / sd)
and the weight 1 / (sd tan theta), exactly as in the papers, so their hyperparameters (sigma_d
0.5, P_mean, the middle angles 1.3 and 1.0, TBCM's route) land at the teachers' times they name.
A student sample in TrigFlow units is sd * latent (the samplers run on the teacher's path at the
mapped times and return latents directly).

No network here is TrigFlow-native: a teacher-architecture `Denoiser` is queried at that point of
its own path, and F is read off its x0 as F = (cos(theta) x - sd x0) / (sd sin(theta)), so
f(x, theta) = sd x0. A `TrigFlowPath(sd_p)` network's own angle is the same angle (its state is
sd_p / sd times this one). Angles are kept as (B,) tensors in radians (`theta`), path times as
`t` in [0, 1].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

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


def angle_of_t(path, t: Tensor | float) -> Tensor:
    """The TrigFlow angle of time t of `path`: atan2(sigma, alpha) (independent of sigma_d)."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=torch.float64)
    if isinstance(path, TrigFlowPath):
        return TrigFlowPath.angle(t)
    a, s = path.alpha_sigma(t)
    return torch.atan2(s, a)


def t_of_angle(path, theta: Tensor) -> Tensor:
    """The time of `path` at angle theta: sigma / alpha = tan(theta), independent of sigma_d (a flow
    path: sin / (sin + cos)); differentiable, forward AD too."""
    if isinstance(path, TrigFlowPath):
        return TrigFlowPath.t_from_angle(theta)
    ratio = torch.sin(theta) / torch.cos(theta)  # sigma/alpha of the point
    return path.t_from_ratio(ratio).clamp(0, 1)


def max_angle(path) -> float:
    """The largest angle a teacher can be queried at: that of its t = 1 (pi/2 for a flow or a
    zero-terminal-SNR path; just below for SD-like schedules), less a small margin."""
    th = float(angle_of_t(path, torch.tensor(1.0, dtype=torch.float64)))
    return min(th, HALF_PI - ANGLE_MARGIN)


def _state_per_path_unit(path, sigma_d: float) -> float:
    """TrigFlow state units per unit of `path`'s own data: sd (the state is sd * latent), or
    sd / sd_p for a TrigFlowPath(sd_p), whose own state is already sd_p * latent."""
    if isinstance(path, TrigFlowPath):
        return sigma_d / path.sigma_d
    return sigma_d


def to_path(x: Tensor, theta: Tensor, path, sigma_d: float) -> tuple[Tensor, Tensor]:
    """Move a TrigFlow point (x, theta) to `path` (see the module docstring): returns (x_path, t_path).

    x / sd = cos latent + sin z has |(cos, sin)| = 1, so the teacher's point alpha latent + sigma z
    is it times |(alpha, sigma)|, finite at theta = pi/2 (where `fewstep.paths.convert` would
    divide by cos = 0)."""
    x = _fp(x)
    theta = theta.to(x.dtype)
    t = t_of_angle(path, theta)
    k = _state_per_path_unit(path, sigma_d)
    if isinstance(path, TrigFlowPath):
        return x / k, t
    a, s = path.alpha_sigma(t)
    return x * _bcast(torch.sqrt(a * a + s * s) / k, x), t


def F_from_x0(x: Tensor, theta: Tensor, x0: Tensor, sigma_d: float, k: float | None = None) -> Tensor:
    """F = (cos(theta) x - k x0) / (sigma_d sin(theta)), the TrigFlow output implied by a path's
    x0 (k: state units per path unit, sd by default: x0 a latent)."""
    k = sigma_d if k is None else k
    c, s = _bcast(torch.cos(theta), x), _bcast(torch.sin(theta), x)
    return (c * x - k * x0) / (sigma_d * s)


def net_F(net, x: Tensor, theta: Tensor, cond, sigma_d: float, path, guidance: Tensor | float = 1.0) -> Tensor:
    """F of a teacher-architecture network at TrigFlow point (x, theta), through its x0 at the
    same point of `path`. With guidance != 1 the CFG output is used (affine, so CFG on x0 is
    CFG on F)."""
    x = _fp(x)
    theta = theta.to(x.dtype)
    xp, tp = to_path(x, theta, path, sigma_d)
    x0 = _fp(net(xp, tp, cond, guidance, output="x0"))
    return F_from_x0(x, theta, x0, sigma_d, _state_per_path_unit(path, sigma_d))


def teacher_velocity(
    teacher, x: Tensor, theta: Tensor, cond, sigma_d: float, path, guidance: Tensor | float = 1.0
) -> Tensor:
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
    slope = slope.flatten(1)[:, 0].abs() * _state_per_path_unit(path, sigma_d)
    return slope / (sigma_d * torch.sin(theta.to(slope.dtype)))


def student_F_jvp(
    student,
    x: Tensor,
    theta: Tensor,
    dxdt: Tensor,
    cond,
    sigma_d: float,
    path,
    delta: float | None = None,
    theta_max: float = HALF_PI,
) -> tuple[Tensor, Tensor]:
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


def _student_F_secant(
    student, x: Tensor, theta: Tensor, dxdt: Tensor, cond, sigma_d: float, path, delta: float, theta_max: float
) -> tuple[Tensor, Tensor]:
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


def times_from_angles(angles: Sequence[float], path) -> list[float]:
    """TrigFlow sampling angles (decreasing, ending at 0) as times of `path` (`t_of_angle`), so
    the generic `fewstep.samplers.sample(..., renoise="fresh")` runs the student on them: the
    published sampler (x0 = f, re-noised as cos x0 + sin sd z) is that sampler on latents. An
    angle at or above the path's own t = 1 angle maps to t = 1 (the sampler's pure-noise start)."""
    top = float(angle_of_t(path, torch.tensor(1.0, dtype=torch.float64)))
    out = []
    for a in angles:
        a = float(a)
        if a >= top - 1e-9 or a >= HALF_PI - 1e-9:
            out.append(1.0)
        elif a <= 0:
            out.append(0.0)
        else:
            out.append(float(t_of_angle(path, torch.tensor([a], dtype=torch.float64))[0]))
    return out
