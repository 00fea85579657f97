"""Distribution matching distillation: DMD (Yin et al. 2024a), DMD2 (Yin et al. 2024b) and
Decoupled DMD (Liu et al. 2025), for any teacher behind the Denoiser adapter.

Networks (roles):
    teacher   frozen; the "real" score, with classifier-free guidance
    student   the generator, initialised from the teacher (1-4 steps)
    fake      a trainable copy of the teacher, trained by denoising score matching on sg(student
              samples); never guided
    disc      optional GAN head on the fake score's bottleneck features (DMD2), or on the frozen
              teacher's (`gan_features: teacher`); needs real latents

Groups: "generator" trains the student; "fake_score" trains the fake score (and the head). The
fake_score group updates every step, the generator every `fake_updates_per_generator` steps (DMD2's
two time-scale rule).

Generator losses (x_hat = the student's x0 prediction at its input time t_gen, x0 space):
    dmd2   g = (x0_fake - x0_real_cfg) / mean|x_hat - x0_real_cfg|   at tau ~ U[dm_t_min, dm_t_max]
           L = 0.5 mean((x_hat - sg(x_hat - g))^2)                  (DMD eq. 8; `_maths.dm_gradient`)
    dmd    the same DM term plus the regression loss (required)
    ddmd   two terms, each re-noised at its own time:
           CA  -(w - 1)(x0_c - x0_u) / mean|x_hat - x0_cfg|   at tau_CA ~ U[ca_t_min, min(ca_t_max, t_gen)]
               (ca_schedule="coupled", for the ablation: at the DM term's tau_DM and noise instead)
           DM  (x0_fake_c - x0_real_c) / mean|x_hat - x0_real_c| at tau_DM ~ U[dm_t_min, dm_t_max]
           or, with dm_kind="meanvar", a per-channel Gaussian KL between the student's samples and
           the teacher's (or real) latents instead of the DM term. Both terms' noise is drawn every
           step, so ca_weight 0 (DM only) or dm_weight 0 (CA only) leaves the other term exactly as
           it is; a zero-weight term is not computed (at w = 1 the CA term is zero: no teacher pass,
           no null condition). Without the DM term (meanvar, or dm_weight 0) and without the GAN
           head no fake score is built: one group, "generator", updated every step.
    + gan_generator_weight * softplus(-D(x_hat))          (optional; DMD2 eq. 6)
    + regression_weight * dist(G(z_ref), y_ref)           (optional; 1-step students)

Fake-score loss: native-target MSE (eps for eps teachers, v for v / flow teachers) on
add_noise(sg(x_hat), eps, t), t ~ U[fake_t_min, 1]. The fake score starts as a copy of the teacher,
and the native target keeps the loss weighting the teacher was trained with (DMD2 does the same
for its eps-teachers); `fake_target: x0` gives an unweighted x0 MSE instead.

GAN head (DMD2): D reads the features of one tapped layer (`fewstep.objectives.gan`) of the fake
score (`gan_features: fake_score`, DMD2's design; the head's loss also trains the fake score's
layers up to the tap) or of the frozen teacher (`gan_features: teacher`; the head alone trains).
Its passes cost only what they must:
  - a pass made for the features alone ends after the tapped layer (the early exit of `FeatureTap`);
  - fake-score update: when the GAN's noise levels are drawn like the DSM term's (gan_t range ==
    [fake_t_min, 1], the defaults) the DSM input is the GAN's fake sample, and with fake-score
    features its pass gives their features too; the real samples get a features-only pass;
  - generator update: the fake score and the head are frozen; the head's term is evaluated on a
    detached copy of x_hat and only its gradient w.r.t. x_hat is taken (torch.autograd.grad), so no
    weight gradient of the fake score, teacher or head is computed. When the GAN draws its noise
    levels like the DM term (gan_t range == dm_t range) and the feature network's DM pass is one
    pass over the batch (the fake score; the teacher at guidance 1), that pass gives the features.

Multi-step students use backward simulation: k ~ U{0..K-1} from `step_generator(seed, step)`
(the same on every process); the student runs without grad through student_times[:k] from pure
noise, re-noising with fresh noise, and its prediction at student_times[k] gets the losses. The
student's sampler is those same times then 0, with fresh noise between steps.

Shared-base mode (`shared_base: true`): the teacher, a LoRA student and a LoRA fake score live on
one frozen copy of the base weights; each role's call switches the adapters (see
`fewstep.training.shared_base.SharedBase`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond, cat_cond
from ..denoiser import Denoiser, copy_denoiser
from ..training.shared_base import RoleView, SharedBase
from ._maths import cfg_augmentation, dm_gradient, dsm_loss, mse_per_sample, pseudo_huber, surrogate_loss
from .base import Batch, step_generator, unwrap
from .gan import DiscriminatorHead, FeatureTap, discriminator_gan_loss, feature_layer, generator_gan_loss
from .regression import cached_teacher_samples, channel_gaussian_kl, channel_stats, sample_key, teacher_fingerprint

__all__ = ["DMDParams", "DMDObjective", "build", "params_from_dict", "unwrap"]

VARIANTS = ("dmd", "dmd2", "ddmd")  # registry names dmd, dmd2, decoupled_dmd


@dataclass
class DMDParams:
    """Every default of the DMD family; the YAML keys under `objective:`. The registry sets
    `variant` from objective.name (dmd, dmd2, decoupled_dmd). Optimizer settings (lr, AdamW betas,
    clipping) are the entry point's `optim.generator` / `optim.fake_score`; LoRA rank / alpha /
    targets are `lora.*`; the student's EMA is `ema.rate`."""

    variant: str = "dmd2"  # "dmd2", "dmd" (DM + regression, DMD1) or "ddmd" (Decoupled DMD)
    num_steps: int = 1  # student sampling steps (1-4)
    student_times: list[float] | None = None  # student input times, one per step, decreasing in (0, 1]
    conditioning_time: float = 1.0  # 1-step input time when student_times is unset (DMD2: SD1.5 1.0, SDXL 0.4)
    guidance: float = 4.0  # CFG scale of the real score (Imagen form u + w (c - u))
    dm_t_min: float = 0.02  # DM re-noising time range (DMD2: timesteps 20..980)
    dm_t_max: float = 0.98
    fake_t_min: float = 0.001  # fake-score DSM time range [fake_t_min, 1]
    fake_target: str = "native"  # "native" (eps / v / flow target) or "x0"
    fake_updates_per_generator: int | None = None  # two time-scale rule (None: 5; DMD: 1)
    # ---- GAN (DMD2) -----------------------------------------------------------------------
    gan: bool = False  # classifier head on the fake score's bottleneck; needs real latents
    gan_generator_weight: float = 3e-3  # lambda_G (DMD2 ImageNet 3e-3, SDXL 5e-3)
    gan_disc_weight: float = 1e-2  # lambda_D
    gan_block: int | None = None  # transformer block feeding the head (None: the middle one)
    gan_feature_layer: str | None = None  # dotted module path feeding the head (any backbone); None: the
    #   family's tap (fewstep.objectives.gan)
    gan_head_width: int = 128  # channels of the head
    gan_features: str = "fake_score"  # whose features the head reads: "fake_score" (DMD2) or "teacher"
    #   (frozen; the head alone trains)
    gan_t_min: float = 0.001  # noise levels the head sees
    gan_t_max: float = 1.0
    # ---- regression (DMD) -----------------------------------------------------------------
    regression_weight: float | None = None  # lambda_reg (None: 0.25 for DMD, 0 otherwise); > 0 caches teacher pairs
    regression_pairs: int = 1024  # number of (noise, condition) -> teacher sample pairs
    regression_steps: int = 50  # teacher sampler steps (deterministic DDIM / Euler)
    regression_guidance: float | None = None  # teacher CFG for the pairs (None: `guidance`)
    regression_distance: str = "l2"  # "l2" or "pseudo_huber" in latent space (no LPIPS offline)
    regression_huber_c: float = 0.03  # pseudo-Huber c
    # ---- Decoupled DMD (variant ddmd) -----------------------------------------------------
    ca_weight: float = 1.0  # CFG-augmentation term weight
    dm_weight: float = 1.0  # DM term weight (or mean/variance KL weight)
    ca_t_min: float = 0.02  # CA re-noising range, capped by the generator's input time
    ca_t_max: float = 0.98
    ca_schedule: str = "decoupled"  # "coupled": the CA term reuses the DM term's tau and noise (ablation)
    dm_kind: str = "dm"  # "dm" (fake vs real conditional) or "meanvar" (per-channel KL)
    meanvar_target: str = "teacher"  # "teacher" (cached teacher samples) or "real" (batch["x0"])
    meanvar_samples: int = 512  # teacher samples for the "teacher" statistics
    meanvar_steps: int = 25  # teacher sampler steps for those samples
    # ---- memory ---------------------------------------------------------------------------
    shared_base: bool = False  # one frozen backbone; LoRA student and fake switched per role (lora.*)
    cache_dir: str = "runs/cache/dmd"  # teacher sample caches (regression pairs, teacher statistics)

    def __post_init__(self):
        if self.regression_weight is None:
            self.regression_weight = 0.25 if self.variant == "dmd" else 0.0
        if self.fake_updates_per_generator is None:
            self.fake_updates_per_generator = 1 if self.variant == "dmd" else 5

    @property
    def times(self) -> list[float]:
        return (
            [float(t) for t in self.student_times]
            if self.student_times is not None
            else [float(self.conditioning_time)]
        )

    def validate(self) -> None:
        """Raise on a bad value, naming the key (checks that need the run's data are in `build`)."""

        def bad(msg):
            raise ValueError(msg)

        if self.variant not in VARIANTS:
            bad(f"objective.variant={self.variant!r} is not one of {VARIANTS}")
        n = int(self.num_steps)
        if not 1 <= n <= 8:
            bad(f"objective.num_steps={self.num_steps} must be between 1 and 8")
        if self.student_times is None and n > 1:
            bad(
                f"objective.num_steps={n} needs objective.student_times with {n} entries "
                f"(e.g. {[round(1 - i / n, 4) for i in range(n)]})"
            )
        ts = self.times
        if len(ts) != n:
            bad(f"objective.num_steps={n} needs objective.student_times with {n} entries, got {len(ts)}: {ts}")
        if any(not 0 < t <= 1 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
            key = "objective.student_times" if self.student_times is not None else "objective.conditioning_time"
            bad(f"{key} must be strictly decreasing in (0, 1], got {ts}")
        for lo, hi, name in (
            (self.dm_t_min, self.dm_t_max, "dm_t"),
            (self.gan_t_min, self.gan_t_max, "gan_t"),
            (self.ca_t_min, self.ca_t_max, "ca_t"),
            (self.fake_t_min, 1.0, "fake_t"),
        ):
            if not 0 <= lo < hi <= 1:
                bad(f"objective.{name}_min / {name}_max must satisfy 0 <= min < max <= 1, got {lo}, {hi}")
        if self.gan_features not in ("fake_score", "teacher"):
            bad(f"objective.gan_features={self.gan_features!r} must be 'fake_score' or 'teacher'")
        if self.fake_target not in ("native", "x0"):
            bad(f"objective.fake_target={self.fake_target!r} must be 'native' or 'x0'")
        if int(self.fake_updates_per_generator) < 1:
            bad(f"objective.fake_updates_per_generator={self.fake_updates_per_generator} must be >= 1")
        if self.regression_weight < 0:
            bad(f"objective.regression_weight={self.regression_weight} must be >= 0")
        if self.variant == "dmd" and not self.regression_weight > 0:
            bad(
                "objective.regression_weight must be > 0 for DMD (its regression loss; without it use "
                "objective.name: dmd2)"
            )
        if self.regression_weight > 0:
            if n != 1:
                bad(f"objective.regression_weight > 0 needs a 1-step student (objective.num_steps={n})")
            if self.regression_distance not in ("l2", "pseudo_huber"):
                bad(f"objective.regression_distance={self.regression_distance!r} must be 'l2' or 'pseudo_huber'")
            if int(self.regression_pairs) < 1 or int(self.regression_steps) < 1:
                bad("objective.regression_pairs and objective.regression_steps must be >= 1")
        if self.variant == "ddmd" and self.ca_t_min >= min(ts):
            bad(
                f"objective.ca_t_min={self.ca_t_min} must be below the smallest student time {min(ts)} "
                "(the CA term is re-noised below the generator's input level)"
            )
        if self.ca_schedule not in ("decoupled", "coupled"):
            bad(f"objective.ca_schedule={self.ca_schedule!r} must be 'decoupled' or 'coupled'")
        if self.ca_schedule == "coupled" and self.dm_kind != "dm":
            bad("objective.ca_schedule='coupled' shares the DM term's draw: it needs objective.dm_kind='dm'")
        if self.dm_kind not in ("dm", "meanvar"):
            bad(f"objective.dm_kind={self.dm_kind!r} must be 'dm' or 'meanvar'")
        if self.dm_kind == "meanvar" and self.variant != "ddmd":
            bad("objective.dm_kind='meanvar' is a Decoupled DMD option (objective.name: decoupled_dmd)")
        if self.meanvar_target not in ("teacher", "real"):
            bad(f"objective.meanvar_target={self.meanvar_target!r} must be 'teacher' or 'real'")
        if int(self.meanvar_samples) < 2 or int(self.meanvar_steps) < 1:
            bad("objective.meanvar_samples must be >= 2 and objective.meanvar_steps >= 1")


def params_from_dict(d: dict[str, Any] | None) -> DMDParams:
    """DMDParams from a YAML mapping (without the registry); an unknown key is an error that names
    it. `name` (dmd, dmd2, decoupled_dmd) sets the variant."""
    d = dict(d or {})
    name = d.pop("name", None)
    if name is not None:
        d.setdefault("variant", {"dmd": "dmd", "dmd2": "dmd2", "decoupled_dmd": "ddmd"}.get(name, name))
    known = {f.name for f in dataclasses.fields(DMDParams)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"objective: unknown key(s) {['objective.' + k for k in unknown]}; known keys are {sorted(known)}"
        )
    p = DMDParams(**d)
    p.validate()
    return p


# ---- the objective --------------------------------------------------------------------------
class DMDObjective:
    """DMD / DMD2 / Decoupled DMD. See the module docstring for the maths.

    Args:
        params:  DMDParams (validated).
        teacher, student, fake: callables with the Denoiser signature (Denoisers or role views).
        seed:    run seed (backward-simulation step counts via `step_generator`).
        latent_shape: (C, H, W).
        disc, tap: the GAN head and the feature hook on the network `params.gan_features` names
                  (both or neither).
        teacher_key: fingerprint of the teacher weights (for the sample caches).
        num_classes: class-conditional teachers: the cached teacher samples use balanced labels
                  0..num_classes-1 (otherwise the first training batch's conditions, tiled).
    """

    def __init__(
        self,
        params: DMDParams,
        teacher: nn.Module,
        student: nn.Module,
        fake: nn.Module | None,
        *,
        seed: int = 0,
        latent_shape: tuple[int, ...] = (4, 8, 8),
        disc: DiscriminatorHead | None = None,
        tap: FeatureTap | None = None,
        teacher_key: str | None = None,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.p = params
        self.seed = int(seed)
        self.latent_shape = tuple(latent_shape)
        self.path = teacher.path
        self.times = params.times
        self.nets: dict[str, nn.Module] = {"teacher": teacher, "student": student}
        self.groups: dict[str, list[str]] = {"generator": ["student"]}
        if fake is not None:  # None: Decoupled DMD without a DM term or GAN head uses none
            self.nets["fake"] = fake
            self.groups["fake_score"] = ["fake"]
        if disc is not None:
            self.nets["disc"] = disc
            self.groups["fake_score"].append("disc")
        self.tap = tap
        self.teacher_key = teacher_key
        self.num_classes = num_classes
        self.device = device
        self.sampling = {"times": self.times + [0.0], "renoise": "fresh"}
        self.variant = params.variant
        self._pairs: tuple[Tensor, Tensor, Cond | None] | None = None
        self._teacher_stats: tuple[Tensor, Tensor] | None = None

    # ---- schedule -----------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        """The fake score updates every step; the generator on the last step of each cycle of
        `fake_updates_per_generator` (so the fake score has adapted before the first generator
        update, and a run of N x ratio steps ends on a generator update). Without a fake score the
        generator updates every step."""
        if "fake" not in self.nets:
            return ["generator"]
        r = int(self.p.fake_updates_per_generator)
        if (step + 1) % r == 0:
            return ["generator", "fake_score"]
        return ["fake_score"]

    def sim_steps(self, step: int) -> int:
        """Backward-simulation depth k in {0..K-1}, the same on every process at a given step."""
        k = len(self.times)
        if k == 1:
            return 0
        return int(torch.randint(0, k, (1,), generator=step_generator(self.seed, step)))

    # ---- helpers ------------------------------------------------------------------------
    def _dev(self, batch: Batch) -> torch.device:
        if batch.get("x0") is not None:
            return batch["x0"].device
        for v in (batch.get("cond") or {}).values():
            if torch.is_tensor(v):
                return v.device
        if self.device is not None:
            return torch.device(self.device)
        return next(iter(unwrap(self.nets["teacher"]).parameters())).device

    @staticmethod
    def _uniform(b: int, lo: float, hi: float, device) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, device=device)

    def _shape(self, batch: Batch) -> tuple[int, ...]:
        if batch.get("shape") is not None:
            return tuple(batch["shape"])
        return tuple(batch["x0"].shape)

    def generate(self, batch: Batch, step: int, grad: bool) -> tuple[Tensor, float]:
        """The student's x0 prediction x_hat (B, C, H, W) at its input time t_gen (backward
        simulation for multi-step students). Returns (x_hat, t_gen)."""
        shape, dev, cond = self._shape(batch), self._dev(batch), batch.get("cond")
        student = self.nets["student"]
        k = self.sim_steps(step)
        noise = torch.randn(shape, device=dev) * self.path.init_noise_sigma
        x = noise
        with torch.no_grad():  # run the student to its k-th input time, fresh noise in between
            for t, t_next in zip(self.times[:k], self.times[1 : k + 1]):
                x = self.path.add_noise(student(x, t, cond), torch.randn_like(x), t_next)
        t_gen = self.times[k]
        with nullcontext() if grad else torch.no_grad():
            x_hat = student(x, t_gen, cond)
        return x_hat.float(), t_gen

    def _draw(self, x: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
        """(tau ~ U[lo, hi] per sample, fresh eps like x)."""
        return self._uniform(x.shape[0], lo, hi, x.device), torch.randn_like(x)

    def _noised(
        self, x: Tensor, lo: float, hi: float, detach: bool = True, drawn: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """add_noise(x, eps, tau) with tau ~ U[lo, hi] per sample and fresh eps (or `drawn`)."""
        tau, eps = drawn if drawn is not None else self._draw(x, lo, hi)
        return self.path.add_noise(x.detach() if detach else x, eps, tau), tau

    # ---- the GAN head --------------------------------------------------------------------
    @property
    def _feature_role(self) -> str:
        """The network whose tapped features the head reads."""
        return "teacher" if self.p.gan_features == "teacher" else "fake"

    def _disc_logits(self, x_in: Tensor, t_in: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor]:
        """The feature network's native output and the head's logits from one complete pass."""
        with self.tap.capture():
            out = self.nets[self._feature_role](x_in, t_in, cond, output="native")
        return out, self.nets["disc"](self.tap.take())

    def _features(self, x: Tensor, t: Tensor, cond: Cond | None, trains: bool) -> Tensor:
        """The tapped features at (x, t), from a pass that ends after the tapped layer. `trains`:
        the pass trains the network, so it is called as the entry point placed it (a wrapper that
        averages gradients must see it); otherwise the bare module."""
        net = self.nets[self._feature_role]
        with self.tap.capture(stop=True):
            (net if trains else unwrap(net))(x, t, cond, output="native")
        return self.tap.take()

    def _gan_generator(
        self, x_hat: Tensor, cond: Cond | None, drawn: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The generator's GAN term at x_hat re-noised at tau ~ U[gan_t_min, gan_t_max] (or `drawn`):
        (term, adv), adv = softplus(-D(features)) and term its student-only stand-in
        (`_input_gradient_only`): the feature network and head are frozen here."""
        tau, eps = drawn if drawn is not None else self._draw(x_hat, self.p.gan_t_min, self.p.gan_t_max)

        def adv(leaf: Tensor) -> tuple[Tensor, None]:
            feats = self._features(self.path.add_noise(leaf, eps, tau), tau, cond, trains=False)
            return generator_gan_loss(unwrap(self.nets["disc"])(feats)), None

        term, value, _ = _input_gradient_only(x_hat, adv)
        return term, value

    def _gan_on_dm_pass(self, guidance: float) -> bool:
        """Whether the generator's GAN term reads the DM term's noised samples and pass: the GAN
        draws its noise level like the DM term, and the feature network's DM pass is one pass over
        the batch (the fake score is never guided; the teacher only at guidance 1)."""
        p = self.p
        same_draw = (p.gan_t_min, p.gan_t_max) == (p.dm_t_min, p.dm_t_max)
        return p.gan and same_draw and (self._feature_role == "fake" or float(guidance) == 1.0)

    # ---- generator ----------------------------------------------------------------------
    def _dm_grad(
        self, x_hat: Tensor, cond: Cond | None, guidance: float, drawn: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        x_tau, tau = self._noised(x_hat, self.p.dm_t_min, self.p.dm_t_max, drawn=drawn)
        with torch.no_grad():
            x0_real = self.nets["teacher"](x_tau, tau, cond, guidance)
            x0_fake = self.nets["fake"](x_tau, tau, cond)
        return dm_gradient(x_hat, x0_real, x0_fake)

    def _dm_grad_and_gan(
        self, x_hat: Tensor, cond: Cond | None, guidance: float, drawn: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`_dm_grad` and `_gan_generator` on the same noised samples: the feature network's DM pass
        runs with a gradient to its input only and gives the head its features. Returns (g, term,
        adv). Valid when `_gan_on_dm_pass(guidance)`."""
        tau, eps = drawn if drawn is not None else self._draw(x_hat, self.p.dm_t_min, self.p.dm_t_max)
        role = self._feature_role

        def passes(leaf: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            x_tau = self.path.add_noise(leaf, eps, tau)
            x0 = {}
            for r, w in (("teacher", guidance), ("fake", 1.0)):
                if r == role:
                    with self.tap.capture():
                        x0[r] = unwrap(self.nets[r])(x_tau, tau, cond, w).detach()
                    feats = self.tap.take()
                else:
                    with torch.no_grad():
                        x0[r] = self.nets[r](x_tau, tau, cond, w)
            return generator_gan_loss(unwrap(self.nets["disc"])(feats)), (x0["teacher"], x0["fake"])

        term, adv, (x0_real, x0_fake) = _input_gradient_only(x_hat, passes)
        return dm_gradient(x_hat, x0_real, x0_fake), term, adv

    def _ca_grad(
        self, x_hat: Tensor, cond: Cond | None, t_gen: float, drawn: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Decoupled DMD's CFG-augmentation term, normalised like DMD's gradient:
        -(w - 1)(x0_c - x0_u) / mean|x_hat - x0_cfg|, re-noised below the generator's input time.
        (dm_gradient(x, x0_cfg, x0_c) is exactly that quotient, since x0_c - x0_cfg = -(w-1)(c-u).)
        Zero at w = 1, returned without a teacher pass."""
        hi = min(self.p.ca_t_max, float(t_gen))
        if float(self.p.guidance) == 1.0:
            return torch.zeros_like(x_hat)
        x_tau, tau = self._noised(x_hat, self.p.ca_t_min, hi, drawn=drawn)
        with torch.no_grad():
            x0_c, x0_u = self.nets["teacher"](x_tau, tau, cond, output="cond_uncond")
        ca = cfg_augmentation(x0_c, x0_u, self.p.guidance)
        return dm_gradient(x_hat, x0_c + ca, x0_c)

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        p, cond = self.p, batch.get("cond")
        x_hat, t_gen = self.generate(batch, step, grad=True)
        logs: dict[str, float] = {"t_gen": t_gen}
        gan: list[Tensor] = []  # (term, adv) once the GAN term is computed with the DM pass
        if self.variant in ("dmd", "dmd2"):
            if self._gan_on_dm_pass(p.guidance):
                g, *gan = self._dm_grad_and_gan(x_hat, cond, p.guidance)
            else:
                g = self._dm_grad(x_hat, cond, p.guidance)
            loss = surrogate_loss(x_hat, g)
            logs["dm_grad_norm"] = g.flatten(1).norm(dim=1).mean().item()
        else:  # Decoupled DMD; both terms' noise drawn first, so a switched-off term changes nothing else
            ca_draw = self._draw(x_hat, p.ca_t_min, min(p.ca_t_max, float(t_gen)))
            dm_draw = self._draw(x_hat, p.dm_t_min, p.dm_t_max)
            if p.ca_schedule == "coupled":  # one re-noising for both terms, over the DM term's range
                ca_draw = dm_draw
            g = torch.zeros_like(x_hat)
            if p.ca_weight != 0:
                g_ca = self._ca_grad(x_hat, cond, t_gen, ca_draw)
                logs["ca_grad_norm"] = g_ca.flatten(1).norm(dim=1).mean().item()
                g = g + p.ca_weight * g_ca
            if p.dm_kind == "dm":
                if p.dm_weight != 0:
                    if self._gan_on_dm_pass(1.0):
                        g_dm, *gan = self._dm_grad_and_gan(x_hat, cond, 1.0, dm_draw)
                    else:
                        g_dm = self._dm_grad(x_hat, cond, 1.0, dm_draw)
                    logs["dm_grad_norm"] = g_dm.flatten(1).norm(dim=1).mean().item()
                    g = g + p.dm_weight * g_dm
                loss = surrogate_loss(x_hat, g)
            else:
                mean_ref, var_ref = self._meanvar_reference(batch)
                kl = channel_gaussian_kl(x_hat, mean_ref, var_ref)
                logs["meanvar_kl"] = kl.item()
                loss = surrogate_loss(x_hat, g) + p.dm_weight * kl
        if p.gan:
            term, adv = gan if gan else self._gan_generator(x_hat, cond)
            loss = loss + p.gan_generator_weight * term
            logs["gan_g"] = adv.item()
        if p.regression_weight > 0:
            reg = self._regression_loss(batch)
            loss = loss + p.regression_weight * reg
            logs["regression"] = reg.item()
        logs["loss_g"] = loss.item()
        return loss, logs

    # ---- fake score (+ head) ---------------------------------------------------------------
    def fake_score_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        p, cond = self.p, batch.get("cond")
        with torch.no_grad():
            x_hat, _ = self.generate(batch, step, grad=False)
        b = x_hat.shape[0]
        eps = torch.randn_like(x_hat)
        t = self._uniform(b, p.fake_t_min, 1.0, x_hat.device)
        x_t = self.path.add_noise(x_hat, eps, t)
        logs: dict[str, float] = {}
        if p.gan:
            out, d_loss = self._fake_and_disc(x_hat, x_t, t, batch)
            logs["gan_d"] = d_loss.item()
        else:
            out = self.nets["fake"](x_t, t, cond, output="native")
            d_loss = None
        if p.fake_target == "native":
            fake_loss = dsm_loss(out, self.path.from_x0_eps(x_hat, eps, t))
        else:
            fake_loss = dsm_loss(self.path.to_x0_eps(x_t, out, t)[0], x_hat)
        logs["loss_fake"] = fake_loss.item()
        loss = fake_loss if d_loss is None else fake_loss + p.gan_disc_weight * d_loss
        return loss, logs

    def _fake_and_disc(self, x_hat: Tensor, x_t: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The fake score's native output at the DSM input (x_t, t) and the head's loss
        softplus(D(fake)) + softplus(-D(real)). The fake samples are the DSM input itself when the
        GAN draws its noise level like the DSM term, else their own draw."""
        p, cond, b = self.p, batch.get("cond"), x_hat.shape[0]
        x_real = batch.get("x0")
        if x_real is None:
            raise ValueError("objective.gan=true but the batch has no 'x0' (real latents)")
        reuse = (p.gan_t_min, p.gan_t_max) == (p.fake_t_min, 1.0)
        xf, tf = (x_t, t) if reuse else self._noised(x_hat, p.gan_t_min, p.gan_t_max)
        xr, tr = self._noised(x_real.float(), p.gan_t_min, p.gan_t_max)
        if reuse and self._feature_role == "fake":  # the DSM pass gives the fake samples' features
            with self.tap.capture():
                out = self.nets["fake"](x_t, t, cond, output="native")
            feats = [self.tap.take(), self._features(xr, tr, cond, trains=True)]
        else:
            out = self.nets["fake"](x_t, t, cond, output="native")
            cond2 = cat_cond(cond, cond) if cond is not None else None
            trains = self._feature_role == "fake"  # the frozen teacher's features train the head only
            with nullcontext() if trains else torch.no_grad():
                feats = [self._features(torch.cat([xf, xr]), torch.cat([tf, tr]), cond2, trains=trains)]
        logits = self.nets["disc"](torch.cat(feats))
        return out, discriminator_gan_loss(logits[:b], logits[b:])

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase == "generator":
            return self.generator_loss(batch, step)
        if phase == "fake_score":
            return self.fake_score_loss(batch, step)
        raise ValueError(f"unknown phase {phase!r}; DMD has 'generator' and 'fake_score'")

    # ---- cached teacher samples ------------------------------------------------------------
    def _cond_pool(self, batch: Batch, n: int) -> Cond | None:
        if self.num_classes:
            c = {"class_labels": torch.arange(n) % int(self.num_classes)}
        else:  # tile the first batch's conditions
            c = batch.get("cond")
            if c is None:
                return None
            b = next(v.shape[0] for v in c.values() if torch.is_tensor(v) and v.ndim > 0)
            idx = torch.arange(n) % b
            c = {k: (v.detach().cpu()[idx] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in c.items()}
        return c

    def _teacher_samples(self, batch: Batch, n: int, steps: int, guidance: float, tag: str):
        cond = self._cond_pool(batch, n)
        times = [float(t) for t in self.path.sampling_times(steps)]
        seed = self.seed + (0 if tag == "regression" else 1)
        key = sample_key(
            self.teacher_key or "unknown",
            cond,
            tag=tag,
            n=n,
            times=times,
            guidance=guidance,
            renoise="ddim",
            shape=self.latent_shape,
            seed=seed,
        )
        return cached_teacher_samples(
            self.nets["teacher"],
            key,
            cond,
            n,
            self.latent_shape,
            times,
            guidance,
            seed,
            self.p.cache_dir,
            device=self._dev(batch),
        )

    def _regression_loss(self, batch: Batch) -> Tensor:
        p = self.p
        if self._pairs is None:
            g = p.guidance if p.regression_guidance is None else p.regression_guidance
            self._pairs = self._teacher_samples(
                batch, int(p.regression_pairs), int(p.regression_steps), g, "regression"
            )
        noise, y, cond = self._pairs
        b, dev = self._shape(batch)[0], self._dev(batch)
        idx = torch.randint(0, noise.shape[0], (b,))
        c = None if cond is None else {k: (v[idx].to(dev) if torch.is_tensor(v) else v) for k, v in cond.items()}
        x = self.nets["student"](noise[idx].to(dev) * self.path.init_noise_sigma, self.times[0], c)
        if p.regression_distance == "l2":
            return mse_per_sample(x, y[idx].to(dev)).mean()
        return pseudo_huber(x, y[idx].to(dev), p.regression_huber_c).mean()

    def _meanvar_reference(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if self.p.meanvar_target == "real":
            if batch.get("x0") is None:
                raise ValueError("objective.meanvar_target='real' but the batch has no 'x0' (real latents)")
            return channel_stats(batch["x0"])
        if self._teacher_stats is None:
            _, y, _ = self._teacher_samples(
                batch, int(self.p.meanvar_samples), int(self.p.meanvar_steps), self.p.guidance, "meanvar"
            )
            dev = self._dev(batch)
            self._teacher_stats = tuple(s.to(dev) for s in channel_stats(y))
        return self._teacher_stats


def _input_gradient_only(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, Any]]) -> tuple[Tensor, Tensor, Any]:
    """Evaluate `loss, extra = fn(leaf)` on a detached copy `leaf` of x and return (term, loss,
    extra), where term has the loss's value and d term / d x = d loss / d leaf. Its backward
    reaches only what produced x: torch.autograd.grad asks for the leaf's gradient alone, so the
    networks inside `fn` get no weight gradients (and none are computed), frozen or not."""
    leaf = x.detach().requires_grad_(True)
    loss, extra = fn(leaf)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach() + ((x - x.detach()) * g).sum(), loss.detach(), extra


# ---- builder (fewstep.objectives.registry: dmd, dmd2, decoupled_dmd) -------------------------
def _build(params: DMDParams, teacher: Denoiser, ctx: Any) -> DMDObjective:
    """Check `params` against the run, make the networks, return the objective.

    ctx (a registry BuildContext, or any object with these attributes): latent_shape,
    has_real_data, seed, device, num_classes, make_student / make_copy (full copies when absent),
    lora (rank / alpha / target_modules / dropout for shared-base mode), sharded,
    gradient_checkpointing.
    """
    params.validate()
    name = {"dmd": "dmd", "dmd2": "dmd2", "ddmd": "decoupled_dmd"}[params.variant]
    has_real = bool(getattr(ctx, "has_real_data", False))
    if params.gan and not has_real:
        raise ValueError(
            f"objective.gan=true needs real data (real latents in batch['x0']): set data.real_data: "
            f"true, or objective.gan: false ({name})"
        )
    ddmd = params.variant == "ddmd"
    if ddmd and params.dm_kind == "meanvar" and params.meanvar_target == "real" and not has_real:
        raise ValueError(
            "objective.meanvar_target='real' needs real data (batch['x0']): set data.real_data: true "
            "or objective.meanvar_target: teacher"
        )
    if ddmd and teacher.conditioner.guidance_embedded:
        raise ValueError(
            "objective.name=decoupled_dmd needs a teacher with an unconditional branch; this one is "
            "guidance-distilled (guidance is an input), so the CFG-augmentation term has no (c - u)"
        )
    if params.shared_base:
        if getattr(ctx, "sharded", False):
            raise ValueError(
                "objective.shared_base=true cannot run sharded (FSDP shards each network on its own); "
                "use lora.student / lora.fake instead"
            )
        if getattr(ctx, "gradient_checkpointing", False):
            raise ValueError(
                "objective.shared_base=true cannot run with precision.gradient_checkpointing (the "
                "recomputation in backward would see whichever adapter is active then)"
            )
    teacher.requires_grad_(False)
    # Decoupled DMD with the mean/variance regulariser (or without the DM term) never queries a fake
    # score; it is then built only to feed the GAN head
    needs_fake = not ddmd or (params.dm_kind == "dm" and params.dm_weight != 0) or params.gan
    latent_shape = tuple(ctx.latent_shape)
    needs_key = params.regression_weight > 0 or (
        ddmd and params.dm_kind == "meanvar" and params.meanvar_target == "teacher"
    )
    key = teacher_fingerprint(teacher) if needs_key else None
    if params.shared_base:
        lora = getattr(ctx, "lora", None)
        shared = SharedBase(
            teacher,
            ["student", "fake"] if needs_fake else ["student"],
            rank=getattr(lora, "rank", 16),
            alpha=getattr(lora, "alpha", 16.0),
            targets=getattr(lora, "target_modules", None),
            dropout=getattr(lora, "dropout", 0.0),
        )
        t_net, student = RoleView(shared, None), RoleView(shared, "student")
        fake = RoleView(shared, "fake") if needs_fake else None
        fake_backbone = teacher.backbone
    else:
        make_student = getattr(ctx, "make_student", None) or copy_denoiser
        make_copy = getattr(ctx, "make_copy", None) or copy_denoiser
        t_net, student = teacher, make_student(teacher)
        fake = make_copy(teacher) if needs_fake else None
        for role, net in (("student", student), ("fake", fake)):
            if net is not None and not any(p.requires_grad for p in net.parameters()):
                raise ValueError(f"the {role} network has no trainable weights (check lora.* / the model)")
        fake_backbone = unwrap(fake).backbone if fake is not None else None
    disc = tap = None
    if params.gan:
        feature_backbone = teacher.backbone if params.gan_features == "teacher" else fake_backbone
        block, channels = feature_layer(feature_backbone, params.gan_feature_layer, params.gan_block)
        # sharded backbones run every layer: FSDP's hooks on the layers after the tap must run
        tap = FeatureTap(block, early_exit=not getattr(ctx, "sharded", False))
        disc = DiscriminatorHead(channels, latent_shape[1:], params.gan_head_width)
        dev = getattr(ctx, "device", None)
        if dev is not None:
            disc.to(dev)
    return DMDObjective(
        params,
        t_net,
        student,
        fake,
        seed=int(getattr(ctx, "seed", 0)),
        latent_shape=latent_shape,
        disc=disc,
        tap=tap,
        teacher_key=key,
        num_classes=getattr(ctx, "num_classes", None),
        device=getattr(ctx, "device", None),
    )


def build(params: DMDParams | dict | None, teacher: Denoiser, ctx: Any) -> DMDObjective:
    """The registry's builder for dmd, dmd2 and decoupled_dmd (the variant is in `params`)."""
    if not isinstance(params, DMDParams):
        params = params_from_dict(params)
    return _build(params, teacher, ctx)


def context(**kw: Any) -> SimpleNamespace:
    """A minimal build context (tests, scripts): latent_shape, has_real_data, seed, device, ..."""
    base = dict(latent_shape=(4, 8, 8), num_classes=None, has_real_data=False, seed=0, device=None)
    base.update(kw)
    return SimpleNamespace(**base)
