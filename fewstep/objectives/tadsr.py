"""TAD-SR: one-step restoration by time-aware distillation (outline in ALGORITHMS.md sec. 17;
the loss below follows the authors' released training code, read to understand it).

The student restores in one step from pure noise on its own path, conditioned on the degraded
image mu = cond["image"]: x_hat = student(z, t=1, cond). The teacher's deterministic multi-step
output from the same noise, x_ref = DDIM_teacher(z, teacher_steps, cond) (no gradient, drawn
fresh each step), is the reference of the first two terms:

- regression (the SinSR-style distillation term): L_reg = mean (x_hat - x_ref)^2;
- high-frequency score distillation after a small perturbation, with the teacher's output as
  the reference: t ~ U[sd_t_min, sd_t_max] (low noise), the same eps for both,
      x_s = alpha x_hat + sigma eps,   x_r = alpha x_ref + sigma eps,
      grad = (alpha / sigma) [(x_hat - x_ref) - (D(x_s) - D(x_r))],   L_sd = surrogate(x_hat, grad)
  (D the teacher's x0 prediction; the difference of the two implied noises, eps_hat(x_s) -
  eps_hat(x_r), written in x0 terms). Subtracting the reference removes the bias of plain score
  distillation, and what remains is the part of the student-teacher mismatch that the teacher's
  denoiser does not reproduce at that low noise: the high frequencies;
- a latent adversarial loss with a time-aware discriminator: both the real target x0 and x_hat
  are noised at t ~ U[gan_t_min, gan_t_max], the frozen teacher's features of the noised input
  (the family's GAN tap, `Family.gan_tap`: the UNet mid-block) go to a head that also receives t
  (a constant channel), so it judges real against generated at several noise levels:
      L_G = softplus(-D(feat(x_hat_t), t)),   L_D = softplus(D(feat(sg x_hat_t), t)) + softplus(-D(feat(x0_t), t)).

L = regression_weight L_reg + sd_weight L_sd + gan_weight L_G. `sd_form: sds` is a named variant
(this project's first reading): no reference, grad = x_hat - sg D(x_s) in x0 units; with
`regression_weight: 0` as well it needs no teacher rollout.

Two optimizer groups: "generator" (the student) and "disc" (the head), updated each step in the
order disc, generator. The student's sampling is one step from t = 1 (`LDMSuperResolutionPipeline`
with `num_inference_steps=1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..samplers import sample
from . import _maths
from .base import Batch, GlobalBatchDraws, require_image_conditioned
from .gan import DiscriminatorHead, FeatureTap, discriminator_gan_loss, feature_layer, generator_gan_loss

__all__ = ["TADSRConfig", "TADSR", "TimeAwareHead", "build"]


@dataclass
class TADSRConfig:
    sd_t_min: float = 0.02  # score distillation: the small perturbation's time range
    sd_t_max: float = 0.3
    sd_weight: float = 1.0
    sd_form: str = "reference"  # "reference": the teacher's output as the reference (the paper's);
    #   "sds": plain score distillation in x0 units (a named variant)
    regression_weight: float = 1.0  # the student's output against the teacher's multi-step output
    teacher_steps: int = 50  # DDIM steps of the teacher's reference output (deterministic, from z)
    gan: bool = True  # the latent adversarial loss (false: score distillation alone)
    gan_weight: float = 0.02  # weight of L_G in the generator's loss (the authors' 0.02)
    gan_t_min: float = 0.02  # the discriminator's time range
    gan_t_max: float = 0.5
    gan_width: int = 64  # channels of the head's convolutions
    gan_feature_layer: str | None = None  # a dotted module path in the teacher (default: the family's tap)

    def validate(self) -> None:
        for lo, hi, name in ((self.sd_t_min, self.sd_t_max, "sd_t"), (self.gan_t_min, self.gan_t_max, "gan_t")):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"objective.{name}_min={lo}, objective.{name}_max={hi}: need 0 < min <= max <= 1")
        if min(self.sd_weight, self.gan_weight, self.regression_weight) < 0:
            raise ValueError("objective.sd_weight, regression_weight and gan_weight must be >= 0")
        if self.sd_form not in ("reference", "sds"):
            raise ValueError(f"objective.sd_form={self.sd_form!r}: 'reference' (the paper's) or 'sds'")
        if int(self.teacher_steps) < 1:
            raise ValueError(f"objective.teacher_steps={self.teacher_steps}: must be >= 1")
        if self.gan_width < 1:
            raise ValueError(f"objective.gan_width={self.gan_width}: must be >= 1")


class TimeAwareHead(nn.Module):
    """Teacher features and the time t -> one logit. The features are pooled to 4x4 and t joins
    them as a constant channel in the first convolution, before any normalisation (a GroupNorm
    over [features, t] would normalise the constant channel away); then two stride-2 4x4
    convolutions down to one logit."""

    def __init__(self, channels: int, latent_hw: tuple[int, int], width: int):
        super().__init__()
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.inp = nn.Conv2d(channels + 1, width, 3, padding=1)
        g = math.gcd(8, width)  # groups of at least width / 8 channels
        self.net = nn.Sequential(  # 4x4 -> 2x2 -> 1x1; no norm at 1x1, where it would erase the logit's input
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.GroupNorm(g, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, features: Tensor, t: Tensor) -> Tensor:
        grid = DiscriminatorHead.grid(self, features.float())  # tokens -> (B, D, h, w), as DMD2's head lays them
        x = F.adaptive_avg_pool2d(self.norm(grid), 4)
        tmap = t.float().reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.net(self.inp(torch.cat([x, tmap], 1))).flatten(1).mean(1)


class TADSR:
    def __init__(
        self,
        student: Denoiser,
        teacher: Denoiser,
        head: TimeAwareHead,
        layer: nn.Module,
        params: TADSRConfig,
        seed: int = 0,
    ):
        self.p = params
        self.seed = int(seed)
        self.nets = {"student": student, "teacher": teacher, "disc": head}
        self.groups = {"generator": ["student"], "disc": ["disc"]}
        self.tap = FeatureTap(layer)
        self.sampling = {"times": [1.0, 0.0], "renoise": "ddim"}

    def phases(self, step: int) -> list[str]:
        return ["disc", "generator"] if self.p.gan else ["generator"]

    def _draws(self, batch: Batch, step: int, shape, device):
        draws = GlobalBatchDraws(batch, self.seed, step, rows=shape[0], device=device)
        z, eps, eps_d = (draws.normal(*shape[1:]) for _ in range(3))
        return z, eps, eps_d, draws.uniform(), draws.uniform()

    def _logits(self, x0: Tensor, t: Tensor, eps: Tensor, cond) -> Tensor:
        teacher = self.nets["teacher"]
        x_t = teacher.path.add_noise(x0, eps, t)
        with self.tap.capture():
            teacher(x_t, t, cond, output="native")
        return self.nets["disc"](self.tap.take(), t)

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.get("cond")
        x0 = batch.get("x0")
        if cond is None or cond.get("image") is None:
            raise ValueError("tadsr needs the degraded image in cond['image'] (teacher digits-restore)")
        shape = tuple(batch["shape"])
        device = cond["image"].device
        z, eps, eps_d, u_sd, u_d = self._draws(batch, step, shape, device)
        t_d = self.p.gan_t_min + (self.p.gan_t_max - self.p.gan_t_min) * u_d
        student = self.nets["student"]
        if phase == "disc":
            if x0 is None:
                raise ValueError("tadsr's discriminator needs real targets: data.real_data=true")
            with torch.no_grad():
                x_hat = student(z, 1.0, cond)
            lf = self._logits(x_hat, t_d, eps_d, cond)
            lr = self._logits(x0.float(), t_d, eps_d, cond)
            loss = discriminator_gan_loss(lf, lr)
            return loss, {
                "disc": float(loss.detach()),
                "d_real": float(lr.detach().mean()),
                "d_fake": float(lf.detach().mean()),
            }
        if phase != "generator":
            raise ValueError(f"tadsr phases are 'disc' and 'generator'; got {phase!r}")
        x_hat = student(z, 1.0, cond)
        teacher = self.nets["teacher"]
        t_sd = self.p.sd_t_min + (self.p.sd_t_max - self.p.sd_t_min) * u_sd
        loss, logs = x_hat.new_zeros(()), {}
        x_ref = None
        if self.p.regression_weight > 0 or self.p.sd_form == "reference":
            times = teacher.path.sampling_times(int(self.p.teacher_steps))
            x_ref = sample(teacher, z, cond, times, start=z)  # no gradient; deterministic DDIM
        if self.p.regression_weight > 0:
            l_reg = ((x_hat.float() - x_ref) ** 2).mean()
            loss = loss + self.p.regression_weight * l_reg
            logs["regression"] = float(l_reg.detach())
        if self.p.sd_weight > 0:
            with torch.no_grad():
                x_s = teacher.path.add_noise(x_hat.detach(), eps, t_sd)
                d_s = teacher(x_s, t_sd, cond)
                if self.p.sd_form == "reference":  # the difference of the two implied noises
                    x_r = teacher.path.add_noise(x_ref, eps, t_sd)
                    d_r = teacher(x_r, t_sd, cond)
                    grad = teacher.path.eps_from_x0(x_s, d_s, t_sd) - teacher.path.eps_from_x0(x_r, d_r, t_sd)
                else:
                    grad = x_hat.detach() - d_s
            loss = loss + self.p.sd_weight * _maths.surrogate_loss(x_hat, grad)
            logs["sd_grad"] = float(grad.flatten(1).norm(dim=1).mean())
        if self.p.gan:
            l_g = generator_gan_loss(self._logits(x_hat, t_d, eps_d, cond))
            loss = loss + self.p.gan_weight * l_g
            logs["gan_g"] = float(l_g.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs


def build(params: TADSRConfig | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> TADSR:
    if not isinstance(params, TADSRConfig):
        params = TADSRConfig(**(params or {}))
    params.validate()
    require_image_conditioned("tadsr", ctx)
    if params.gan and not getattr(ctx, "has_real_data", True):
        raise ValueError("objective tadsr with gan=true needs real targets: set data.real_data=true")
    layer, channels = feature_layer(teacher.backbone, params.gan_feature_layer)
    head = TimeAwareHead(channels, tuple(ctx.latent_shape[1:]), params.gan_width).to(ctx.device)
    return TADSR(ctx.make_student(teacher), teacher, head, layer, params, seed=getattr(ctx, "seed", 0))
