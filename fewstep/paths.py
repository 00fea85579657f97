"""Gaussian noise paths: the one place that knows alpha(t), sigma(t), native timesteps and
prediction types.

Time convention used everywhere in fewstep:
    t        continuous time in [0, 1]; data at t=0, noise at t=1 (TrigFlow: its own angle, see below)
    timestep what the backbone is fed (DDPM index 0..999, flow time 0..1000, TrigFlow angle)
    sigma    noise standard deviation: x_t = alpha(t) * x0 + sigma(t) * eps, eps ~ N(0, I)

Every path converts a network output of its native prediction type to (x0, eps) and back, so
objectives and samplers never branch on prediction type. All maths is done in float32 (or the
dtype of the inputs if that is float64); callers cast the backbone input only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "VPPath",
    "FlowPath",
    "TrigFlowPath",
    "Path",
    "path_from_scheduler_config",
    "with_prediction",
    "convert",
    "betas_for_schedule",
    "betas_from_config",
]


def _fp(x: Tensor) -> Tensor:
    """Promote to float32 unless already float64 (used by float64 tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against a (B, ...) tensor."""
    v = v.to(device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def _as_t(t: Tensor | float, like: Tensor) -> Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t


class _PathMaths:
    """Maths shared by every path, written once in terms of alpha(t), sigma(t)."""

    prediction_type: str
    init_noise_sigma: float = 1.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- per-sample helpers ------------------------------------------------------------
    def _ab(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        a, s = self.alpha_sigma(_as_t(t, like))
        return _bcast(a, like), _bcast(s, like)

    def snr_ratio(self, t: Tensor) -> Tensor:
        """sigma/alpha, the inverse square root of the signal-to-noise ratio (monotone in t)."""
        a, s = self.alpha_sigma(t)
        return s / a

    # ---- moves -------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps (also the re-noising move with fresh or predicted eps)."""
        x0, eps = _fp(x0), _fp(eps)
        a, s = self._ab(t, x0)
        return a * x0 + s * eps

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """The noise implied by x_t and a clean estimate: (x_t - alpha x0) / sigma."""
        x_t, x0 = _fp(x_t), _fp(x0)
        a, s = self._ab(t, x_t)
        return (x_t - a * x0) / s.clamp_min(1e-12)

    def ddim_step(self, x_t: Tensor, x0: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
        """Deterministic move from t to t_next keeping the implied noise (DDIM; Euler for flow)."""
        eps = self.eps_from_x0(x_t, x0, t)
        return self.add_noise(x0, eps, t_next)

    def sampler_move(
        self, x_t: Tensor, x0: Tensor, t: Tensor | float, t_next: Tensor | float, renoise: str, noise: Tensor | None
    ) -> Tensor:
        """A few-step sampler's move between evaluations: "ddim" keeps the implied noise
        (`ddim_step`), "fresh" re-noises x0 with `noise` (`add_noise`)."""
        if renoise == "ddim":
            return self.ddim_step(x_t, x0, t, t_next)
        return self.add_noise(x0, noise, t_next)

    def forward_diffuse(self, x_t1: Tensor, t1: Tensor | float, t2: Tensor | float, z: Tensor) -> Tensor:
        """Sample x_{t2} | x_{t1} for a noisier t2 >= t1 (the Gaussian transition of the path):
        x_{t2} = (alpha2/alpha1) x_{t1} + sqrt(sigma2^2 - (alpha2 sigma1 / alpha1)^2) z."""
        x_t1, z = _fp(x_t1), _fp(z)
        a1, s1 = self._ab(t1, x_t1)
        a2, s2 = self._ab(t2, x_t1)
        r = a2 / a1
        var = (s2**2 - (r * s1) ** 2).clamp_min(0.0)
        return r * x_t1 + var.sqrt() * z

    # ---- prediction types --------------------------------------------------------------
    def to_x0_eps(self, x_t: Tensor, out: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Convert a native network output at (x_t, t) to (x0, eps), in float32."""
        x_t, out = _fp(x_t), _fp(out)
        a, s = self._ab(t, x_t)
        p = self.prediction_type
        if p == "epsilon":
            eps = out
            x0 = (x_t - s * eps) / a
        elif p == "v_prediction":  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        elif p == "sample":
            x0 = out
            eps = (x_t - a * x0) / s.clamp_min(1e-12)
        elif p == "flow":  # v = eps - x0 for x_t = (1 - t) x0 + t eps
            x0 = x_t - s * out
            eps = x_t + a * out
        else:  # pragma: no cover - guarded at construction
            raise ValueError(f"unknown prediction_type {p!r}")
        return x0, eps

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """The native network output that corresponds to (x0, eps) at time t."""
        x0, eps = _fp(x0), _fp(eps)
        a, s = self._ab(t, x0)
        p = self.prediction_type
        if p == "epsilon":
            return eps
        if p == "v_prediction":
            return a * eps - s * x0
        if p == "sample":
            return x0
        if p == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction_type {p!r}")  # pragma: no cover

    def x0_from_output(self, x_t: Tensor, out: Tensor, t: Tensor | float) -> Tensor:
        return self.to_x0_eps(x_t, out, t)[0]

    # ---- time ---------------------------------------------------------------------------
    def t_from_ratio(self, ratio: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Inverse of sigma(t)/alpha(t)."""
        raise NotImplementedError

    def timestep(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sampling_times(self, num_steps: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def betas_for_schedule(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """The DDPM beta schedules of diffusers' DDPM/DDIM/LCM schedulers, in float64."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda i: math.cos((i + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(
        f"scheduler config: beta_schedule {beta_schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
    )


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """A DDPM-family scheduler config's betas (its `trained_betas`, else its beta schedule), in
    float64, before any zero-terminal-SNR rescaling."""
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    return betas_for_schedule(
        config.get("beta_schedule", "linear"),
        float(config.get("beta_start", 0.0001)),
        float(config.get("beta_end", 0.02)),
        int(config.get("num_train_timesteps", 1000)),
    )


class VPPath(_PathMaths):
    """DDPM / VP path built from a discrete alphas_cumprod table.

    Index i in 0..N-1 (what the network is fed) sits at t = (i + 1) / N, and t = 0 is clean data
    (alpha = 1, sigma = 0), so DDPM's t=999 is exactly t=1 and DMD2's [999, 749, 499, 249] is
    [1, 0.75, 0.5, 0.25]. Between indices, log-SNR is interpolated linearly (so continuous-time
    methods can query any t); on the first interval [0, 1/N] alpha^2 is interpolated linearly
    down from 1. The network's timestep is clamped to [0, N-1].
    """

    def __init__(
        self,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"scheduler config: prediction_type {prediction_type!r} is not one of "
                "'epsilon', 'v_prediction', 'sample'"
            )
        abar = alphas_cumprod.detach().to(torch.float64).cpu()
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table, got shape {tuple(abar.shape)}")
        self.prediction_type = prediction_type
        self.num_train_timesteps = abar.numel()
        self.alphas_cumprod = abar
        # zero-terminal-SNR tables have abar_{N-1} = 0: keep log-SNR finite there.
        abar_c = abar.clamp(1e-20, 1 - 1e-20)
        self._logsnr = torch.log(abar_c) - torch.log1p(-abar_c)  # decreasing in the index
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], prediction_type: str | None = None) -> VPPath:
        abar = torch.cumprod(1.0 - betas_from_config(config), 0)
        zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        if zero_snr:  # Lin et al. (2024), Algorithm 1, as diffusers does it
            ab_sqrt = abar.sqrt()
            a0, aT = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
            ab_sqrt = (ab_sqrt - aT) * a0 / (a0 - aT)
            abar = ab_sqrt**2
        return cls(abar, prediction_type or config.get("prediction_type", "epsilon"), zero_snr)

    def _tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._logsnr.to(device=device, dtype=dtype),
                self.alphas_cumprod.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def index(self, t: Tensor) -> Tensor:
        """Fractional DDPM index i = t N - 1 (may be negative on the first interval)."""
        return t * self.num_train_timesteps - 1

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(dt)
        if torch.any((t < 0) | (t > 1)):
            raise ValueError(f"t must lie in [0, 1], got range [{t.min().item()}, {t.max().item()}]")
        logsnr, abar = self._tables(t.device, dt)
        n = self.num_train_timesteps
        idx = self.index(t)
        lo = idx.floor().clamp(0, n - 2)
        frac = (idx - lo).clamp(0, 1)
        lo_i = lo.long()
        ls = logsnr[lo_i] * (1 - frac) + logsnr[lo_i + 1] * frac
        a2 = torch.sigmoid(ls)
        # first interval: linear in alpha^2 from 1 (t=0) to abar_0 (t=1/N)
        first = idx < 0
        if first.any():
            w = (t * n).clamp(0, 1)
            a2 = torch.where(first, 1.0 - w * (1.0 - abar[0]), a2)
        # exact table values at the integer indices (no interpolation round-off)
        return a2.sqrt(), (1.0 - a2).clamp_min(0).sqrt()

    def timestep(self, t: Tensor) -> Tensor:
        return self.index(t).clamp(0, self.num_train_timesteps - 1)

    def t_from_timestep(self, timestep: Tensor | float) -> Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(float(timestep))
        return (timestep.double() + 1) / self.num_train_timesteps

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        dt = torch.float64 if ratio.dtype == torch.float64 else torch.float32
        ratio = ratio.to(dt)
        logsnr, abar = self._tables(ratio.device, dt)
        ls = -2 * torch.log(ratio.clamp_min(1e-30))
        # logsnr table is decreasing; search on its negation
        neg = -logsnr
        j = torch.searchsorted(neg.contiguous(), (-ls).contiguous()).clamp(1, neg.numel() - 1)
        l0, l1 = logsnr[j - 1], logsnr[j]
        frac = ((l0 - ls) / (l0 - l1)).clamp(0, 1)
        idx = (j - 1).to(dt) + frac
        t = (idx + 1) / self.num_train_timesteps
        # the first interval (less noise than index 0)
        a2 = torch.sigmoid(ls)
        w = ((1 - a2) / (1 - abar[0])).clamp(0, 1)
        t = torch.where(ls > logsnr[0], w / self.num_train_timesteps, t)
        return t.clamp(0, 1)

    def sampling_times(self, num_steps: int) -> Tensor:
        """The teacher's default schedule: evenly spaced from t=1 ("trailing" spacing) to 0."""
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


class FlowPath(_PathMaths):
    """Rectified-flow path x_t = (1 - t) x0 + t eps (SD3, Flux, SANA); the network predicts
    v = eps - x0 and is fed timestep = t * N (N = num_train_timesteps). `shift` only warps the
    sampling schedule, as in FlowMatchEulerDiscreteScheduler."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, timestep_scale: float | None = None):
        self.prediction_type = "flow"
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        # what the network is fed per unit t; Flux's pipeline divides by 1000 again, which its
        # conditioner handles, so the path stays the same for every flow backbone.
        self.timestep_scale = float(timestep_scale if timestep_scale is not None else num_train_timesteps)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowPath:
        if config.get("use_dynamic_shifting", False):
            # the shift depends on the image size; pipeline_teacher.py resolves it to a number
            shift = float(config.get("resolved_shift", config.get("shift", 1.0)))
        else:
            shift = float(config.get("shift", 1.0))
        return cls(int(config.get("num_train_timesteps", 1000)), shift)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if torch.any((t < 0) | (t > 1)):
            raise ValueError(f"t must lie in [0, 1], got range [{t.min().item()}, {t.max().item()}]")
        return 1.0 - t, t

    def timestep(self, t: Tensor) -> Tensor:
        return t * self.timestep_scale

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        return torch.where(torch.isinf(ratio), torch.ones_like(ratio), ratio / (1.0 + ratio))

    def apply_shift(self, t: Tensor) -> Tensor:
        k = self.shift
        return k * t / (1 + (k - 1) * t)

    def sampling_times(self, num_steps: int) -> Tensor:
        """FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps) with its `shift`, plus t=0."""
        n = self.num_train_timesteps
        # its sigma_min is the shifted 1/N, and set_timesteps shifts the grid once more
        s_min = float(self.apply_shift(torch.tensor(1.0 / n, dtype=torch.float64)))
        import numpy as np

        ts = np.linspace(1.0 * n, s_min * n, num_steps).astype(np.float32) / n
        s = self.apply_shift(torch.from_numpy(ts).double())
        return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


class TrigFlowPath(_PathMaths):
    """TrigFlow (Lu & Song, 2024): x_theta = cos(theta) x0 + sin(theta) sigma_d eps, theta in
    [0, pi/2]. Here t in [0, 1] is theta / (pi/2); `angle(t)` gives theta. The prediction type is
    F with x0 = cos(theta) x_theta - sin(theta) sigma_d F (eq. 7 of the sCM paper)."""

    def __init__(self, sigma_d: float = 0.5):
        self.prediction_type = "trigflow"
        self.sigma_d = float(sigma_d)
        self.init_noise_sigma = float(sigma_d)

    @staticmethod
    def angle(t: Tensor) -> Tensor:
        return t * (math.pi / 2)

    @staticmethod
    def t_from_angle(theta: Tensor | float) -> Tensor:
        if not torch.is_tensor(theta):
            theta = torch.tensor(float(theta), dtype=torch.float64)
        return theta / (math.pi / 2)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if torch.any((t < 0) | (t > 1 + 1e-7)):
            raise ValueError(f"t must lie in [0, 1], got range [{t.min().item()}, {t.max().item()}]")
        th = self.angle(t)
        return torch.cos(th), torch.sin(th) * self.sigma_d

    def timestep(self, t: Tensor) -> Tensor:
        return self.angle(t)

    def t_from_ratio(self, ratio: Tensor) -> Tensor:
        return self.t_from_angle(torch.atan(ratio / self.sigma_d))

    def sampling_times(self, num_steps: int) -> Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    # trigflow prediction: x0 = cos x - sin sd F  (so the 'sigma' in to_x0_eps is sd sin)
    def to_x0_eps(self, x_t, out, t):
        x_t, out = _fp(x_t), _fp(out)
        a, s = self._ab(t, x_t)
        x0 = a * x_t - s * out
        eps = (x_t - a * x0) / s.clamp_min(1e-12)
        return x0, eps

    def from_x0_eps(self, x0, eps, t):
        x0, eps = _fp(x0), _fp(eps)
        a, s = self._ab(t, x0)
        x_t = a * x0 + s * eps
        return (a * x_t - x0) / s.clamp_min(1e-12)


Path = VPPath | FlowPath | TrigFlowPath


def with_prediction(path: Path, prediction_type: str | None) -> Path:
    """The same noise path read with another prediction type (a VP path only: its schedule is
    kept, the network's output is reinterpreted). None or the path's own type returns `path`."""
    if prediction_type is None or prediction_type == path.prediction_type:
        return path
    if not isinstance(path, VPPath):
        raise ValueError(
            f"prediction type {prediction_type!r}: only a VP (DDPM) path can change its "
            f"prediction type; this path is {type(path).__name__} ({path.prediction_type!r})"
        )
    return VPPath(path.alphas_cumprod, prediction_type, path.rescale_betas_zero_snr)


def path_from_scheduler_config(config: Mapping[str, Any]) -> Path:
    """Build the path of a diffusers scheduler config (DDPM/DDIM/LCM/Euler... or FlowMatch*)."""
    cls_name = str(config.get("_class_name", ""))
    # a config built in code has no _class_name: a flow config has a shift and no betas
    flow_keys = "beta_schedule" not in config and ("shift" in config or "use_dynamic_shifting" in config)
    if "FlowMatch" in cls_name or config.get("prediction_type") == "flow" or (not cls_name and flow_keys):
        return FlowPath.from_config(config)
    if "SCM" in cls_name or "TrigFlow" in cls_name:
        return TrigFlowPath(float(config.get("sigma_data", 0.5)))
    return VPPath.from_config(config)


def convert(x: Tensor, t: Tensor | float, src: _PathMaths, dst: _PathMaths) -> tuple[Tensor, Tensor]:
    """Move a noisy sample between paths at equal signal-to-noise ratio.

    x_src / alpha_src = x0 + (sigma/alpha) eps is the same point on every path, so
    t_dst = dst.t_from_ratio(src ratio) and x_dst = x_src * alpha_dst / alpha_src.
    Returns (x_dst, t_dst) with t_dst of shape (B,)."""
    x = _fp(x)
    t = _as_t(t, x)
    a1, s1 = src.alpha_sigma(t)
    t2 = dst.t_from_ratio(s1 / a1)
    a2, _ = dst.alpha_sigma(t2)
    return x * _bcast(a2 / a1, x), t2
