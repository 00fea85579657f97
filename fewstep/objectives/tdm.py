"""TDM: trajectory distribution matching (Luo et al., 2025), data-free few-step distillation.

The student runs a K-step deterministic sampler from pure noise at the first student time
t_K = t_total down to 0, re-noising with its own predicted noise (DDIM; Euler on a flow path):

    times = [t_total * K/K, t_total * (K-1)/K, ..., t_total * 1/K, 0]       # 4 steps, VP: 0.9 .. 0.225, 0

Step k (k = K..1) of that rollout covers the trajectory segment [t_{k-1}, t_k]. Each training
step draws, per sample, a segment k; the student's prediction at x_{t_k} gives (x0_hat, eps_hat),
a deterministic DDIM move to the segment's end x_mid = alpha_mid x0_hat + sigma_mid eps_hat, and a
forward diffusion with fresh noise z to a time t inside the segment:

    x_t = (alpha_t / alpha_mid) x_mid + beta z,     beta = sqrt(sigma_t^2 - (alpha_t sigma_mid / alpha_mid)^2)
        = alpha_t x0_hat + sigma_t m,               m = (alpha_t sigma_mid / alpha_mid eps_hat + beta z) / sigma_t

Fake score ("fake_score" phase, every step): x0-regression on that marginal,
    L_fake = mean_b[min(SNR_t, snr_clamp) w_IS ||x0_fake(x_t, t) - sg(x0_hat)||^2],
    w_IS   = exp(-mean(m^2)/2) / exp(-mean(z^2)/2)       (the importance weight of the mixed noise)
Generator ("generator" phase, every step, 1:1), CFG scale w in the Imagen form:
    target = sg[x0_hat + (x0_c - x0_fake) + (w - 1)(x0_c - x0_u)]
    L_G    = mean_b[pseudo_huber(x0_hat, target, c) / mean_CHW |x0_hat - x0_cfg|],  x0_cfg = x0_c + (w-1)(x0_c - x0_u)

Sampling-steps awareness: segment-separate time ranges. The fake score is trained, and the
teacher and fake are queried, at t in [max(t_min, t_{k-1}), t_k - t_margin] for segment k, so each
step's target is the marginal of its own segment. The ranges of different segments do not overlap,
so t alone tells the fake score which step it is looking at; unlike a step-index input this needs
no new embedding in the backbone, the fake score stays a plain copy (or LoRA) of the teacher for
every backbone family. `separate_segments: false` gives the reference's other variant
(t up to t_total - t_margin for every segment).

Inference is `fewstep.samplers.sample(student, noise, cond, times, renoise="ddim")` with the
`sampling` dict below, starting from the raw noise at t_total as the reference demo does; the
training rollout calls exactly that function (`rollout`), so the two cannot drift apart.

Times follow fewstep's continuous t: the reference's DDPM index i is t = (i+1)/1000, so its
T_tot = 900 student timesteps [899, 674, 449, 224] are t = [0.9, 0.675, 0.45, 0.225]. The same
construction runs on a flow path (x_t = (1-t) x0 + t eps, Euler steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..randomness import SampleDraws
from ..samplers import sample
from . import _maths
from .base import Batch, freeze, phase_loss

__all__ = ["TDMParams", "TDM", "build", "student_times", "rollout"]


@dataclass
class TDMParams:
    num_steps: int = 4  # K: student sampling steps (= trajectory segments)
    t_total: float = 0.9  # first student time (reference T_tot = 900 of 1000 DDPM steps)
    guidance: float = 4.5  # teacher CFG scale w (Imagen form u + w(c - u)) in the generator target
    separate_segments: bool = True  # fake score / teacher times inside each segment (sampling-steps aware)
    t_min: float = 0.02  # lowest time the fake score and teacher are queried at (reference: index 20)
    t_margin: float = 0.01  # queried times stay this far below the segment start t_k (reference: 10 indices)
    snr_clamp: float = 5.0  # fake-score weight min(SNR_t, snr_clamp)
    huber_c: float = 1e-3  # pseudo-Huber constant of the generator loss
    importance_weight: bool = True  # weight the fake loss by w_IS (off: plain min-SNR-weighted regression)

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"objective.{key}={getattr(self, key)!r}: {msg}")

        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1:
            raise bad("num_steps", "needs an integer >= 1")
        if not (0.0 < float(self.t_total) <= 1.0):
            raise bad("t_total", "must lie in (0, 1]")
        if not (math.isfinite(self.guidance) and self.guidance >= 1.0):
            raise bad("guidance", "must be a finite CFG scale >= 1 (1 = conditional teacher, no CFG)")
        if not (0.0 <= self.t_min < 1.0):
            raise bad("t_min", "must lie in [0, 1)")
        if not (0.0 <= self.t_margin < 1.0):
            raise bad("t_margin", "must lie in [0, 1)")
        seg = float(self.t_total) / self.num_steps
        if self.t_min >= seg - self.t_margin:
            raise ValueError(
                f"objective.t_min={self.t_min} and objective.t_margin={self.t_margin} leave no time range in the "
                f"last segment [0, {seg:g}] (objective.t_total={self.t_total} / objective.num_steps={self.num_steps}): "
                "need t_min < t_total / num_steps - t_margin"
            )
        if not self.snr_clamp > 0:
            raise bad("snr_clamp", "must be > 0")
        if not self.huber_c >= 0:
            raise bad("huber_c", "must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TDMParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"objective: unknown key(s) {unknown} for tdm; known keys are {sorted(known)}")
        p = cls(**d)
        p.validate()
        return p


def student_times(num_steps: int, t_total: float = 0.9) -> list[float]:
    """The student's sampling times [t_K, ..., t_1, 0] with t_k = t_total k / K."""
    return [t_total * k / num_steps for k in range(num_steps, 0, -1)] + [0.0]


