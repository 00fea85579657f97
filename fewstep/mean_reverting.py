"""The mean-reverting SDE of IR-SDE / IR-CM (image restoration): a noise path toward the degraded
image rather than toward pure noise, and its map onto the Gaussian paths of `fewstep.paths`."""

from __future__ import annotations

import torch
from torch import Tensor

from .paths import _as_t, _bcast, _fp, _PathMaths

__all__ = ["MeanRevertingPath"]


class MeanRevertingPath:
    """The mean-reverting SDE of IR-SDE / IR-CM, toward a degraded image mu:

        dx = theta(t) (mu - x) dt + g(t) dW,    g(t)^2 = 2 lam^2 theta(t)   (IR-SDE, Luo et al. 2023)

    with theta(t) = theta_min + (theta_max - theta_min) t, so bar_theta(t) = int_0^t theta =
    theta_min t + (theta_max - theta_min) t^2 / 2. Its marginal given the clean x0 is Gaussian:

        x_t = mu + (x0 - mu) a(t) + s(t) eps,   a = exp(-bar_theta),  s = lam sqrt(1 - a^2)

    (mean reverts from x0 to mu; the variance rises to the stationary lam^2). With mu known,
    x_t - (1 - a) mu = a x0 + s eps is a Gaussian path of x0 with signal a and noise s, so a
    state of this SDE is, at equal signal-to-noise ratio, a state of any noise path of x0
    (`to_path`): this is how a diffusion teacher conditioned on mu is read along the SDE.
    Time t in [0, 1]; t = 1 is (up to a(1) = exp(-bar_theta(1))) the stationary N(mu, lam^2).
    """

    def __init__(self, theta_min: float = 0.1, theta_max: float = 20.0, lam: float = 1.0):
        if not 0 <= theta_min <= theta_max or theta_max <= 0:
            raise ValueError(
                f"MeanRevertingPath: need 0 <= theta_min <= theta_max, theta_max > 0; got {theta_min}, {theta_max}"
            )
        if not lam > 0:
            raise ValueError(f"MeanRevertingPath: lam must be > 0, got {lam}")
        self.theta_min, self.theta_max, self.lam = float(theta_min), float(theta_max), float(lam)

    def theta(self, t: Tensor) -> Tensor:
        return self.theta_min + (self.theta_max - self.theta_min) * t

    def bar_theta(self, t: Tensor) -> Tensor:
        return self.theta_min * t + 0.5 * (self.theta_max - self.theta_min) * t * t

    def a_s(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a(t), s(t)) broadcast to `like`, float32 (float64 for float64 inputs)."""
        tt = _as_t(t, like)
        tt = tt.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
        if torch.any((tt < 0) | (tt > 1)):
            raise ValueError(f"t must lie in [0, 1], got range [{tt.min().item()}, {tt.max().item()}]")
        a = torch.exp(-self.bar_theta(tt))
        s = self.lam * (1 - a * a).clamp_min(0).sqrt()
        return _bcast(a, like), _bcast(s, like)

    def marginal(self, x0: Tensor, mu: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """A draw of x_t | x0 (closed form)."""
        x0, mu, eps = _fp(x0), _fp(mu), _fp(eps)
        a, s = self.a_s(t, x0)
        return mu + (x0 - mu) * a + s * eps

    def mean_std(self, x0: Tensor, mu: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        a, s = self.a_s(t, _fp(x0))
        return mu + (x0 - mu) * a, s.expand_as(x0)

    def step(self, x_t: Tensor, x0: Tensor, mu: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
        """The deterministic move from t to t_next that keeps the noise implied by (x_t, x0):
        the probability-flow ODE's exact step when x0 is the ODE's own clean estimate (DDIM in
        this SDE's coordinates). t_next = 0 returns x0."""
        x_t, x0, mu = _fp(x_t), _fp(x0), _fp(mu)
        a, s = self.a_s(t, x_t)
        a2, s2 = self.a_s(t_next, x_t)
        eps = (x_t - mu - (x0 - mu) * a) / s.clamp_min(1e-12)
        return mu + (x0 - mu) * a2 + s2 * eps

    def to_path(self, x_t: Tensor, mu: Tensor, t: Tensor | float, dst: _PathMaths) -> tuple[Tensor, Tensor]:
        """(x_dst, t_dst): the state of path `dst` at the same signal-to-noise ratio, so that
        x_dst = alpha_dst x0 + sigma_dst eps holds with the same x0 and eps. t_dst is (B,)."""
        x_t, mu = _fp(x_t), _fp(mu)
        a, s = self.a_s(t, x_t)
        b = x_t.shape[0]
        a_b, s_b = a.reshape(b, -1)[:, 0], s.reshape(b, -1)[:, 0]
        t_dst = dst.t_from_ratio(s_b / a_b)
        a_dst, s_dst = dst.alpha_sigma(t_dst)
        # a_dst / a = s_dst / s at equal ratio; the norms' ratio is the same number and stays
        # right where dst's table ends before this path's ratio does (t near 1)
        scale = (a_dst**2 + s_dst**2).sqrt() / (a_b**2 + s_b**2).sqrt()
        return (x_t - (1 - a) * mu) * _bcast(scale, x_t), t_dst
