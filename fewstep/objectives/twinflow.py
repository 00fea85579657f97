"""TwinFlow: self-adversarial any-step flows, one network, no frozen teacher, no discriminator
(Cheng et al. 2025; authors' code inclusionAI/TwinFlow, src/methodes/twinflow/twinflow.py).

One network u(x_t, t, r) predicts the flow velocity that carries x_t at time t to time r
(x_r = x_t + (r - t) u; r = t is ordinary flow matching, r = 0 the one-step map). It starts as the
teacher: the target time r enters the time embedding through a zero-initialised term that vanishes
at r = t (`_two_time`, mode "gap"). Negative times are its second half: u(x, -t, -t) is trained as
the flow of the network's own one-step samples (the "fake" flow), so no separate fake score or
discriminator is held. The maths is written in flow coordinates (x_t = (1 - t) x0 + t eps,
v = eps - x0); a VP teacher is reached through the adapter's same-SNR conversion (`FlowView`), so
nothing here asks the prediction type.

Each global batch of real latents x0 (data.batch_size >= 4) is split into four equal parts by
the samples' positions i in it (part i mod 4), so the split does not depend on how the batch is
spread over processes and micro-batches:

    e2e   t = 1, r = 0                  the one-step map
    mul   r = t - U t / 20              near-flow-matching (short hops)
    any   r ~ U[0, t]                   any-step hops
    adv   x0 <- the network's own one-step samples (no grad); times (-t, -t): the fake flow

Targets (no grad; z ~ N(0, I), x_t = (1 - t) x0 + t z; u_tgt is the target network, below):
    v      = z - x0, enhanced on conditional samples with enhance_t_min < t < enhance_t_max (strict,
             as the authors': the e2e rows at t = 1 get none) by r_cfg (u_tgt,c - u_tgt,u) at
             (x_t, t, t), the network's own guided direction, r_cfg = 1 - 1 / guidance (at the
             fixed point the conditional output is CFG at `guidance` over the unconditional one,
             which a share `uncond_prob` of label-dropped mul and any samples keeps honest; the
             e2e rows, which carry the DM term, and the adv rows keep their labels)
    RCGM   (recursive consistency, non-adv parts): x' = x_t - d v at t' = max(t - d, r); P = the
           displacement of N no-grad hops of u_tgt from t' to r; res = ((t - r) u - P) / d - v
           (for t - r < d: u - v); target = sg(u - clamp(res, -1, 1))
    loss   = mean_b[ barron(u, target) * (tan((1 - (|t| - |r|)) pi / 2.5) + 1) ]   (adv weight 1)
DM term on the e2e part: x_hat = the one-step sample; tau ~ U(0, 1), x_tau = (1 - tau) x_hat + tau z';
    F_grad = clamp(u(x_tau, -tau, -tau) - u(x_tau, tau, tau), -1, 1)        (fake minus real, no grad)
    loss  += dm_weight * barron(u_e2e, sg(u_e2e - F_grad))

The negative-time branch is trained by the adv part only; the DM term reads it without grad.

The target network u_tgt (the authors' `self.mod`, used for the enhancement and the RCGM hops
only; the gradient forward, the adv samples and the DM pair use the live network): with
target_ema > 0 a frozen copy of the network (role "target": no optimizer group, requires_grad
False, checkpointed with the other networks, never exported), updated after every generator step
k = 0, 1, ... (`after_step`) as target <- c target + (1 - c) live with c = c_{k+1} of the authors'
warm-up c_0 = 0, c_{j+1} = c_j + (1 - c_j)(target_ema - c_j) / 2 (their `cmd`, advanced by each
update; c_0 = 0 is the copy at the start). For 0.99: 0.495, 0.620, 0.690, ..., 0.856 at update 10,
0.976 at 100, 0.989 at 500, toward 0.99. The authors update before the targets of each step from
the weights after the previous step's optimizer step, so the targets of step k see the same copy
here; the one difference is a skipped (non-finite) step, which here makes no update and there
one more. target_ema 0 uses the live network (their ema_decay_rate 0, the Qwen-Image setting).
Sampling (any step count >= 1): x0_hat = the r = 0 prediction at each time, fresh noise between
steps (the authors' "few" style with stochast_ratio 1), times linspace(1, sampling_end, n) then 0;
the r = 0 setting folds into the stock time embedding, so the exported pipeline is the teacher's
class with a stock flow scheduler.

Differences from the authors' code, on purpose: the CFG enhancement is parameterised by the scale
it converges to; label dropout (of the mul and any rows) is part of the objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Cond, cat_cond
from ..denoiser import Denoiser
from ..paths import FlowPath, _bcast
from ..randomness import SampleDraws
from ..training.lora import copy_backbone
from ._two_time import TwoTimeDenoiser
from .base import Batch, checked_params, ema_toward, refuse_settings, unwrap

__all__ = ["FlowView", "TwinFlow", "TwinFlowParams", "barron", "build", "sampling_times", "target_decay"]

PARTS = ("e2e", "mul", "any", "adv")


@dataclass
class TwinFlowParams:
    guidance: float = 1.25  # CFG scale the self-enhanced target converges to (Imagen form); 1: none
    enhance_t_min: float = 0.0  # open flow-time range of the CFG enhancement (authors: [0, 1]):
    enhance_t_max: float = 1.0  # enhance_t_min < t < enhance_t_max, so never the e2e rows at t = 1
    uncond_prob: float = 0.1  # label dropout of the mul and any samples (never e2e or adv)
    estimate_order: int = 2  # N: hops of the RCGM target
    rcgm_delta: float = 0.01  # d: the RCGM step
    mul_gap: float = 0.05  # mul part: r = t - U t mul_gap
    dm_weight: float = 0.5  # weight of the distribution-matching term (authors' dist_match_cof)
    barron_c: float = 1e-3  # Barron / pseudo-Huber scale
    num_steps: int = 1  # sampling steps of the run card's default sampler
    sampling_end: float = 0.5  # last non-zero sampling time for n >= 2 steps: linspace(1, this, n)
    target_ema: float = 0.99  # EMA rate of the target network (authors' ema_decay_rate); 0: the live network

    def validate(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"objective.{key}={getattr(self, key)!r}: {msg}")

        if not (math.isfinite(self.guidance) and self.guidance >= 1.0):
            raise bad("guidance", "must be a finite CFG scale >= 1")
        if not 0.0 <= self.enhance_t_min < self.enhance_t_max <= 1.0:
            raise bad("enhance_t_min", "need 0 <= enhance_t_min < enhance_t_max <= 1")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise bad("uncond_prob", "must lie in [0, 1)")
        if not isinstance(self.estimate_order, int) or self.estimate_order < 1:
            raise bad("estimate_order", "needs an integer >= 1")
        if not 0.0 < self.rcgm_delta < 0.5:
            raise bad("rcgm_delta", "must lie in (0, 0.5)")
        if not 0.0 < self.mul_gap <= 1.0:
            raise bad("mul_gap", "must lie in (0, 1]")
        if not self.dm_weight >= 0:
            raise bad("dm_weight", "must be >= 0")
        if not self.barron_c > 0:
            raise bad("barron_c", "must be > 0")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise bad("num_steps", "needs an integer >= 1")
        if not 0.0 < self.sampling_end < 1.0:
            raise bad("sampling_end", "must lie in (0, 1)")
        if not 0.0 <= self.target_ema < 1.0:
            raise bad("target_ema", "must lie in [0, 1) (0: the live network is the target)")


def barron(pred: Tensor, target: Tensor, c: float = 1e-3) -> Tensor:
    """Per-sample Barron-reweighted L2 with alpha = 1 (the authors' default): mse / sqrt(mse / c^2 + 1)
    / c with the weight detached, i.e. about sqrt(mse) for mse >> c^2, and the gradient of mse
    scaled by that weight."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    weight = (mse / (c * c) + 1.0).pow(-0.5).detach()
    return mse * weight / c


def target_decay(k: int, rate: float, start: tuple[int, float] = (0, 0.0)) -> float:
    """The decay c_k of the target network's k-th EMA update: the authors' warm-up c_0 = 0,
    c_{j+1} = c_j + (1 - c_j)(rate - c_j) / 2 (continued from `start` = (j, c_j), j <= k)."""
    j, c = start
    if j > k:
        raise ValueError(f"target_decay: cannot continue from update {j} back to {k}")
    for _ in range(k - j):
        nxt = c + (1.0 - c) * (rate - c) / 2.0
        if nxt == c:  # converged to rate in floating point
            break
        c = nxt
    return c


def _frozen_copy(net: nn.Module, share_frozen: bool) -> nn.Module:
    """A frozen (requires_grad False) copy of `net` for the target network: a TwoTimeDenoiser is
    rebuilt around a copy of its backbone (path and conditioner shared, as copy_denoiser does);
    with share_frozen the copy reuses the tensors `net` does not train (LoRA base weights) and its
    buffers, which never change (`lora.copy_backbone`)."""
    net = unwrap(net)
    if isinstance(net, TwoTimeDenoiser):
        bb = copy_backbone(net.backbone, share_frozen)
        out: nn.Module = TwoTimeDenoiser(bb, net.path, net.conditioner, mode=net.mode)
    else:
        out = copy_backbone(net, share_frozen)
    return out.requires_grad_(False)


def sampling_times(n: int, end: float = 0.5) -> list[float]:
    """[1, ..., end] (n evenly spaced times) then 0; one step is [1, 0]."""
    if n == 1:
        return [1.0, 0.0]
    return [1.0 - (1.0 - end) * i / (n - 1) for i in range(n)] + [0.0]


class FlowView:
    """A network behind the adapter seen in flow coordinates: velocity v = eps - x0 at flow time s
    for x_s = (1 - s) x0 + s eps, through the same-SNR conversion to the network's own path
    (the identity for a flow teacher). Flow times above the path's noisiest point are clamped to it."""

    def __init__(self, path):
        self.path = path
        self.flow = FlowPath(1000)
        a1, s1 = path.alpha_sigma(torch.ones(1, dtype=torch.float64))
        self.s_max = float(s1 / (a1 + s1))

    def to_path(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """(t_path, scale) with x_path = scale * x_flow at the same SNR."""
        s = s.clamp(0.0, self.s_max)
        ratio = s / (1.0 - s)
        t_p = self.path.t_from_ratio(ratio).clamp(0.0, 1.0)
        a, sig = self.path.alpha_sigma(t_p)
        return t_p, a + sig

    def velocity(
        self, net: nn.Module, x: Tensor, s: Tensor, cond: Cond | None, target: Tensor, sign: Tensor | float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """(v, x0) of net at (x, s) with second time `target` (flow times, (B,))."""
        t_p, scale = self.to_path(s.abs())
        r_p, _ = self.to_path(target.abs())
        x0, eps = net(x * _bcast(scale, x), t_p, cond, output="x0_eps", target=r_p, sign=sign)
        return eps.float() - x0.float(), x0.float()


class TwinFlow:
    """TwinFlow. nets: {"student": the one trained network, "target": its frozen EMA copy (with
    target_ema > 0; share_frozen: the copy reuses the student's frozen tensors)}; one optimizer
    group, "generator" (the student)."""

    def __init__(
        self,
        student: nn.Module,
        params: TwinFlowParams,
        null_cond=None,
        seed: int = 0,
        share_frozen: bool = False,
    ):
        params.validate()
        self.p = params
        self.seed = int(seed)  # per-sample draws (fewstep.randomness)
        self.nets: dict[str, nn.Module] = {"student": student}
        if params.target_ema > 0:
            self.nets["target"] = _frozen_copy(student, share_frozen)
        self.target_role = "target" if params.target_ema > 0 else "student"
        self._decay_at = (0, 0.0)  # (update k, c_k) last computed, so the warm-up is continued, not rerun
        self.groups = {"generator": ["student"]}
        self.path = student.path
        self.view = FlowView(self.path)
        self.null_cond = null_cond  # cond -> unconditional cond (None: no CFG / no dropout)
        self.r_cfg = 1.0 - 1.0 / params.guidance
        by_steps = {str(n): self._times(n) for n in (1, 2, 4)}
        self.sampling = {"times": self._times(params.num_steps), "renoise": "fresh", "times_by_steps": by_steps}

    def _times(self, n: int) -> list[float]:
        """Sampling times on the network's own path (the flow grid, converted at equal SNR)."""
        out = []
        for s in sampling_times(n, self.p.sampling_end):
            t = float(self.view.to_path(torch.tensor([s], dtype=torch.float64))[0]) if 0 < s < 1 else s
            out.append(t)
        return out

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    # ---- pieces ------------------------------------------------------------------------------
    def u(
        self, x: Tensor, t: Tensor, r: Tensor, cond: Cond | None, sign: Tensor | float = 1.0, role: str = "student"
    ) -> Tensor:
        """The velocity of the network `role` ("student", or self.target_role for the targets)."""
        return self.view.velocity(self.nets[role], x, t, cond, r, sign)[0]

    @staticmethod
    def _split(index: Tensor, n: int, device) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Masks of the rows (global positions `index`) in each part (part i mod 4), and each
        part's size in the global batch of n samples."""
        if n < 4:
            raise ValueError(f"data.batch_size: twinflow splits the global batch into 4 parts; got {n} samples")
        part = index.to(device) % 4
        masks = {k: part == j for j, k in enumerate(PARTS)}
        sizes = {k: len(range(j, n, 4)) for j, k in enumerate(PARTS)}
        return masks, sizes

    def _mix_cond(self, cond: Cond | None, drop: Tensor) -> Cond | None:
        if cond is None or self.null_cond is None or not bool(drop.any()):
            return cond
        null = self.null_cond(cond, drop.shape[0])
        out = {}
        for k, v in cond.items():
            if torch.is_tensor(v) and v.ndim > 0:
                out[k] = torch.where(drop.reshape(-1, *([1] * (v.ndim - 1))).to(v.device), null[k].to(v), v)
            else:
                out[k] = v
        return out

    @torch.no_grad()
    def one_step(self, noise: Tensor, cond: Cond | None) -> Tensor:
        b = noise.shape[0]
        ones = torch.ones(b, device=noise.device)
        v = self.u(noise, ones, torch.zeros_like(ones), cond)
        return noise - v

    def enhanced_rows(self, t: Tensor, excluded: Tensor) -> Tensor:
        """The rows whose target gets the CFG enhancement: enhance_t_min < t < enhance_t_max, both
        strict as the authors' (so never the e2e rows at t = 1), less the `excluded` (adv and
        label-dropped) rows."""
        return (~excluded) & (t > self.p.enhance_t_min) & (t < self.p.enhance_t_max)

    @torch.no_grad()
    def _enhance(self, x_t: Tensor, t: Tensor, cond: Cond | None, idx: Tensor) -> Tensor:
        """r_cfg (u_c - u_u) of the target network at (x_t, t, t) for the samples in idx (zeros
        elsewhere), one 2n pass."""
        out = torch.zeros_like(x_t)
        if self.r_cfg == 0.0 or self.null_cond is None or cond is None or not bool(idx.any()):
            return out
        c = {k: (v[idx] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}
        n = int(idx.sum())
        x2, t2 = torch.cat([x_t[idx]] * 2), torch.cat([t[idx]] * 2)
        v2 = self.u(x2, t2, t2, cat_cond(c, self.null_cond(c, n)), role=self.target_role)
        out[idx] = self.r_cfg * (v2[:n] - v2[n:])
        return out

    @torch.no_grad()
    def rcgm_target(self, F: Tensor, v: Tensor, x_t: Tensor, t: Tensor, r: Tensor, cond: Cond | None) -> Tensor:
        """RCGM's recursive target (see the module docstring; the hops by the target network), detached."""
        d, n = self.p.rcgm_delta, self.p.estimate_order
        t_m = (t - d).maximum(r)
        x = x_t - v * d
        disp = torch.zeros_like(x_t)
        for i in range(n):
            t_c = t_m * (1 - i / n) + r * (i / n)
            t_n = t_m * (1 - (i + 1) / n) + r * ((i + 1) / n)
            F_c = self.u(x, t_c, t_n, cond, role=self.target_role)
            step = _bcast(t_c - t_n, x)
            x = x - step * F_c
            disp = disp + step * F_c
        short = t < r + d
        cof_l = torch.where(short, torch.ones_like(t), (t - r) / d)
        cof_r = torch.where(short, 1.0 / (t - r).clamp_min(1e-12), torch.full_like(t, 1.0 / d))
        res = _bcast(cof_l, F) * F - _bcast(cof_r, F) * disp - v
        return F.detach() - res.clamp(-1.0, 1.0)

    @torch.no_grad()
    def dm_direction(self, x_hat: Tensor, cond: Cond | None, tau: Tensor, z: Tensor) -> Tensor:
        """clamp(u_fake - u_real, -1, 1) on x_hat re-noised to tau ~ U(0, 1) (B,) with noise z like
        x_hat: fake = the negative-time branch, real = the positive one (one 2n pass, no grad)."""
        n = x_hat.shape[0]
        x_tau = (1 - _bcast(tau, x_hat)) * x_hat + _bcast(tau, x_hat) * z
        sign = torch.cat([-torch.ones(n), torch.ones(n)]).to(x_hat.device)
        c2 = cat_cond(cond, cond) if cond is not None else None
        v2 = self.u(torch.cat([x_tau, x_tau]), torch.cat([tau, tau]), torch.cat([tau, tau]), c2, sign)
        return (v2[:n] - v2[n:]).clamp(-1.0, 1.0)

    # ---- the loss ----------------------------------------------------------------------------
    def losses(self, batch: Batch, step: int) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Each part's loss (summed by `loss`): e2e, mul, any, adv (flow and RCGM terms, weighted
        means over the whole batch, so their sum is the authors' mean) and dm."""
        x0 = batch.get("x0")
        if x0 is None:
            raise ValueError(
                "twinflow trains on real latents (its flow-matching parts): set data.real_data: true "
                "(or data.real_latents)"
            )
        p = self.p
        x0 = x0.float()
        b, dev = x0.shape[0], x0.device
        cond = batch.get("cond")
        n = int(batch.get("global_batch_size", b))
        index = batch.get("index")
        index = torch.arange(b) if index is None else index
        masks, sizes = self._split(index, n, dev)
        # every draw is per sample (fewstep.randomness), all made here in one order, for all rows
        rng = SampleDraws.for_batch(batch, self.seed, step, "twinflow", dev, rows=b)
        t, u_r, u_mul, u_drop = (rng.uniform() for _ in range(4))
        eps_adv, z, tau_dm, z_dm = rng.normal_like(x0), rng.normal_like(x0), rng.uniform(), rng.normal_like(x0)
        r = t - u_r * t
        t_min = t - u_mul * t * p.mul_gap
        t = torch.where(masks["e2e"], torch.ones_like(t), t)
        r = torch.where(masks["e2e"], torch.zeros_like(r), r)
        r = torch.where(masks["mul"], t_min, r)
        adv = masks["adv"]
        # label dropout on the mul and any rows only: the e2e rows carry the DM term (as the
        # authors', whose steerers drop no labels) and the fake flow is learnt conditional
        drop = (u_drop < p.uncond_prob) & ~adv & ~masks["e2e"]
        cond_m = self._mix_cond(cond, drop)
        x = x0.clone()
        with torch.no_grad():
            if adv.any():  # the network's own one-step samples, for its negative-time flow
                ca = (
                    {k: (v[adv] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}
                    if cond is not None
                    else None
                )
                x[adv] = self.one_step(eps_adv[adv], ca)
            x_t = (1 - _bcast(t, x)) * x + _bcast(t, x) * z
            v = z - x
            v = v + self._enhance(x_t, t, cond_m, self.enhanced_rows(t, adv | drop))
        sign = torch.where(adv, -torch.ones_like(t), torch.ones_like(t))
        r_in = torch.where(adv, t, r)  # the fake flow: (-t, -t)
        F = self.u(x_t, t, r_in, cond_m, sign)
        target = v.clone()
        if (~adv).any():
            na = ~adv
            ca = (
                {k: (vv[na] if torch.is_tensor(vv) and vv.ndim > 0 else vv) for k, vv in cond_m.items()}
                if cond_m is not None
                else None
            )
            target[na] = self.rcgm_target(F[na], v[na], x_t[na], t[na], r[na], ca)
        weight = torch.tan((1 - (t - r)) * math.pi / 2.5) + 1
        weight = torch.where(adv, torch.ones_like(weight), weight)
        per = barron(F, target, p.barron_c) * weight
        parts = {k: (per * m).sum() / b for k, m in masks.items()}
        logs = {f"loss_{k}": float(parts[k].detach()) for k in PARTS}
        e2e = masks["e2e"]
        if p.dm_weight > 0 and e2e.any():
            ce = (
                {k: (vv[e2e] if torch.is_tensor(vv) and vv.ndim > 0 else vv) for k, vv in cond_m.items()}
                if cond_m is not None
                else None
            )
            F_e = F[e2e]
            x_hat = (x_t[e2e] - F_e).detach()  # t = 1: x0_hat = x_1 - u
            g = self.dm_direction(x_hat, ce, tau_dm[e2e], z_dm[e2e])
            # the mean over the global batch's e2e part: this batch's e2e rows are a share
            # b / n of the global batch (the entry point weights a batch's loss by that share)
            per_e = barron(F_e, (F_e - g).detach(), p.barron_c)
            parts["dm"] = p.dm_weight * per_e.sum() * n / (sizes["e2e"] * b)
            logs["dm_grad_abs"] = float(g.abs().mean())
            logs["loss_dm"] = float(parts["dm"].detach())
        return parts, logs

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"twinflow has one phase, 'generator'; got {phase!r}")
        parts, logs = self.losses(batch, step)
        total = sum(parts.values())
        logs["loss"] = float(total.detach())
        return total, logs

    # ---- the target network ------------------------------------------------------------------
    def target_decay(self, k: int) -> float:
        """c_k, the decay of the target's k-th update (see the module docstring)."""
        start = self._decay_at if self._decay_at[0] <= k else (0, 0.0)
        c = target_decay(k, self.p.target_ema, start)
        self._decay_at = (k, c)
        return c

    @torch.no_grad()
    def after_step(self, phase: str, step: int) -> None:
        """After the generator's update at `step` (0-based): target <- c target + (1 - c) live with
        c = c_{step + 1}, over the parameters the student trains (its frozen ones are never
        changed). Both networks are reached through `unwrap`, so wrappers do not matter."""
        if phase != "generator" or self.target_role == "student":
            return
        ema_toward(self.nets["target"], self.nets["student"], self.target_decay(step + 1), trainable_only=True)


def build(params: TwinFlowParams | dict[str, Any] | None, teacher: Denoiser, ctx: Any) -> TwinFlow:
    """The registry's builder. The network is the teacher's own backbone, trained in place (one set
    of trained weights in the run; the entry point's teacher handle shares it), or with lora.student
    a LoRA copy on the teacher's frozen weights; with objective.target_ema > 0 a frozen EMA copy of
    it besides (sharing its frozen tensors unless the run is sharded). Refuses a backbone whose time
    embedding cannot take the target time (naming teacher.source), activation checkpointing and
    runs without real data."""
    params = checked_params(params, TwinFlowParams)
    refuse_settings(
        ctx,
        gradient_checkpointing="precision.gradient_checkpointing: twinflow's target-time input is set per call "
        "and would be wrong in the recomputation; turn it off",
    )
    if not getattr(ctx, "has_real_data", True):
        raise ValueError(
            "data.real_data: twinflow trains on real latents (its flow-matching parts); set "
            "data.real_data: true (or data.real_latents)"
        )
    lora = getattr(ctx, "lora", None)
    if lora is not None and getattr(lora, "student", False):
        made = ctx.make_student(teacher)
        bb = made.backbone
    else:
        bb = unwrap(teacher).backbone
        bb.float().requires_grad_(True)
    student = TwoTimeDenoiser(bb, teacher.path, teacher.conditioner, mode="gap")
    cnd = teacher.conditioner
    null = None
    if params.guidance != 1.0 or params.uncond_prob > 0:
        if getattr(cnd, "guidance_embedded", False):
            raise ValueError(
                "objective.guidance / objective.uncond_prob: this teacher is guidance-distilled (no "
                "unconditional branch); set objective.guidance: 1 and objective.uncond_prob: 0"
            )
        null = cnd.null
    share = not bool(getattr(ctx, "sharded", False))  # FSDP shards each network's own tensors
    return TwinFlow(student, params, null_cond=null, seed=int(getattr(ctx, "seed", 0)), share_frozen=share)