class _Net:
    """What `sample` needs of a denoiser (a call and `.path`), for a network the entry point may
    have wrapped (DDP / FSDP do not forward attributes)."""

    def __init__(self, net: nn.Module, path):
        self.net, self.path = net, path

    def __call__(self, x_t, t, cond=None, guidance=1.0, output="x0"):
        return self.net(x_t, t, cond, guidance, output=output)


def rollout(student: nn.Module, path, noise: Tensor, cond: Cond | None, times: list[float]) -> tuple[Tensor, Tensor]:
    """The student's deterministic sampler, as inference runs it, keeping its states.

    Returns (xs, x0s), each (K, B, ...): x at times[i] and the student's x0 prediction there.
    It is `fewstep.samplers.sample(..., renoise="ddim")` itself, observed through its callback.
    """
    xs, x0s = [], []

    def keep(i: int, t: float, x: Tensor, x0: Tensor) -> None:
        xs.append(x)
        x0s.append(x0)

    sample(_Net(student, path), noise, cond, times, renoise="ddim", callback=keep)
    return torch.stack(xs), torch.stack(x0s)


def _importance_weight(mixed: Tensor, fresh: Tensor) -> Tensor:
    """TDM's importance weight (B,) of the fake-score sample: the density ratio of the noise that
    x_t actually carries (the student's eps mixed with fresh noise) to fresh noise, per-element
    mean form of the reference, exp(-mean(m^2)/2) / exp(-mean(z^2)/2). TDM-specific."""
    m2 = mixed.float().flatten(1).pow(2).mean(1)
    z2 = fresh.float().flatten(1).pow(2).mean(1)
    return torch.exp(-0.5 * (m2 - z2))


