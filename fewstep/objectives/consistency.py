"""Latent consistency distillation (LCM, Luo et al. 2023), discrete skipping-step form.

    t_{n+k} on the grid {k, 2k, ..., N} / N (k = N / num_ddim_timesteps), t_n = t_{n+k} - k/N
    x     = add_noise(x0, eps, t_{n+k})          x0 real, or the teacher's own trajectory (data-free)
    pred  = f_student(x, t_{n+k})                f = c_skip x + c_out x0(net), scalings on the native
                                                  timestep as LCMScheduler computes them
    x_n   = DDIM(x, teacher CFG x0, t_{n+k} -> t_n), per-sample guidance w ~ U[w_min, w_max]
    loss  = pseudo_huber(pred, sg f_target(x_n, t_n))   (or L2), target = EMA of the student

f is exactly the identity at t = 0 (c_skip = 1, c_out = 0), and an exported LCMScheduler pipeline
applies the same scalings to the student's native output, so it reproduces f. The LoRA variant
(student backbone carries peft adapters) runs the teacher as the same network with the adapters
disabled and uses the student itself, without grad, as the target (LCM-LoRA has no EMA net).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..families import all_families, family_of
from ..paths import _bcast
from ..randomness import SampleDraws
from . import _maths
from .base import Batch, ema_toward, freeze

__all__ = [
    "LCMParams",
    "LCMObjective",
    "build",
    "boundary_scalings",
    "lcm_timesteps",
    "guidance_scale_embedding",
    "add_guidance_embedding",
    "has_adapters",
    "adapters_disabled",
]


@dataclass
class LCMParams:
    num_ddim_timesteps: int = 50  # skipping-step grid of the teacher solver (k = N / this = 20)
    guidance_min: float = 6.0  # teacher CFG scale range, Imagen form u + w(c-u); LCM's w in
    guidance_max: float = 16.0  #   [5, 15] of its c + w(c-u) form is [6, 16] here
    loss_type: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001  # pseudo-Huber constant c
    ema_decay: float = 0.95  # EMA rate of the target network (full fine-tuning only)
    timestep_scaling: float = 10.0  # boundary scalings on timestep * this (LCMScheduler)
    sigma_data: float = 0.5  # sigma_data of the boundary scalings (LCMScheduler)
    guidance_embedding: str = "auto"  # "auto": feed the w-embedding where the backbone has
    #   time_cond_proj_dim; "off": never
    add_guidance_embedding: int = 0  # >0: give the student a zero-initialised w-embedding of this
    #   size (LCM uses 256), where its family has the hook
    sample_guidance: float = 8.5  # CFG scale embedded at sampling by a w-conditioned student
    data_source: str = "auto"  # "real" (batch x0), "teacher" (data-free trajectories), "auto"
    trajectory_steps: int = 8  # teacher DDIM steps from noise to t_{n+k} (data-free)
    num_steps: int = 4  # student sampling steps (1, 2 or 4 are the usual)
    sampling_timesteps: list[int] | None = None  # native indices to sample at; None: LCMScheduler's rule

    def validate(self) -> None:
        _check(self)


def lcm_timesteps(num_steps: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """LCMScheduler.set_timesteps(num_steps)'s native indices: evenly spaced picks from the
    skipping-step grid, e.g. 4 -> [999, 759, 499, 259], 2 -> [999, 499], 1 -> [999]."""
    k = num_train_timesteps // num_ddim_timesteps
    grid = (np.arange(1, num_ddim_timesteps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, num_ddim_timesteps, num=num_steps, endpoint=False)).astype(np.int64)
    return [int(i) for i in grid[picks]]


def boundary_scalings(
    path, t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete, computed on
    the path's native timestep of t (clamped to 0 at t = 0, where c_skip = 1 and c_out = 0)."""
    ts = path.timestep(t.double() if t.dtype == torch.float64 else t.float()) * timestep_scaling
    c_skip = sigma_data**2 / (ts**2 + sigma_data**2)
    c_out = ts / (ts**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """The sinusoidal w-embedding that LCM pipelines feed as `timestep_cond` (w = scale - 1,
    multiplied by 1000; sin half then cos half, zero-padded to an odd size)."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) / (half - 1) * torch.arange(half, dtype=torch.float32))
    arg = w[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def add_guidance_embedding(student: Denoiser, dim: int = 256) -> Denoiser:
    """Give a student a w-embedding input of size `dim` through its family's hook
    (`Family.w_embedding`; the text UNets: `time_cond_proj_dim`), zero-initialised so the
    student starts as the teacher; the config records it for export."""
    bb = student.backbone
    fam = family_of(bb)
    if fam is None or fam.w_embedding is None:
        able = ", ".join(f"{f.name} ({'/'.join(f.backbone_classes)})" for f in all_families() if f.w_embedding)
        what = "of no known family" if fam is None else f"of the {fam.name} family"
        raise ValueError(
            f"objective.add_guidance_embedding: {type(bb).__name__} is {what}, which has no "
            f"w-embedding hook; families with one: {able}"
        )
    fam.w_embedding(bb, int(dim))
    return student


def _backbone(net: nn.Module) -> nn.Module:
    m = getattr(net, "module", net)  # DDP / FSDP wrappers
    return getattr(m, "backbone", m)


def _w_embedding_dim(net: nn.Module) -> int | None:
    cfg = getattr(_backbone(net), "config", None)
    dim = getattr(cfg, "time_cond_proj_dim", None) if cfg is not None else None
    return int(dim) if dim else None


def has_adapters(net: nn.Module) -> bool:
    """True where the backbone carries peft (LoRA) adapter layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in _backbone(net).modules())


