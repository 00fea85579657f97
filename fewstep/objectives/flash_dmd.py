"""Flash-DMD: timestep-aware distribution matching for a multi-step student, then joint reward
fine-tuning with the distillation losses kept as a regulariser.

(No official code exists; this follows the paper's outline, ALGORITHMS.md section 4.)

Built on DMD2 (`dmd.DMDObjective`, composed, not copied): the same student, fake score, GAN head
on the fake score's bottleneck, backward simulation over the student's times with fresh noise,
two-time-scale schedule and fake-score / discriminator loss. What changes is the generator loss,
chosen by the student step k that backward simulation lands on (the same on every process):

    k <  dm_steps  (high noise: global structure)   L = L_DM               (DMD's DM term only)
    k >= dm_steps  (low noise: texture)              L = lambda_G L_adv     (the GAN term only)

Reward phase (step >= reward_start): the student is also trained to raise a differentiable reward
of its x0 prediction (decoded to images when the reward reads images),

    L = [L_DM or lambda_G L_adv] - reward_weight * mean reward(x_hat, cond)

with the distillation term kept as the regulariser against reward hacking;
`reward_keep_distillation: false` drops it (and the fake-score updates) for the contrast run.
The reward and the distillation loss are logged side by side ("reward", "loss_distill").
A reward that returns a non-finite value stops the run with an error naming the reward.

Where the adversarial term looks (`gan_space`): "latent" (the default) is DMD2's head on a
denoiser's features of the re-noised latents; "pixel" is the paper's Pixel-GAN: the student's x0
is decoded to images and judged, clean, by heads on a frozen image backbone's feature maps
(`pixel_gan.py`; the paper's backbone is a segmentation model, here the teacher's own VAE encoder
by default, or any `module.path:factory`). Its heads train with the fake score; the DMD2 part then
builds no latent head.

Two named options bring the paper's stabilised score estimator closer, as second-hand accounts of
it describe it (the paper's text was not available here): `gan_features: teacher` puts the
adversarial head on the frozen teacher's features, a discriminator apart from the fake score, which
then learns its denoising loss alone (DMD2's head on the fake score is the default);
`fake_score_pull: lambda` moves the fake score's weights toward the student's after every generator
update, fake <- lambda fake + (1 - lambda) student (off by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ._maths import input_gradient_only, surrogate_loss
from .base import Batch, ema_toward, phase_loss, unwrap
from .dmd import DMDObjective, DMDParams
from .dmd_build import build_dmd
from .gan import discriminator_gan_loss, generator_gan_loss
from .pixel_gan import PixelDiscriminator, make_pixel_backbone
from .rewards import differentiable_decode, make_reward

__all__ = ["FlashDMDParams", "FlashDMDObjective", "build"]

# the keys Flash-DMD passes on to its DMD2 part unchanged (fewstep.objectives.dmd_params.DMDParams)
_SHARED_WITH_DMD2 = (
    "num_steps student_times guidance dm_t_min dm_t_max fake_t_min fake_target fake_updates_per_generator "
    "gan_generator_weight gan_disc_weight gan_block gan_feature_layer gan_head_width gan_features gan_t_min gan_t_max"
).split()


@dataclass
class FlashDMDParams:
    num_steps: int = 4  # student sampling steps
    student_times: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    # student input times, one per step, decreasing in (0, 1]
    dm_steps: int = 2  # the boundary: the first dm_steps (highest-noise) student steps get
    #   the DM loss only, the later ones the adversarial loss only
    guidance: float = 4.0  # CFG scale of the real score (Imagen form)
    dm_t_min: float = 0.02  # DM re-noising time range (DMD2)
    dm_t_max: float = 0.98
    fake_t_min: float = 0.001  # fake-score denoising time range [fake_t_min, 1]
    fake_target: str = "native"  # "native" or "x0" (as DMD2)
    fake_updates_per_generator: int = 5  # DMD2's two time-scale rule
    gan_generator_weight: float = 3e-3  # lambda_G of the adversarial loss at the low-noise steps
    gan_disc_weight: float = 1e-2  # lambda_D of the discriminator loss (fake_score group)
    gan_block: int | None = None  # transformer block feeding the head (None: the middle one)
    gan_feature_layer: str | None = None  # dotted module path feeding the head (DMD2's key; None: the family's tap)
    gan_head_width: int = 128
    gan_features: str = "fake_score"  # whose features the head reads: "fake_score" (DMD2's head on the
    #   fake score) or "teacher" (a head on the frozen teacher's features: a discriminator apart from
    #   the fake score, which then learns its denoising loss only)
    fake_score_pull: float = 0.0  # lambda in [0, 1): after every generator update the fake score's
    #   weights move toward the student's, fake <- lambda fake + (1 - lambda) student (0: off)
    gan_t_min: float = 0.001  # noise levels the head sees
    gan_t_max: float = 1.0
    gan_space: str = "latent"  # where the low-noise steps' adversarial term judges the student: "latent"
    #   (DMD2's head on a denoiser's features of the re-noised latents, `gan_features`) or "pixel" (the
    #   paper's Pixel-GAN: the decoded x0, clean, through a frozen image backbone with a head per
    #   feature map; `pixel_gan.py`)
    pixel_backbone: str = "vae_encoder"  # gan_space "pixel": the frozen backbone, "vae_encoder" (the
    #   teacher's own) or "module.path:factory"
    pixel_head_width: int = 64  # channels of each pixel head
    disc_lr_scale: float = 1.0  # the discriminator heads' learning rate (latent or pixel) as a multiple of
    #   the fake-score group's (1: one rate for both, as DMD2)
    # ---- reward phase ---------------------------------------------------------------------
    reward: str | None = None  # "digits_class", "clip", "module.path:factory", or null (no phase)
    reward_model: str | None = None  # the reward's weights / model folder (None: its default)
    reward_start: int | None = None  # first step of the reward phase (needs `reward`)
    reward_weight: float = 1.0  # weight of -mean(reward) in the generator loss
    reward_keep_distillation: bool = True  # keep the distillation losses as a regulariser (false: contrast run)

    def validate(self) -> None:
        n = int(self.num_steps)
        ts = [float(t) for t in self.student_times]
        if n < 2:
            raise ValueError(f"objective.num_steps={n}: Flash-DMD splits a multi-step student's steps (>= 2)")
        if len(ts) != n:
            raise ValueError(f"objective.num_steps={n} needs objective.student_times with {n} entries, got {ts}")
        if any(not 0 < t <= 1 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"objective.student_times must be strictly decreasing in (0, 1], got {ts}")
        if not 1 <= int(self.dm_steps) < n:
            raise ValueError(
                f"objective.dm_steps={self.dm_steps} must lie in 1..{n - 1} (some steps get the DM "
                "loss, the rest the adversarial loss)"
            )
        if (self.reward is None) != (self.reward_start is None):
            raise ValueError(
                "objective.reward and objective.reward_start go together (both set for a reward phase, "
                f"both null without one); got reward={self.reward!r}, reward_start={self.reward_start!r}"
            )
        if self.reward_start is not None and int(self.reward_start) < 0:
            raise ValueError(f"objective.reward_start={self.reward_start} must be >= 0")
        if self.reward_weight < 0:
            raise ValueError(f"objective.reward_weight={self.reward_weight} must be >= 0")
        if not 0.0 <= float(self.fake_score_pull) < 1.0:
            raise ValueError(
                f"objective.fake_score_pull={self.fake_score_pull} must lie in [0, 1) (0: off; lambda of "
                "fake <- lambda fake + (1 - lambda) student after each generator update)"
            )
        if self.gan_space not in ("latent", "pixel"):
            raise ValueError(f"objective.gan_space={self.gan_space!r} must be 'latent' or 'pixel'")
        if not self.disc_lr_scale > 0:
            raise ValueError(f"objective.disc_lr_scale={self.disc_lr_scale} must be > 0")
        if int(self.pixel_head_width) < 1:
            raise ValueError(f"objective.pixel_head_width={self.pixel_head_width} must be >= 1")
        if self.gan_generator_weight <= 0:
            raise ValueError(
                f"objective.gan_generator_weight={self.gan_generator_weight} must be > 0 (the "
                "low-noise steps have no other loss)"
            )
        self.dmd_params().validate()

    def dmd_params(self) -> DMDParams:
        """The DMD2 settings of the composed objective (no regression; its latent GAN head unless the
        adversarial term is in pixel space, where Flash-DMD trains its own discriminator)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(DMDParams) if f.name in _SHARED_WITH_DMD2}
        shared["num_steps"], shared["student_times"] = int(self.num_steps), [float(t) for t in self.student_times]
        return DMDParams(variant="dmd2", gan=self.gan_space == "latent", regression_weight=0.0, **shared)