class TDM:
    """Trajectory distribution matching.

    Args:
        student: the few-step generator (a trainable copy of the teacher).
        fake:    the fake score (a trainable copy of the teacher), trained on the student's segments.
        teacher: the frozen teacher.
        params:  `TDMParams`.
    """

    def __init__(self, student: Denoiser, fake: Denoiser, teacher: Denoiser, params: TDMParams, seed: int = 0):
        params.validate()
        self.p = params
        self.seed = int(seed)  # per-sample draws (fewstep.randomness)
        self.path = teacher.path
        freeze(teacher)
        self.nets: dict[str, nn.Module] = {"student": student, "fake": fake, "teacher": teacher}
        self.groups = {"generator": ["student"], "fake_score": ["fake"]}
        # the reference's AdamW settings (a preset's optim.<group> overrides them): beta1 = 0 for
        # both, the generator's gradient norm clipped to 1; its lr (fake lr / 5) is the preset's.
        self.optim = {
            "generator": {"betas": (0.0, 0.95), "weight_decay": 0.01, "grad_clip": 1.0},
            "fake_score": {"betas": (0.0, 0.95), "weight_decay": 0.01},
        }
        self.times = student_times(params.num_steps, params.t_total)
        # the trained grid, and TDM's grid at other step counts (same t_total) for comparisons
        self.sampling = {
            "times": list(self.times),
            "renoise": "ddim",
            "times_by_steps": {str(n): student_times(n, params.t_total) for n in (1, 2, 4)},
        }
        self._cache: tuple[int, int, Tensor, Tensor] | None = None  # (step, id(batch), xs, x0s)

    # ---- the loop ----------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        # 1:1 as in the reference: the fake score first (on the rollout), then the generator.
        return ["fake_score", "generator"]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        return phase_loss("tdm", {"fake_score": self._fake_loss, "generator": self._generator_loss}, phase, batch, step)

    # ---- pieces ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.nets["student"].parameters()).device

    def _rollout(self, batch: Batch, step: int) -> tuple[Tensor, Tensor]:
        """The no-grad student rollout of this step (shared by both phases of one step: the
        student does not change in between)."""
        if self._cache is not None and self._cache[:2] == (step, id(batch)):
            return self._cache[2], self._cache[3]
        if "shape" not in batch:
            raise ValueError("tdm: batch needs 'shape' (B, C, H, W) for the student's noise")
        shape = tuple(batch["shape"])
        # one stream for both phases: the rollout of a step is the same in each
        rng = SampleDraws.for_batch(batch, self.seed, step, "tdm/rollout", self._device(), rows=shape[0])
        noise = rng.normal(*shape[1:])
        xs, x0s = rollout(self.nets["student"], self.path, noise, batch.get("cond"), self.times)
        self._cache = (step, id(batch), xs, x0s)
        return xs, x0s

    def _segments(self, rng: SampleDraws, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sample: rollout index i (state at t_g = times[i]), t_g, t_mid = times[i+1] and a
        query time t ~ U[max(t_min, t_mid), upper]."""
        k = self.p.num_steps
        i = rng.integers(0, k).cpu()
        ts = torch.tensor(self.times, dtype=torch.float32)
        t_g, t_mid = ts[i], ts[i + 1]
        lo = t_mid.clamp_min(self.p.t_min)
        hi = (t_g if self.p.separate_segments else torch.full_like(t_g, self.times[0])) - self.p.t_margin
        t = lo + (hi - lo) * rng.uniform().cpu()
        return i.to(device), t_g.to(device), t_mid.to(device), t.to(device)

    def _segment_point(
        self, x_g: Tensor, x0_hat: Tensor, t_g: Tensor, t_mid: Tensor, t: Tensor, rng: SampleDraws
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x_t on segment (t_mid, t_g) from the student's (no-grad) prediction at x_g; also the
        fresh noise z and the mixed noise m that x_t carries (x_t = alpha_t x0_hat + sigma_t m)."""
        x0_hat = x0_hat.detach()
        x_mid = self.path.ddim_step(x_g, x0_hat, t_g, t_mid)
        z = rng.normal_like(x_mid)
        x_t = self.path.forward_diffuse(x_mid, t_mid, t, z)
        m = self.path.eps_from_x0(x_t, x0_hat, t)
        return x_t, z, m

    def _fake_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        xs, x0s = self._rollout(batch, step)
        b = xs.shape[1]
        rng = SampleDraws.for_batch(batch, self.seed, step, "tdm/fake_score", xs.device, rows=b)
        i, t_g, t_mid, t = self._segments(rng, xs.device)
        ar = torch.arange(b, device=xs.device)
        x_g, x0_hat = xs[i, ar], x0s[i, ar]  # the rollout's own (no-grad) prediction at t_g
        with torch.no_grad():
            x_t, z, m = self._segment_point(x_g, x0_hat, t_g, t_mid, t, rng)
            a, s = self.path.alpha_sigma(t)
            w = _maths.snr(a, s).clamp_max(self.p.snr_clamp)
            w_is = _importance_weight(m, z) if self.p.importance_weight else torch.ones_like(w)
        x0_fake = self.nets["fake"](x_t, t, batch.get("cond"))
        loss = _maths.dsm_loss(x0_fake, x0_hat, weight=w * w_is)
        return loss, {"loss_fake": loss.item(), "w_is": w_is.mean().item()}

    def _generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        xs, _ = self._rollout(batch, step)
        b = xs.shape[1]
        cond = batch.get("cond")
        rng = SampleDraws.for_batch(batch, self.seed, step, "tdm/generator", xs.device, rows=b)
        i, t_g, t_mid, t = self._segments(rng, xs.device)
        x_g = xs[i, torch.arange(b, device=xs.device)]
        x0_hat = self.nets["student"](x_g, t_g, cond)
        with torch.no_grad():
            x_t, _, _ = self._segment_point(x_g, x0_hat, t_g, t_mid, t, rng)
            if self.p.guidance == 1.0:
                x0_c = self.nets["teacher"](x_t, t, cond)
                ca = torch.zeros_like(x0_c)
            else:
                x0_c, x0_u = self.nets["teacher"](x_t, t, cond, output="cond_uncond")
                ca = _maths.cfg_augmentation(x0_c, x0_u, self.p.guidance)
            x0_fake = self.nets["fake"](x_t, t, cond)
            dm = x0_c - x0_fake
            target = torch.nan_to_num(x0_hat.detach() + dm + ca)
            # mean_CHW |x0_hat - x0_cfg|: the pseudo-Huber distance with c = 0
            norm = _maths.pseudo_huber(x0_hat.detach(), x0_c + ca, c=0.0).clamp_min(1e-8)
        loss = (_maths.pseudo_huber(x0_hat, target, self.p.huber_c) / norm).mean()
        return loss, {
            "loss_gen": loss.item(),
            "dm_norm": dm.flatten(1).norm(dim=1).mean().item(),
            "ca_norm": ca.flatten(1).norm(dim=1).mean().item(),
            "x0_cfg_dist": norm.mean().item(),
        }


def build(params: TDMParams | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> TDM:
    """The registry's builder: student and fake score from `ctx.make_student` / `ctx.make_copy`."""
    if not isinstance(params, TDMParams):
        params = TDMParams.from_dict(params)
    params.validate()
    student = ctx.make_student(teacher)
    fake = ctx.make_copy(teacher)
    return TDM(student, fake, teacher, params, seed=int(getattr(ctx, "seed", 0)))
