"""Analytic teachers and tiny models for tests and examples.

`GaussianMixtureBackbone` is an exact denoiser: for data drawn from a mixture of isotropic
Gaussians, E[x0 | x_t] is closed-form, so a test can compare against ground truth that no
network can fake. It behaves like a diffusers backbone (native output of its path's prediction
type, fed the native timestep), so it goes through the same `Denoiser` adapter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conditioning import ClassConditioner
from .denoiser import Denoiser
from .paths import FlowPath, Path, TrigFlowPath, VPPath


class GaussianMixtureBackbone(nn.Module):
    """Mixture of K isotropic Gaussians N(mu_k, std^2 I) in R^{C x H x W}.

    Component k belongs to class `classes[k]`; label == null_class (or no label) uses the full
    mixture. The module has one dummy parameter so it can be copied and optimised like a
    network, but its output never depends on it unless `learnable=True`, in which case the
    means are parameters (a trainable "fake score" for tests)."""

    def __init__(
        self,
        means: Tensor,
        std: float,
        path: Path,
        classes: Tensor | None = None,
        weights: Tensor | None = None,
        null_class: int = -1,
        learnable: bool = False,
    ):
        super().__init__()
        k = means.shape[0]
        self.shape = tuple(means.shape[1:])
        self.means = nn.Parameter(
            means.clone() if means.is_floating_point() else means.float(), requires_grad=learnable
        )
        self.std = float(std)
        self.path = path
        self.register_buffer("classes", classes if classes is not None else torch.zeros(k, dtype=torch.long))
        self.register_buffer("log_w", torch.log(weights if weights is not None else torch.full((k,), 1.0 / k)))
        self.null_class = null_class

    def t_of(self, timestep: Tensor) -> Tensor:
        p = self.path
        if isinstance(p, VPPath):
            return ((timestep.double() + 1) / p.num_train_timesteps).clamp(0, 1)
        if isinstance(p, FlowPath):
            return (timestep.double() / p.timestep_scale).clamp(0, 1)
        return TrigFlowPath.t_from_angle(timestep.double()).clamp(0, 1)

    def posterior_mean(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        a, s = self.path.alpha_sigma(t.to(torch.float64))
        b = x.shape[0]
        a = a.view(b, 1).to(x.dtype)
        s = s.view(b, 1).to(x.dtype)
        xf = x.reshape(b, -1)
        mu = self.means.reshape(self.means.shape[0], -1).to(x.dtype)  # (K, D)
        var = a**2 * self.std**2 + s**2  # (B, 1)
        d = xf.shape[1]
        diff = xf[:, None, :] - a[:, :, None] * mu[None]  # (B, K, D)
        logp = -0.5 * (diff**2).sum(-1) / var - 0.5 * d * torch.log(var) + self.log_w.to(x.dtype)[None]
        if labels is not None:
            mask = (self.classes[None, :] == labels[:, None]) | (labels[:, None] == self.null_class)
            logp = logp.masked_fill(~mask, float("-inf"))
        r = torch.softmax(logp, dim=1)  # (B, K)
        gain = a * self.std**2 / var  # (B, 1)
        x0_k = mu[None] + gain[:, :, None] * diff  # (B, K, D)
        return (r[:, :, None] * x0_k).sum(1).reshape(x.shape)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None):
        t = self.t_of(timestep)
        x64 = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        x0 = self.posterior_mean(x64, t, class_labels)
        eps = self.path.eps_from_x0(x64, x0, t.to(x64.dtype))
        out = self.path.from_x0_eps(x0, eps, t.to(x64.dtype))
        return _Out(out.to(x.dtype))

    def sample_data(self, n: int, labels: Tensor | None = None, generator=None) -> Tensor:
        """Exact samples of the mixture (conditioned on labels when given)."""
        if labels is None:
            comp = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        else:
            w = self.log_w.exp()[None].repeat(n, 1)
            w = w * (self.classes[None, :] == labels[:, None])
            comp = torch.multinomial(w, 1, generator=generator)[:, 0]
        z = torch.randn((n, *self.shape), generator=generator)
        return self.means.detach()[comp] + self.std * z


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _GMMConditioner(ClassConditioner):
    def call(self, backbone, x, timestep, cond):
        labels = None if cond is None else cond.get("class_labels")
        return backbone(x, timestep, class_labels=labels).sample


def gmm_denoiser(
    path: Path,
    means: Tensor,
    std: float = 0.1,
    classes: Tensor | None = None,
    null_class: int = -1,
    learnable: bool = False,
) -> Denoiser:
    """A Denoiser around an exact Gaussian-mixture posterior mean on `path`."""
    bb = GaussianMixtureBackbone(means, std, path, classes, null_class=null_class, learnable=learnable)
    return Denoiser(bb, path, _GMMConditioner(null_class=null_class, kind="gmm"))
