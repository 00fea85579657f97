"""Continuous-time consistency distillation in TrigFlow: sCM (Lu & Song 2024) and its data-free
trajectory-backward form TBCM.

Both train the student's F (see `_trigflow`: F is read off the teacher-architecture student's x0
at the same-SNR point of its own path) with the sCM loss (Alg. 1 of the sCM paper):

    (F-, JF) = jvp(F_student, (x, theta), (cos sin dxdt, cos sin))         no grad
    r        = min(1, step / H)                                             tangent warm-up
    g        = -cos^2 (sd F- - dxdt) - r (cos sin x + sd JF);  g <- g / (||g|| + c)
    loss     = mean( w(theta) / e^logvar (F - F- - g)^2 + logvar ),  w = 1 / (sd tan theta)

and differ only in where the training points (x, theta, dxdt = dx/dtheta of the teacher) come from:

- sCM: theta = atan(e^tau / sd), tau ~ N(P_mean, P_std^2); x = sd (cos x0 + sin z) from real latents
  x0 (the published convention: the state is sd times the latent, `_trigflow`);
  dxdt = sd F_teacher with CFG (one teacher pass per point).
- TBCM: the teacher's own CFG trajectory from noise along a stratified route (no images, no VAE
  encoder); every visited point is stored with the velocity that moved it, and that velocity is
  reused as the tangent, so training costs no extra teacher call.

Two options for teachers on which the plain method struggles:

- `student_prediction: v_prediction` with `convert_steps`: the student's output is read as v on
  the teacher's own schedule, so F stays bounded in it near pure noise (an eps student's x0 is
  (x - sigma eps) / alpha, every error times up to 1/alpha); the first `convert_steps` regress the
  student's F onto the guided teacher's F at the training points (same-SNR conversion, no extra
  teacher call), then the sCM loss takes over. The run card records the prediction type, so
  evaluation and export read the student that way.
- `tangent_delta` (any teacher): the exact JVP returns the network's instantaneous time derivative,
  which a teacher trained at integer timesteps (or simply a small one) does not keep smooth below
  a few timestep indices; a central secant over [theta - d, theta + d] along the same line sees
  the trend instead (`_trigflow.student_F_jvp`).

logvar is the adaptive weighting (EDM2 / sCM): a zero-initialised Linear on a fixed Fourier
embedding of log(sd tan theta), trained with the student; with it off, logvar = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond, cat_cond, index_cond
from ..denoiser import Denoiser
from ..paths import _bcast, with_prediction
from ..randomness import SampleDraws, shared_generator
from . import _trigflow as tf
from .base import Batch, freeze, unwrap

__all__ = [
    "SCMParams",
    "TBCMParams",
    "SCMObjective",
    "TBCMObjective",
    "LogVar",
    "scm_tangent",
    "tbcm_route",
    "build_scm",
    "build_tbcm",
]


@dataclass
class SCMParams:
    sigma_data: float = 0.5  # TrigFlow sd: the state is sd * latent, x = sd (cos x0 + sin z);
    #   the teacher's time depends on the angle only (`_trigflow`)
    p_mean: float = 0.2  # log-normal proposal of tan(theta) sd: tau ~ N(p_mean, p_std^2)
    p_std: float = 1.6  #   (SANA-Sprint's values; the paper uses -0.8, 1.6)
    theta_min: float = 1e-3  # smallest training angle (w = 1/(sd tan) explodes at 0)
    max_angle: float | None = None  # largest training angle and the sampler's first angle; None:
    #   the teacher's own t = 1 (see `_init` on eps teachers)
    tangent_warmup: int = 4000  # H of the warm-up r = min(1, step / H)
    tangent_norm_c: float = 0.1  # c of the tangent normalisation g / (||g|| + c)
    guidance: float = 1.0  # teacher CFG scale baked into the tangent (Imagen form)
    weighting: str = "tan"  # w(theta): "tan" = 1 / (sd tan theta) (sCM); "x0" = (sd sin theta)^2,
    #   uniform in the consistency function's own output (x0)
    adaptive_weighting: bool = True  # learn logvar(theta); off: logvar = 0
    precondition: bool = False  # scale each point's loss by 1 / |dF/d output|^2, so the loss
    #   is as well-conditioned in the network's own output as in F
    #   (eps students: cos^2 theta; see `scm_loss`)
    logvar_features: int = 128  # size of the Fourier embedding of the adaptive weighting
    tangent_delta: float | None = None  # None: exact JVP tangent; radians: central secant over
    #   [theta - d, theta + d] (teachers trained at integer timesteps)
    student_prediction: str | None = None  # read the student's output as this prediction type instead of
    #   the teacher's ("v_prediction" for an eps VP teacher: F stays
    #   bounded in the output near pure noise); needs convert_steps
    convert_steps: int = 0  # first steps: regress the student's F onto the teacher's guided
    #   F (same-SNR conversion, no extra teacher call), then sCM
    num_steps: int = 2  # student sampling steps
    intermediate_angle: float = 1.3  # the middle angle of the 2-step sampler [pi/2, this, 0]
    sampling_angles: list[float] | None = None  # explicit angles (num_steps entries, from pi/2);
    #   None: [pi/2, intermediate] for 2, linspace else

    def validate(self) -> None:
        _check(self)


@dataclass
class TBCMParams(SCMParams):
    intermediate_angle: float = 1.0  # TBCM's 2-step sampler [pi/2, 1.0, 0]
    route_steps: int = 16  # reference route length (15 stored points per trajectory)
    route_shift: float = 2.5  # flow shift of the reference route
    points_per_step: int | None = None  # subsample this many stored points a step (None: all)

    def validate(self) -> None:
        _check(self)


class LogVar(nn.Module):
    """Adaptive loss weighting logvar(theta): a Linear (zero-initialised, so it starts at 0) on
    fixed random Fourier features of log(sd tan theta) (EDM2's uncertainty head)."""

    def __init__(self, features: int = 128, sigma_data: float = 0.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.sigma_data = float(sigma_data)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, theta: Tensor) -> Tensor:
        c = torch.log(self.sigma_data * torch.tan(theta.float())) / 4
        emb = torch.cos(c[:, None] * self.freqs[None] + self.phases[None]) * math.sqrt(2)
        return self.linear(emb)[:, 0]


def scm_tangent(
    F_minus: Tensor,
    JF: Tensor,
    dxdt: Tensor,
    x: Tensor,
    theta: Tensor,
    r: float,
    sigma_d: float,
    norm_c: float | None = 0.1,
) -> Tensor:
    """The normalised sCM target direction g (detached), shapes (B, C, H, W); theta (B,).

    g = -cos^2 (sd F- - dxdt) - r (cos sin x + sd JF) is cos(theta) times the total derivative of
    the consistency function along the teacher ODE (sCM paper, eq. 8 with the warm-up r);
    normalised per sample as g / (||g|| + c) (norm_c None: not normalised)."""
    c, s = _bcast(torch.cos(theta), x), _bcast(torch.sin(theta), x)
    g = -(c * c) * (sigma_d * F_minus - dxdt) - r * (c * s * x + sigma_d * JF)
    if norm_c is None:
        return torch.nan_to_num(g).detach()
    norm = g.flatten(1).norm(dim=1)
    g = g / _bcast(norm + norm_c, g)
    return torch.nan_to_num(g).detach()


def tbcm_route(steps: int = 16, shift: float = 2.5, num_train_timesteps: int = 1000) -> Tensor:
    """TBCM's reference angles (float64, decreasing from pi/2): the shifted flow-matching sigma
    schedule of `steps` entries (FlowMatchEulerDiscreteScheduler's double shift), mapped by
    atan(s / (1 - s)), with the first entry pi/2."""

    def sh(u):
        return shift * u / (1 + (shift - 1) * u)

    s_min = sh(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    u = torch.linspace(1.0, float(s_min), steps, dtype=torch.float64)
    s = sh(u)
    ref = torch.atan(s / (1 - s))
    ref[0] = tf.HALF_PI
    return ref


class _ConsistencyLoss:
    """The sCM loss on given points, shared by sCM and TBCM."""

    p: SCMParams
    nets: dict[str, nn.Module]
    path: Any

    def _sampling(self) -> dict[str, Any]:
        out = {
            "times": self.sampling_times(self.p.num_steps),
            "renoise": "fresh",
            "times_by_steps": {str(n): self.sampling_times(n) for n in (1, 2, 4)},
            "angles": self.sampling_angles(self.p.num_steps),
        }
        if self.p.student_prediction is not None:
            out["prediction_type"] = self.p.student_prediction  # how to read the student's output
        return out

    def sampling_angles(self, num_steps: int) -> list[float]:
        """[start, ..., 0]: start is pi/2 (pure noise), or max_angle where set."""
        p = self.p
        top = tf.HALF_PI if p.max_angle is None else float(p.max_angle)
        if p.sampling_angles is not None and num_steps == p.num_steps:
            return [float(a) for a in p.sampling_angles] + [0.0]
        if num_steps == 2:
            return [top, float(p.intermediate_angle), 0.0]
        return torch.linspace(top, 0.0, num_steps + 1, dtype=torch.float64).tolist()

    def sampling_times(self, num_steps: int) -> list[float]:
        """The TrigFlow sampling angles as times of the student's own path (equal SNR)."""
        return tf.times_from_angles(self.sampling_angles(num_steps), self.path)

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def scm_loss(
        self, x: Tensor, theta: Tensor, dxdt: Tensor, cond: Cond | None, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        p = self.p
        sd = p.sigma_data
        student = self.nets["student"]
        if step < p.convert_steps:
            return self.conversion_loss(x, theta, dxdt, cond)
        F_minus, JF = tf.student_F_jvp(student, x, theta, dxdt, cond, sd, self.path, p.tangent_delta, self.theta_max)
        s = step - p.convert_steps
        r = min(1.0, s / p.tangent_warmup) if p.tangent_warmup > 0 else 1.0
        g = scm_tangent(F_minus, JF, dxdt, x, theta, r, sd, p.tangent_norm_c)
        F = tf.net_F(student, x, theta, cond, sd, self.path)
        if p.weighting == "tan":
            weight = 1.0 / (sd * torch.tan(theta))
        else:  # f = cos x - sin sd F: an F error e is an x0 error sd sin e
            weight = (sd * torch.sin(theta)) ** 2
        logvar = self.nets["logvar"](theta) if "logvar" in self.nets else torch.zeros_like(theta)
        sq = ((F - F_minus - g) ** 2).flatten(1).mean(1)
        per = weight / torch.exp(logvar) * sq + logvar
        if p.precondition:
            # The target F- + g is the same; only the per-point scale changes. An eps student has
            # F = eps / cos + ..., so its loss curvature in eps grows as 1/cos^2 towards pure noise
            # (1e4 near t = 1 of a linear DDPM schedule), which destabilises training there; the
            # factor 1/|dF/d out|^2 makes it uniform (it multiplies logvar's term too, so the
            # adaptive weighting keeps its optimum).
            per = per / tf.F_output_gain(unwrap(student).path, theta, sd, x).detach() ** 2
        loss = per.mean()
        return loss, {
            "loss": float(loss.detach()),
            "loss_unweighted": float(sq.mean().detach()),
            "r": r,
            "jvp_norm": float(JF.flatten(1).norm(dim=1).mean()),
            "logvar_mean": float(logvar.detach().mean()),
        }

    def conversion_loss(
        self, x: Tensor, theta: Tensor, dxdt: Tensor, cond: Cond | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The same-SNR conversion phase: mean ||sd F_student - dxdt||^2, dxdt = sd F of the guided
        teacher at the point, so the student starts sCM as the teacher's guided x0 predictor read
        through its own parameterisation (logvar joins with weight 0)."""
        sd = self.p.sigma_data
        F = tf.net_F(self.nets["student"], x, theta, cond, sd, self.path)
        loss = ((sd * F - dxdt.float()) ** 2).flatten(1).mean(1).mean() / (sd * sd)
        if "logvar" in self.nets:  # every trained parameter takes part (DDP)
            loss = loss + 0.0 * self.nets["logvar"](theta).sum()
        return loss, {"loss": float(loss.detach()), "convert": 1.0}


def _init(self, params: SCMParams, teacher: Denoiser, student: Denoiser, logvar_seed: int = 0) -> None:
    _check(params)
    self.p = params
    self.seed = int(logvar_seed)  # the run's seed: also keys the per-sample draws (fewstep.randomness)
    self.path = teacher.path
    freeze(teacher)
    if params.student_prediction is not None:
        # the student's output is read with another prediction type; its weights start as the
        # teacher's and `convert_steps` of regression make it the teacher's F in that reading
        student.path = _student_path(params, teacher)
    self.nets = {"student": student, "teacher": teacher}
    self.groups = {"generator": ["student"]}
    if params.adaptive_weighting:
        dev = next(student.parameters()).device
        self.nets["logvar"] = LogVar(params.logvar_features, params.sigma_data, logvar_seed).to(dev)
        self.groups["generator"].append("logvar")
    # An eps-prediction teacher reads x0 = (x - sigma eps) / alpha, so near its t = 1 (alpha ~ 0.006
    # for the linear DDPM schedule) every error of the network's eps is amplified ~1/alpha in x0,
    # which a one-point consistency sampler re-noises as signal; `max_angle` caps both training
    # and the sampler's start (SD-like terminal SNR at 1.5 rad: alpha ~ 0.07).
    self.theta_max = tf.max_angle(self.path)
    if params.max_angle is not None:
        self.theta_max = min(self.theta_max, float(params.max_angle))
    self.sampling = self._sampling()


class SCMObjective(_ConsistencyLoss):
    """sCM distillation from real data (batch['x0']); see the module docstring.
    nets: "student" (trained), "teacher" (frozen), "logvar" (trained with the student in the
    "generator" group, optional)."""

    def __init__(self, params: SCMParams, teacher: Denoiser, student: Denoiser, logvar_seed: int = 0):
        _init(self, params, teacher, student, logvar_seed)

    def sample_angles(self, rng: SampleDraws) -> Tensor:
        tau = self.p.p_mean + self.p.p_std * rng.normal()
        theta = torch.atan(torch.exp(tau) / self.p.sigma_data)
        return theta.clamp(self.p.theta_min, self.theta_max)

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"sCM has one phase, 'generator'; got {phase!r}")
        x0 = batch.get("x0")
        if x0 is None:
            raise ValueError("sCM needs batch['x0'] (real latents); use TBCM for data-free distillation")
        x0 = x0.float()
        cond = batch.get("cond")
        sd = self.p.sigma_data
        rng = SampleDraws.for_batch(batch, self.seed, step, "scm", x0.device, rows=x0.shape[0])
        theta = self.sample_angles(rng)
        z = rng.normal_like(x0)
        x = sd * (_bcast(torch.cos(theta), x0) * x0 + _bcast(torch.sin(theta), x0) * z)
        dxdt = tf.teacher_velocity(self.nets["teacher"], x, theta, cond, sd, self.path, self.p.guidance)
        loss, logs = self.scm_loss(x, theta, dxdt, cond, step)
        logs["theta_mean"] = float(theta.mean())
        return loss, logs


class TBCMObjective(_ConsistencyLoss):
    """TBCM: sCM on the teacher's own trajectories from noise (data-free); the batch gives the
    conditions and the latent shape only. nets as for sCM."""

    def __init__(self, params: TBCMParams, teacher: Denoiser, student: Denoiser, logvar_seed: int = 0):
        _init(self, params, teacher, student, logvar_seed)
        self.ref_route = tbcm_route(
            params.route_steps, params.route_shift, int(getattr(self.path, "num_train_timesteps", 1000))
        )

    def route(self, step: int) -> Tensor:
        """[theta_max] + one angle drawn uniformly in each reference interval (decreasing), the
        same for the whole global batch at a step. A teacher whose t = 1 lies below pi/2 (SD-like
        VP schedules) starts at its own top angle, and draws above it are dropped (no zero-length steps)."""
        ref = self.ref_route
        u = torch.rand(ref.numel() - 1, dtype=torch.float64, generator=shared_generator(self.seed, step, "tbcm/route"))
        inner = ref[1:] + u * (ref[:-1] - ref[1:])
        inner = inner[inner < self.theta_max]
        return torch.cat([torch.tensor([self.theta_max], dtype=torch.float64), inner])

    @torch.no_grad()
    def trajectory(self, noise: Tensor, cond: Cond | None, route: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run the teacher's CFG ODE along `route` from x = noise * sd with exact TrigFlow-DDIM
        steps, storing (x, theta, dxdt) at every route point but the first (pure noise).
        Returns x (P, B, ...), theta (P,), dxdt (P, B, ...) and the final sample x(0), all in
        TrigFlow units (sd * latent)."""
        sd = self.p.sigma_data
        x = noise.float() * sd
        xs, ths, vs = [], [], []
        for i in range(route.numel()):
            th = route[i].to(x.dtype)
            theta = th.expand(x.shape[0]).to(x.device)
            v = tf.teacher_velocity(self.nets["teacher"], x, theta, cond, sd, self.path, self.p.guidance)
            if i > 0:
                xs.append(x)
                ths.append(th)
                vs.append(v)
            step = route[i] - (route[i + 1] if i + 1 < route.numel() else 0.0)
            x = tf.trigflow_ddim(x, v, step)
        return torch.stack(xs), torch.stack(ths), torch.stack(vs), x

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"TBCM has one phase, 'generator'; got {phase!r}")
        shape = tuple(batch["shape"]) if "shape" in batch else tuple(batch["x0"].shape)
        cond = batch.get("cond")
        dev = next(self.nets["student"].parameters()).device
        noise = SampleDraws.for_batch(batch, self.seed, step, "tbcm", dev, rows=shape[0]).normal(*shape[1:])
        xs, ths, vs, _ = self.trajectory(noise, cond, self.route(step))
        p_pts, b = xs.shape[0], xs.shape[1]
        x = xs.reshape(p_pts * b, *shape[1:])
        dxdt = vs.reshape(p_pts * b, *shape[1:])
        theta = ths[:, None].expand(p_pts, b).reshape(-1).to(x.device)
        cond_all = cat_cond(*([cond] * p_pts)) if cond is not None else None
        n = int(batch.get("global_batch_size", b))
        k = self.p.points_per_step
        if k is None or k >= p_pts * n:
            loss, logs = self.scm_loss(x, theta, dxdt, cond_all, step)
            logs["points"] = float(x.shape[0])
            return loss, logs
        # k of the global batch's p_pts * n points (point p of global sample i is p * n + i), the
        # same choice on every process; this batch trains the chosen ones among its rows, weighted
        # so that the global batch's loss is their mean: sum_here / k * (n / b), b rows here
        chosen = torch.zeros(p_pts * n, dtype=torch.bool)
        chosen[torch.randperm(p_pts * n, generator=shared_generator(self.seed, step, "tbcm/points"))[:k]] = True
        idx = batch.get("index")
        rows = torch.arange(b) if idx is None else idx.cpu().long()
        here = torch.nonzero(chosen.view(p_pts, n)[:, rows].reshape(-1)).flatten().to(x.device)
        if here.numel() == 0:  # no chosen point in this batch: a zero loss on the graph
            first = torch.zeros(1, dtype=torch.long, device=x.device)
            loss, logs = self.scm_loss(x[:1], theta[:1], dxdt[:1], index_cond(cond_all, first), step)
            return 0.0 * loss, {**logs, "points": 0.0}
        loss, logs = self.scm_loss(x[here], theta[here], dxdt[here], index_cond(cond_all, here), step)
        logs["points"] = float(here.numel())
        return loss * (here.numel() * n / (k * b)), logs


def _check(p: SCMParams) -> None:
    if p.sigma_data <= 0:
        raise ValueError(f"objective.sigma_data={p.sigma_data} must be > 0")
    if p.p_std <= 0:
        raise ValueError(f"objective.p_std={p.p_std} must be > 0")
    if not 0 < p.theta_min < tf.HALF_PI:
        raise ValueError(f"objective.theta_min={p.theta_min} must lie in (0, pi/2)")
    if p.tangent_warmup < 0 or p.tangent_norm_c <= 0:
        raise ValueError("objective.tangent_warmup must be >= 0 and objective.tangent_norm_c > 0")
    if p.weighting not in ("tan", "x0"):
        raise ValueError(f"objective.weighting={p.weighting!r} must be 'tan' or 'x0'")
    if p.guidance <= 0:
        raise ValueError(f"objective.guidance={p.guidance} must be > 0")
    if p.num_steps < 1:
        raise ValueError(f"objective.num_steps={p.num_steps} must be >= 1")
    if not 0 < p.intermediate_angle < tf.HALF_PI:
        raise ValueError(f"objective.intermediate_angle={p.intermediate_angle} must lie in (0, pi/2)")
    if p.max_angle is not None:
        if not p.theta_min < p.max_angle <= tf.HALF_PI:
            raise ValueError(f"objective.max_angle={p.max_angle} must lie in (objective.theta_min, pi/2]")
        if p.num_steps == 2 and p.sampling_angles is None and p.intermediate_angle >= p.max_angle:
            raise ValueError(
                f"objective.intermediate_angle={p.intermediate_angle} must be below objective.max_angle={p.max_angle}"
            )
    if p.sampling_angles is not None:
        a = [float(v) for v in p.sampling_angles]
        if len(a) != p.num_steps:
            raise ValueError(
                f"objective.num_steps={p.num_steps} needs objective.sampling_angles with {p.num_steps} entries, got {a}"
            )
        if any(v2 >= v1 for v1, v2 in zip(a, a[1:])) or a[0] > tf.HALF_PI + 1e-6 or a[-1] <= 0:
            raise ValueError(f"objective.sampling_angles must decrease within (0, pi/2], got {a}")
    if isinstance(p, TBCMParams):
        if p.route_steps < 2:
            raise ValueError(f"objective.route_steps={p.route_steps} must be >= 2")
        if p.route_shift <= 0:
            raise ValueError(f"objective.route_shift={p.route_shift} must be > 0")
        if p.points_per_step is not None and p.points_per_step < 1:
            raise ValueError(f"objective.points_per_step={p.points_per_step} must be >= 1 or null")
    if p.tangent_delta is not None and not 0 < p.tangent_delta < 0.5:
        raise ValueError(f"objective.tangent_delta={p.tangent_delta} must lie in (0, 0.5) radians or be null")
    if p.convert_steps < 0:
        raise ValueError(f"objective.convert_steps={p.convert_steps} must be >= 0")
    if p.student_prediction is not None and p.convert_steps == 0:
        raise ValueError(
            "objective.student_prediction is set but objective.convert_steps=0: a student "
            "whose output is read another way than the teacher's needs conversion steps"
        )


def _student_path(p: SCMParams, teacher: Denoiser):
    """The teacher's path read with objective.student_prediction (the teacher's own when unset);
    `with_prediction` refuses a non-VP path or an unknown type, here named by the key."""
    try:
        return with_prediction(teacher.path, p.student_prediction)
    except ValueError as e:
        raise ValueError(f"objective.student_prediction={p.student_prediction!r}: {e}") from e


def build_scm(params: SCMParams, teacher: Denoiser, ctx: Any) -> SCMObjective:
    """Registry builder for sCM (needs real data)."""
    _check(params)
    _student_path(params, teacher)
    if not bool(getattr(ctx, "has_real_data", True)):
        raise ValueError("objective 'scm' needs real data (batch x0); the data-free variant is 'tbcm'")
    return SCMObjective(params, teacher, ctx.make_student(teacher), int(getattr(ctx, "seed", 0)))


def build_tbcm(params: TBCMParams, teacher: Denoiser, ctx: Any) -> TBCMObjective:
    """Registry builder for TBCM (data-free)."""
    _check(params)
    _student_path(params, teacher)
    return TBCMObjective(params, teacher, ctx.make_student(teacher), int(getattr(ctx, "seed", 0)))