class FlashDMDObjective:
    """Flash-DMD around a DMD2 objective with its GAN head. nets and groups are DMD2's
    (student | fake, disc); see the module docstring for the losses.

    Args:
        params: FlashDMDParams (validated).
        dmd:    the composed DMDObjective (variant dmd2, gan on) holding the networks.
        reward: a reward callable (see `rewards`), or None without a reward phase.
        decode: latents -> images in [-1, 1], differentiable; needed when reward.input == "images".
    """

    def __init__(
        self,
        params: FlashDMDParams,
        dmd: DMDObjective,
        reward: Callable[[Tensor, Any], Tensor] | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        pixel: tuple[nn.Module, PixelDiscriminator] | None = None,
    ):
        params.validate()
        if (params.gan_space == "pixel") != (pixel is not None):
            raise ValueError("objective.gan_space='pixel' goes with a (backbone, PixelDiscriminator) pair, and only it")
        if params.reward_start is not None and reward is None:
            raise ValueError("objective.reward_start is set but no reward was given")
        if reward is not None and getattr(reward, "input", "latents") == "images" and decode is None:
            raise ValueError(
                f"objective.reward={_name(reward)!r} reads images, but the teacher has no VAE decoder "
                "(give a reward on latents)"
            )
        self.p = params
        self.dm = dmd
        self.nets = dmd.nets
        self.groups = dmd.groups
        self.sampling = dmd.sampling
        self.reward = reward
        self.decode = decode
        if isinstance(reward, nn.Module):  # held outside `nets`: frozen, never saved, never trained
            reward.requires_grad_(False)
        self.pixel_backbone = None
        if pixel is not None:  # the backbone, like the reward, outside `nets`; the heads train with the fake score
            self.pixel_backbone, self.nets["pixel_disc"] = pixel
            self.groups["fake_score"].append("pixel_disc")

    @property
    def lr_scales(self) -> dict[str, float]:
        """{role: factor} of the training loop's optimizer groups: the discriminator heads at
        disc_lr_scale x the fake-score group's learning rate."""
        s = float(self.p.disc_lr_scale)
        return {} if s == 1.0 else {r: s for r in ("disc", "pixel_disc") if r in self.nets}

    # ---- schedule -----------------------------------------------------------------------
    def reward_active(self, step: int) -> bool:
        return self.reward is not None and self.p.reward_start is not None and step >= int(self.p.reward_start)

    def phases(self, step: int) -> list[str]:
        ph = self.dm.phases(step)
        if self.reward_active(step) and not self.p.reward_keep_distillation:
            ph = [g for g in ph if g != "fake_score"]  # the contrast run: the fake score plays no part
        return ph

    def is_dm_step(self, step: int) -> bool:
        """Whether the student step drawn at `step` is a high-noise one (DM loss) or not (adversarial)."""
        return self.dm.sim_steps(step) < int(self.p.dm_steps)

    def after_step(self, phase: str, step: int) -> None:
        """With fake_score_pull > 0, after each generator update: fake <- lambda fake + (1 - lambda)
        student over the parameters the student trains (matched by name)."""
        if phase == "generator" and self.p.fake_score_pull > 0:
            ema_toward(self.nets["fake"], self.nets["student"], float(self.p.fake_score_pull), trainable_only=True)

    # ---- losses -------------------------------------------------------------------------
    def _distillation(self, x_hat: Tensor, cond, step: int, rng) -> tuple[Tensor, dict[str, float]]:
        dm = self.dm
        if self.is_dm_step(step):
            g = dm._dm_grad(x_hat, cond, self.p.guidance, rng)
            return surrogate_loss(x_hat, g), {"dm_grad_norm": g.flatten(1).norm(dim=1).mean().item(), "dm_step": 1.0}
        if self.pixel_backbone is not None:
            term, adv = self._pixel_generator(x_hat)
        else:
            term, adv = dm._gan_generator(x_hat, cond, rng)  # the fake score and head frozen: no weight gradients
        return self.p.gan_generator_weight * term, {"gan_g": adv.item(), "dm_step": 0.0}

    # ---- the pixel discriminator (gan_space "pixel") ----------------------------------------
    def _images(self, x: Tensor) -> Tensor:
        return self.decode(x) if self.decode is not None else x

    def _pixel_logits(self, x: Tensor, disc: nn.Module) -> Tensor:
        return disc(self.pixel_backbone(self._images(x)))

    def _pixel_generator(self, x_hat: Tensor) -> tuple[Tensor, Tensor]:
        """softplus(-D(decode(x_hat))) with the backbone and heads frozen: (term, value), the term's
        gradient reaching the student only (no weight gradients computed for the heads)."""
        disc = unwrap(self.nets["pixel_disc"])

        def adv(leaf: Tensor) -> tuple[Tensor, None]:
            return generator_gan_loss(self._pixel_logits(leaf, disc)), None

        term, value, _ = input_gradient_only(x_hat, adv)
        return term, value

    def _pixel_disc_loss(self, x_hat: Tensor, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """gan_disc_weight * [softplus(D(decode(sg x_hat))) + softplus(-D(decode(x_real)))]: only the
        heads train; the decoder and backbone run without a graph."""
        x_real = batch.get("x0")
        if x_real is None:
            raise ValueError("objective.gan_space='pixel' needs real latents in the batch (data.real_data: true)")
        b = x_hat.shape[0]
        with torch.no_grad():
            feats = self.pixel_backbone(self._images(torch.cat([x_hat.detach(), x_real.float()])))
        logits = self.nets["pixel_disc"](feats)
        d_loss = discriminator_gan_loss(logits[:b], logits[b:])
        return self.p.gan_disc_weight * d_loss, {"gan_d": d_loss.item()}

    def fake_score_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        extra = self._pixel_disc_loss if self.pixel_backbone is not None else None
        return self.dm.fake_score_loss(batch, step, extra=extra)

    def _reward(self, x_hat: Tensor, batch: Batch, step: int) -> Tensor:
        r_fn = self.reward
        x = self._images(x_hat) if getattr(r_fn, "input", "latents") == "images" else x_hat
        cond = dict(batch.get("cond") or {})
        if batch.get("prompts") is not None:
            cond["prompts"] = batch["prompts"]
        r = r_fn(x, cond)
        b = x_hat.shape[0]
        if not torch.is_tensor(r) or tuple(r.shape) != (b,):
            shape = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
            raise ValueError(f"reward {_name(r_fn)!r} must return one value per sample, shape ({b},); got {shape}")
        bad = ~torch.isfinite(r.detach())
        if bad.any():
            raise FloatingPointError(
                f"reward {_name(r_fn)!r} returned a non-finite value for {int(bad.sum())} of {b} samples at step {step}"
            )
        return r.float()

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.get("cond")
        rng = self.dm.draws(batch, step, "generator")
        x_hat, t_gen = self.dm.generate(batch, step, grad=True, rng=rng)
        logs: dict[str, float] = {"t_gen": float(t_gen)}
        rewarding = self.reward_active(step)
        if rewarding and not self.p.reward_keep_distillation:
            loss = x_hat.new_zeros(())
            logs["loss_distill"] = 0.0
        else:
            loss, dl = self._distillation(x_hat, cond, step, rng)
            logs.update(dl)
            logs["loss_distill"] = float(loss.detach())
        if rewarding:
            r = self._reward(x_hat, batch, step)
            loss = loss - self.p.reward_weight * r.mean()
            logs["reward"] = r.mean().item()
        logs["loss_g"] = float(loss.detach())
        return loss, logs

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        losses = {"generator": self.generator_loss, "fake_score": self.fake_score_loss}
        return phase_loss("Flash-DMD", losses, phase, batch, step)


def _name(reward: Any) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def build(
    params: FlashDMDParams, teacher: Denoiser, ctx: Any, reward: Callable[[Tensor, Any], Tensor] | None = None
) -> FlashDMDObjective:
    """Registry builder. The adversarial loss needs real latents (data.real_data: true). `reward`
    overrides objective.reward with a callable (Python API)."""
    params.validate()
    if not bool(getattr(ctx, "has_real_data", False)):
        raise ValueError(
            "objective 'flash_dmd' needs real data for its adversarial loss (batch['x0']): set data.real_data: true"
        )
    dmd = build_dmd(params.dmd_params(), teacher, ctx)
    if reward is None and params.reward is not None:
        reward = make_reward(params.reward, params.reward_model, getattr(ctx, "device", None) or "cpu")
    decode = differentiable_decode(getattr(ctx, "decode", None))
    if params.fake_score_pull > 0:
        _check_pull(dmd)
    pixel = None
    if params.gan_space == "pixel":
        backbone = make_pixel_backbone(params.pixel_backbone, getattr(ctx, "vae", None))
        disc = PixelDiscriminator(backbone.channels, int(params.pixel_head_width))
        dev = getattr(ctx, "device", None)
        if dev is not None and torch.device(dev).type != "meta":
            backbone.to(dev)
            disc.to(dev)
        pixel = (backbone, disc)
    obj = FlashDMDObjective(params, dmd, reward, decode, pixel)
    if reward is not None and getattr(ctx, "num_classes", None):
        _probe_reward(obj, ctx)
    return obj


def _check_pull(dmd: DMDObjective) -> None:
    """objective.fake_score_pull mixes the student's trained weights into the fake score: every one
    must have a fake-score parameter of the same name and shape."""
    fake = dict(unwrap(dmd.nets["fake"]).named_parameters())
    for name, q in unwrap(dmd.nets["student"]).named_parameters():
        if q.requires_grad and (name not in fake or fake[name].shape != q.shape):
            raise ValueError(
                f"objective.fake_score_pull: the fake score has no parameter {name!r} of shape {tuple(q.shape)} "
                "to pull toward the student's (the two must share one architecture)"
            )


def _probe_reward(obj: FlashDMDObjective, ctx: Any) -> None:
    """Start-up check of a class-conditional reward on two teacher-shaped inputs (pure-noise
    latents, labels 0 and 1): one finite value per sample, or an error naming objective.reward.
    (Text rewards need the batch's prompts; they are checked at every call instead.)"""
    dev = getattr(ctx, "device", None) or "cpu"
    x = torch.randn(2, *tuple(ctx.latent_shape), generator=torch.Generator().manual_seed(0)).to(dev)
    batch = {"cond": {"class_labels": (torch.arange(2) % int(ctx.num_classes)).to(dev)}}
    try:
        with torch.no_grad():
            obj._reward(x, batch, step=-1)
    except (FloatingPointError, ValueError) as e:
        raise ValueError(f"objective.reward={obj.p.reward!r}: on a start-up probe batch, {e}") from e
