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
               (ca_schedule="coupled", for the ablation: at the DM term's tau_DM and noise instead;
               "uncapped": its own draw over [ca_t_min, ca_t_max], not capped at t_gen)
           DM  (x0_fake_c - x0_real_c) / mean|x_hat - x0_real_c| at tau_DM ~ U[dm_t_min, dm_t_max]
           (ca_normaliser="dm": the CA term divided by the DM term's normaliser instead of its own, so
           the sum has one scale, as DMD2's gradient has; with coupled schedules it is then DMD2's
           gradient but for the normaliser's x0_real_c in place of x0_real_cfg)
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

from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond, cat_cond
from ..denoiser import Denoiser
from ..randomness import SampleDraws
from ._maths import (
    dm_gradient,
    dsm_loss,
    input_gradient_only,
    mse_per_sample,
    pseudo_huber,
    surrogate_loss,
)
from .base import Batch, phase_loss, step_generator, unwrap
from .ddmd import ddmd_gradient
from .dmd_params import VARIANTS, DMDParams, params_from_dict
from .gan import DiscriminatorHead, FeatureTap, discriminator_gan_loss, generator_gan_loss
from .regression import channel_gaussian_kl, channel_stats, pool_conditions, teacher_sample_set

__all__ = ["VARIANTS", "DMDParams", "DMDObjective", "build", "params_from_dict", "unwrap"]

Drawn = tuple[Tensor, Tensor] | None  # (tau, eps) drawn once and shared by two terms


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

    def draws(self, batch: Batch, step: int, phase: str) -> SampleDraws:
        """Per-sample draws of one phase's loss (`fewstep.randomness`): functions of (seed, step,
        phase, global sample index), so the split of the global batch changes nothing."""
        rows = self._shape(batch)[0]
        return SampleDraws.for_batch(batch, self.seed, step, f"dmd/{phase}", self._dev(batch), rows=rows)

    def _shape(self, batch: Batch) -> tuple[int, ...]:
        if batch.get("shape") is not None:
            return tuple(batch["shape"])
        return tuple(batch["x0"].shape)

    def generate(self, batch: Batch, step: int, grad: bool, rng: SampleDraws) -> tuple[Tensor, float]:
        """The student's x0 prediction x_hat (B, C, H, W) at its input time t_gen (backward
        simulation for multi-step students), its noise from `rng`. Returns (x_hat, t_gen)."""
        shape, cond = self._shape(batch), batch.get("cond")
        student = self.nets["student"]
        k = self.sim_steps(step)
        noise = rng.normal(*shape[1:]) * self.path.init_noise_sigma
        x = noise
        with torch.no_grad():  # run the student to its k-th input time, fresh noise in between
            for t, t_next in zip(self.times[:k], self.times[1 : k + 1]):
                x = self.path.add_noise(student(x, t, cond), rng.normal_like(x), t_next)
        t_gen = self.times[k]
        with nullcontext() if grad else torch.no_grad():
            x_hat = student(x, t_gen, cond)
        return x_hat.float(), t_gen

    @staticmethod
    def _draw(x: Tensor, lo: float, hi: float, rng: SampleDraws) -> tuple[Tensor, Tensor]:
        """(tau ~ U[lo, hi] per sample, fresh eps like x)."""
        return rng.uniform(low=lo, high=hi).to(x.device), rng.normal_like(x)

    def _noised(
        self,
        x: Tensor,
        lo: float,
        hi: float,
        rng: SampleDraws | None,
        detach: bool = True,
        drawn: Drawn = None,
    ) -> tuple[Tensor, Tensor]:
        """add_noise(x, eps, tau) with tau ~ U[lo, hi] per sample and fresh eps from `rng` (or `drawn`)."""
        tau, eps = drawn if drawn is not None else self._draw(x, lo, hi, rng)
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
        self, x_hat: Tensor, cond: Cond | None, rng: SampleDraws | None, drawn: Drawn = None
    ) -> tuple[Tensor, Tensor]:
        """The generator's GAN term at x_hat re-noised at tau ~ U[gan_t_min, gan_t_max] (or `drawn`):
        (term, adv), adv = softplus(-D(features)) and term its student-only stand-in
        (`_input_gradient_only`): the feature network and head are frozen here."""
        tau, eps = drawn if drawn is not None else self._draw(x_hat, self.p.gan_t_min, self.p.gan_t_max, rng)

        def adv(leaf: Tensor) -> tuple[Tensor, None]:
            feats = self._features(self.path.add_noise(leaf, eps, tau), tau, cond, trains=False)
            return generator_gan_loss(unwrap(self.nets["disc"])(feats)), None

        term, value, _ = input_gradient_only(x_hat, adv)
        return term, value

    def _gan_on_dm_pass(self, guidance: float) -> bool:
        """Whether the generator's GAN term reads the DM term's noised samples and pass: the GAN
        draws its noise level like the DM term, and the feature network's DM pass is one pass over
        the batch (the fake score is never guided; the teacher only at guidance 1)."""
        p = self.p
        same_draw = (p.gan_t_min, p.gan_t_max) == (p.dm_t_min, p.dm_t_max)
        return p.gan and same_draw and (self._feature_role == "fake" or float(guidance) == 1.0)

    # ---- generator ----------------------------------------------------------------------
    def _dm_x0(
        self, x_hat: Tensor, cond: Cond | None, w: float, rng: SampleDraws | None, drawn: Drawn = None
    ) -> tuple[Tensor, Tensor]:
        """The DM term's two x0 predictions at one re-noising of x_hat: (real at guidance w, fake)."""
        x_tau, tau = self._noised(x_hat, self.p.dm_t_min, self.p.dm_t_max, rng, drawn=drawn)
        with torch.no_grad():
            return self.nets["teacher"](x_tau, tau, cond, w), self.nets["fake"](x_tau, tau, cond)

    def _dm_grad(
        self, x_hat: Tensor, cond: Cond | None, w: float, rng: SampleDraws | None, drawn: Drawn = None
    ) -> Tensor:
        return dm_gradient(x_hat, *self._dm_x0(x_hat, cond, w, rng, drawn))

    def _dm_x0_and_gan(
        self,
        x_hat: Tensor,
        cond: Cond | None,
        guidance: float,
        rng: SampleDraws | None,
        drawn: Drawn = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_dm_x0` and `_gan_generator` on the same noised samples: the feature network's DM pass
        runs with a gradient to its input only and gives the head its features. Returns (x0_real,
        x0_fake, term, adv). Valid when `_gan_on_dm_pass(guidance)`."""
        tau, eps = drawn if drawn is not None else self._draw(x_hat, self.p.dm_t_min, self.p.dm_t_max, rng)
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

        term, adv, (x0_real, x0_fake) = input_gradient_only(x_hat, passes)
        return x0_real, x0_fake, term, adv

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        p, cond = self.p, batch.get("cond")
        rng = self.draws(batch, step, "generator")
        x_hat, t_gen = self.generate(batch, step, grad=True, rng=rng)
        logs: dict[str, float] = {"t_gen": t_gen}
        gan: list[Tensor] = []  # (term, adv) once the GAN term is computed with the DM pass
        if self.variant in ("dmd", "dmd2"):
            if self._gan_on_dm_pass(p.guidance):
                x0_real, x0_fake, *gan = self._dm_x0_and_gan(x_hat, cond, p.guidance, rng)
                g = dm_gradient(x_hat, x0_real, x0_fake)
            else:
                g = self._dm_grad(x_hat, cond, p.guidance, rng)
            loss = surrogate_loss(x_hat, g)
            logs["dm_grad_norm"] = g.flatten(1).norm(dim=1).mean().item()
        else:  # Decoupled DMD: the CA and DM terms at their own re-noising (`ddmd.ddmd_gradient`)
            g, gan = ddmd_gradient(self, x_hat, cond, t_gen, rng, logs)
            if p.dm_kind == "dm":
                loss = surrogate_loss(x_hat, g)
            else:
                mean_ref, var_ref = self._meanvar_reference(batch)
                kl = channel_gaussian_kl(x_hat, mean_ref, var_ref)
                logs["meanvar_kl"] = kl.item()
                loss = surrogate_loss(x_hat, g) + p.dm_weight * kl
        if p.gan:
            term, adv = gan if gan else self._gan_generator(x_hat, cond, rng)
            loss = loss + p.gan_generator_weight * term
            logs["gan_g"] = adv.item()
        if p.regression_weight > 0:
            reg = self._regression_loss(batch, rng)
            loss = loss + p.regression_weight * reg
            logs["regression"] = reg.item()
        logs["loss_g"] = loss.item()
        return loss, logs

    # ---- fake score (+ head) ---------------------------------------------------------------
    def fake_score_loss(
        self, batch: Batch, step: int, extra: Callable[[Tensor, Batch], tuple[Tensor, dict]] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The fake score's denoising loss on the student's samples (+ the GAN head's loss). `extra`:
        a further loss on the same samples, (x_hat, batch) -> (loss, logs), added as it is (an
        objective built on this one trains its own discriminator there)."""
        p, cond = self.p, batch.get("cond")
        rng = self.draws(batch, step, "fake_score")
        with torch.no_grad():
            x_hat, _ = self.generate(batch, step, grad=False, rng=rng)
        eps = rng.normal_like(x_hat)
        t = rng.uniform(low=p.fake_t_min, high=1.0).to(x_hat.device)
        x_t = self.path.add_noise(x_hat, eps, t)
        logs: dict[str, float] = {}
        if p.gan:
            out, d_loss = self._fake_and_disc(x_hat, x_t, t, batch, rng)
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
        if extra is not None:
            extra_loss, extra_logs = extra(x_hat, batch)
            loss = loss + extra_loss
            logs.update(extra_logs)
        return loss, logs

    def _fake_and_disc(
        self, x_hat: Tensor, x_t: Tensor, t: Tensor, batch: Batch, rng: SampleDraws
    ) -> tuple[Tensor, Tensor]:
        """The fake score's native output at the DSM input (x_t, t) and the head's loss
        softplus(D(fake)) + softplus(-D(real)). The fake samples are the DSM input itself when the
        GAN draws its noise level like the DSM term, else their own draw."""
        p, cond, b = self.p, batch.get("cond"), x_hat.shape[0]
        x_real = batch.get("x0")
        if x_real is None:
            raise ValueError("objective.gan=true but the batch has no 'x0' (real latents)")
        reuse = (p.gan_t_min, p.gan_t_max) == (p.fake_t_min, 1.0)
        xf, tf = (x_t, t) if reuse else self._noised(x_hat, p.gan_t_min, p.gan_t_max, rng)
        xr, tr = self._noised(x_real.float(), p.gan_t_min, p.gan_t_max, rng)
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
        losses = {"generator": self.generator_loss, "fake_score": self.fake_score_loss}
        return phase_loss("DMD", losses, phase, batch, step)

    # ---- cached teacher samples ------------------------------------------------------------
    def _teacher_samples(self, batch: Batch, n: int, steps: int, guidance: float, tag: str):
        """n cached teacher samples (noise, samples, conditions) for the regression pairs or the
        mean/variance statistics (`regression.teacher_sample_set`)."""
        return teacher_sample_set(
            self.nets["teacher"],
            self.teacher_key,
            pool_conditions(batch.get("cond"), n, self.num_classes),
            n=n,
            steps=steps,
            guidance=guidance,
            tag=tag,
            seed=self.seed + (0 if tag == "regression" else 1),
            latent_shape=self.latent_shape,
            cache_dir=self.p.cache_dir,
            device=self._dev(batch),
        )

    def _regression_loss(self, batch: Batch, rng: SampleDraws) -> Tensor:
        p = self.p
        if self._pairs is None:
            g = p.guidance if p.regression_guidance is None else p.regression_guidance
            self._pairs = self._teacher_samples(
                batch, int(p.regression_pairs), int(p.regression_steps), g, "regression"
            )
        noise, y, cond = self._pairs
        dev = self._dev(batch)
        idx = rng.integers(0, noise.shape[0]).cpu()
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


# ---- builder (fewstep.objectives.registry: dmd, dmd2, decoupled_dmd) -------------------------
def build(params: DMDParams | dict | None, teacher: Denoiser, ctx: Any) -> DMDObjective:
    """The registry's builder for dmd, dmd2 and decoupled_dmd (the variant is in `params`); the
    checks against the run and the networks are made in `dmd_build.build_dmd`."""
    from .dmd_build import build_dmd

    if not isinstance(params, DMDParams):
        params = params_from_dict(params)
    return build_dmd(params, teacher, ctx)


def context(**kw: Any) -> SimpleNamespace:
    """A minimal build context (tests, scripts): latent_shape, has_real_data, seed, device, ..."""
    base = dict(latent_shape=(4, 8, 8), num_classes=None, has_real_data=False, seed=0, device=None)
    base.update(kw)
    return SimpleNamespace(**base)