@contextlib.contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[None]:
    """Run the base network of a LoRA model (the teacher of LCM-LoRA); restores the adapters and
    their requires_grad flags on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in _backbone(net).modules() if isinstance(m, BaseTunerLayer)]
    flags = {id(p): p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
            for p in m.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))


class LCMObjective:
    """LCM-style consistency distillation; see the module docstring.

    nets: "student" (trained), "teacher" (frozen), "target" (EMA of the student; absent in the
    LoRA variant). One optimizer group, "generator" (the student), updated every step.
    """

    def __init__(
        self,
        params: LCMParams,
        teacher: Denoiser,
        student: Denoiser,
        target: Denoiser | None = None,
        has_real_data: bool = True,
        seed: int = 0,
    ):
        p = params
        self.seed = int(seed)  # per-sample draws (fewstep.randomness)
        _check(p)
        self.p = p
        self.path = teacher.path
        self.lora = has_adapters(student)
        freeze(teacher)
        self.nets: dict[str, nn.Module] = {"student": student, "teacher": teacher}
        if not self.lora:
            if target is None:
                raise ValueError("LCM without LoRA needs a target network (an EMA copy of the student)")
            freeze(target)
            target.load_state_dict(student.state_dict())
            self.nets["target"] = target
        self.groups = {"generator": ["student"]}
        if p.data_source == "auto":
            self.data_source = "real" if has_real_data else "teacher"
        else:
            self.data_source = p.data_source
        if self.data_source == "real" and not has_real_data:
            raise ValueError(
                "objective.data_source='real' needs real data (the data set has none); "
                "use 'teacher' for data-free trajectories"
            )
        self.w_dim = _w_embedding_dim(student) if p.guidance_embedding == "auto" else None
        self.num_train_timesteps = int(getattr(self.path, "num_train_timesteps", 1000))
        if self.num_train_timesteps % p.num_ddim_timesteps:
            raise ValueError(
                f"objective.num_ddim_timesteps={p.num_ddim_timesteps} must divide the "
                f"teacher's {self.num_train_timesteps} training timesteps"
            )
        self.sampling = self._sampling()

    # ---- sampling ---------------------------------------------------------------------------
    def sampling_times(self, num_steps: int) -> list[float]:
        """Student sampling times (t = (index + 1) / N, then 0) for `num_steps` steps."""
        if num_steps == self.p.num_steps and self.p.sampling_timesteps:
            idx = list(self.p.sampling_timesteps)
        else:
            idx = lcm_timesteps(num_steps, self.p.num_ddim_timesteps, self.num_train_timesteps)
        return [(i + 1) / self.num_train_timesteps for i in idx] + [0.0]

    def _sampling(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "times": self.sampling_times(self.p.num_steps),
            "renoise": "fresh",
            "times_by_steps": {str(n): self.sampling_times(n) for n in (1, 2, 4)},
        }
        if self.w_dim:
            s["guidance_embedding"] = {"key": "timestep_cond", "dim": self.w_dim, "guidance": self.p.sample_guidance}
        return s

    def student_cond(self, cond: Cond | None, guidance: Tensor) -> Cond | None:
        """The student's condition: with the w-embedding where the backbone takes one."""
        if not self.w_dim:
            return cond
        return {**(cond or {}), "timestep_cond": guidance_scale_embedding(guidance - 1.0, self.w_dim)}

    # ---- the protocol -----------------------------------------------------------------------
    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def consistency_fn(self, net: nn.Module, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0(net(x, t)), float32."""
        c_skip, c_out = boundary_scalings(self.path, t, self.p.timestep_scaling, self.p.sigma_data)
        x0 = net(x, t, cond, 1.0, output="x0")
        return _bcast(c_skip, x0) * x.to(x0.dtype) + _bcast(c_out, x0) * x0

    def _teacher_x0(self, x: Tensor, t: Tensor, cond: Cond | None, guidance: Tensor | float) -> Tensor:
        with torch.no_grad():
            if self.lora:
                with adapters_disabled(self.nets["student"]):
                    return self.nets["student"](x, t, cond, guidance, output="x0")
            return self.nets["teacher"](x, t, cond, guidance, output="x0")

    def _teacher_trajectory(self, noise: Tensor, t_end: Tensor, cond: Cond | None, guidance: Tensor | float) -> Tensor:
        """Data-free points: the teacher's CFG DDIM run from pure noise (t = 1) to each sample's
        own t_end in `trajectory_steps` even steps, without grad."""
        x = noise * self.path.init_noise_sigma
        n = self.p.trajectory_steps
        for j in range(n):
            t_a = 1.0 - (1.0 - t_end) * (j / n)
            t_b = 1.0 - (1.0 - t_end) * ((j + 1) / n)
            x0 = self._teacher_x0(x, t_a, cond, guidance)
            x = self.path.ddim_step(x, x0, t_a, t_b)
        return x

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"LCM has one phase, 'generator'; got {phase!r}")
        p = self.p
        cond = batch.get("cond")
        x0 = batch.get("x0")
        shape = tuple(x0.shape) if (x0 is not None and self.data_source == "real") else tuple(batch["shape"])
        b = shape[0]
        dev = x0.device if x0 is not None else _device(self.nets["student"])
        k = self.num_train_timesteps // p.num_ddim_timesteps
        rng = SampleDraws.for_batch(batch, self.seed, step, "lcm", dev, rows=b)
        n = rng.integers(1, p.num_ddim_timesteps + 1)
        t_start = (n * k).double() / self.num_train_timesteps  # index n k - 1 -> t = n k / N
        t_end = ((n - 1) * k).double() / self.num_train_timesteps  # t_end = 0 on the first cell
        t_start, t_end = t_start.float(), t_end.float()
        guidance = rng.uniform(low=p.guidance_min, high=p.guidance_max)
        # one fixed scale goes to the teacher as a number, so guidance 1 takes the Denoiser's
        # conditional-only path (one pass, no null condition); the w-embedding keeps the tensor
        w_teacher: Tensor | float = float(p.guidance_min) if p.guidance_min == p.guidance_max else guidance

        if self.data_source == "real":
            if x0 is None:
                raise ValueError("LCM with data_source 'real' needs batch['x0'] (real latents)")
            eps = rng.normal_like(x0.float())
            x = self.path.add_noise(x0, eps, t_start)
        else:
            x = self._teacher_trajectory(rng.normal(*shape[1:]), t_start, cond, w_teacher)

        s_cond = self.student_cond(cond, guidance)
        pred = self.consistency_fn(self.nets["student"], x, t_start, s_cond)
        with torch.no_grad():
            x0_teacher = self._teacher_x0(x, t_start, cond, w_teacher)
            x_prev = self.path.ddim_step(x, x0_teacher, t_start, t_end)
            target_net = self.nets["student"] if self.lora else self.nets["target"]
            target = self.consistency_fn(target_net, x_prev, t_end, s_cond)
        if p.loss_type == "huber":
            per = _maths.pseudo_huber(pred, target, p.huber_c)
        else:
            per = _maths.mse_per_sample(pred, target)
        loss = per.mean()
        return loss, {
            "loss": float(loss.detach()),
            "t_mean": float(t_start.mean()),
            "guidance_mean": float(guidance.mean()),
        }

    @torch.no_grad()
    def after_step(self, phase: str, step: int) -> None:
        """EMA target update: target <- mu target + (1 - mu) student (full fine-tuning only)."""
        if self.lora or phase != "generator":
            return
        ema_toward(self.nets["target"], self.nets["student"], self.p.ema_decay)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _check(p: LCMParams) -> None:
    if p.loss_type not in ("huber", "l2"):
        raise ValueError(f"objective.loss_type={p.loss_type!r} must be 'huber' or 'l2'")
    if not 0 < p.guidance_min <= p.guidance_max:
        raise ValueError(
            f"objective.guidance_min={p.guidance_min} and guidance_max={p.guidance_max} "
            "need 0 < guidance_min <= guidance_max"
        )
    if not 0.0 <= p.ema_decay < 1.0:
        raise ValueError(f"objective.ema_decay={p.ema_decay} must lie in [0, 1)")
    if p.data_source not in ("auto", "real", "teacher"):
        raise ValueError(f"objective.data_source={p.data_source!r} must be 'auto', 'real' or 'teacher'")
    if p.guidance_embedding not in ("auto", "off"):
        raise ValueError(f"objective.guidance_embedding={p.guidance_embedding!r} must be 'auto' or 'off'")
    if p.num_ddim_timesteps < 1 or p.trajectory_steps < 1:
        raise ValueError("objective.num_ddim_timesteps and objective.trajectory_steps must be >= 1")
    if p.num_steps < 1:
        raise ValueError(f"objective.num_steps={p.num_steps} must be >= 1")
    if p.sampling_timesteps is not None:
        ts = list(p.sampling_timesteps)
        if len(ts) != p.num_steps:
            raise ValueError(
                f"objective.num_steps={p.num_steps} needs objective.sampling_timesteps with "
                f"{p.num_steps} entries, got {ts}"
            )
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"objective.sampling_timesteps must be strictly decreasing, got {ts}")
    if p.huber_c < 0 or p.timestep_scaling <= 0 or p.sigma_data <= 0:
        raise ValueError("objective.huber_c must be >= 0, timestep_scaling and sigma_data > 0")


def build(params: LCMParams, teacher: Denoiser, ctx: Any) -> LCMObjective:
    """Registry builder: student from ctx.make_student (a LoRA student switches to the LoRA
    variant); the EMA target is a plain frozen copy of the student (not ctx.make_copy: a LoRA
    copy would share the student's trained weights, which an average must not)."""
    from ..denoiser import copy_denoiser

    _check(params)
    student = ctx.make_student(teacher)
    if params.add_guidance_embedding:
        add_guidance_embedding(student, params.add_guidance_embedding)
    target = None
    if not has_adapters(student):
        target = copy_denoiser(student, trainable=False)
    return LCMObjective(
        params,
        teacher,
        student,
        target,
        has_real_data=bool(getattr(ctx, "has_real_data", True)),
        seed=int(getattr(ctx, "seed", 0)),
    )
