"""MSD: multi-student distillation (Song et al. 2024). K one-step students, student k distilled
with DMD2 (with or without its GAN term) on its own subset of the conditions only; at inference
each condition is routed to its student.

The training entry point runs the K students one after another, each as an ordinary run in a
subfolder of the run dir with `data.conditions` set to its subset (`fewstep.msd.train`); this
module is one student's objective:

    same-size students   initialised from the teacher (`ctx.make_student`), then DMD2: the DM
                         gradient g = (x0_fake - x0_real_cfg) / mean|x_hat - x0_real_cfg|
                         (`dmd.DMDObjective`) plus, with `gan`, lambda_G softplus(-D(x_hat)).
    smaller students     (`student_width` / `student_depth` < 1) a narrower / shallower copy of the
                         teacher's architecture (`fewstep.msd.small`), trained in three stages:
        1. score-matching pre-training, steps [0, pretrain_steps): the student as a denoiser matches
           the teacher's native output on noised inputs,
               L_SM = mean || s(x_t, t, c) - sg(teacher(x_t, t, c)) ||^2,  x_t = alpha x + sigma eps,
           t ~ U[fake_t_min, 1], x real latents when the run has them, else the teacher's own
           deterministic samples (`pretrain_teacher_steps` steps, CFG `guidance`);
        2. distribution matching (DMD2 without the GAN term) until `gan_start_step`;
        3. distribution matching plus the adversarial term (when `gan: true`).
    Same-size students skip stage 1, and their GAN term is on from the start unless
    `gan_start_step` says otherwise.

Keys under `objective:` are DMD2's (`dmd.DMDParams`) plus those below; `student_index` is set by
the entry point for each student's sub-run, never by a preset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..randomness import SampleDraws
from ._maths import dsm_loss
from .base import Batch, checked_params
from .dmd import DMDObjective, DMDParams
from .dmd_build import build_dmd

__all__ = ["MSDParams", "MSDStudentObjective", "build"]


@dataclass
class MSDParams(DMDParams):
    """DMD2's keys plus the multi-student ones (flat under `objective:`)."""

    num_students: int = 2  # K one-step students
    partition: str = "auto"  # auto (even for class labels, hash for text) | even | hash | kmeans | mapping
    partition_file: str | None = None  # mapping: JSON {"0": [conditions], "1": [...]} (labels / prompts / lines)
    partition_seed: int = 0  # kmeans initialisation seed
    student_width: float = 1.0  # < 1: a narrower copy of the teacher's architecture
    student_depth: float = 1.0  # < 1: a shallower copy
    pretrain_steps: int | None = None  # score-matching pre-training of small students (None: 0 for
    #   same-size students, a fifth of the steps for smaller ones)
    pretrain_teacher_steps: int = 8  # data-free pre-training inputs: teacher sampler steps
    gan_start_step: int | None = None  # step the GAN term starts (None: after pre-training for same-size
    #   students; halfway through the distillation for smaller ones)
    student_index: int | None = None  # set by the entry point per student's sub-run

    @property
    def smaller(self) -> bool:
        return self.student_width < 1 or self.student_depth < 1

    def validate(self) -> None:
        if self.variant != "dmd2":
            raise ValueError(f"objective.variant={self.variant!r}: MSD students are trained with DMD2 (variant dmd2)")
        super().validate()
        if int(self.num_students) < 1:
            raise ValueError(f"objective.num_students={self.num_students} must be >= 1")
        if self.partition not in ("auto", "even", "hash", "kmeans", "mapping"):
            raise ValueError(f"objective.partition={self.partition!r} must be one of auto, even, hash, kmeans, mapping")
        if self.partition == "mapping" and not self.partition_file:
            raise ValueError("objective.partition='mapping' needs objective.partition_file (JSON {\"0\": [...], ...})")
        for key in ("student_width", "student_depth"):
            v = getattr(self, key)
            if not 0 < v <= 1:
                raise ValueError(f"objective.{key}={v} must lie in (0, 1] (1: the teacher's size)")
        if self.pretrain_steps is not None and int(self.pretrain_steps) < 0:
            raise ValueError(f"objective.pretrain_steps={self.pretrain_steps} must be >= 0")
        if int(self.pretrain_teacher_steps) < 1:
            raise ValueError("objective.pretrain_teacher_steps must be >= 1")
        if self.gan_start_step is not None and int(self.gan_start_step) < 0:
            raise ValueError(f"objective.gan_start_step={self.gan_start_step} must be >= 0")
        if self.student_index is not None and not 0 <= int(self.student_index) < int(self.num_students):
            raise ValueError(
                f"objective.student_index={self.student_index} must lie in 0..{int(self.num_students) - 1}"
            )

    def stages(self, steps: int) -> tuple[int, int]:
        """(pre-training steps, first step of the GAN term) for a run of `steps` steps."""
        pre = int(self.pretrain_steps) if self.pretrain_steps is not None else (steps // 5 if self.smaller else 0)
        if self.gan_start_step is not None:
            gan = int(self.gan_start_step)
        else:
            gan = pre + (steps - pre) // 2 if self.smaller else pre
        return pre, max(gan, pre)

    def dmd_params(self) -> DMDParams:
        own = {f.name for f in dataclasses.fields(DMDParams)}
        return DMDParams(**{k: v for k, v in dataclasses.asdict(self).items() if k in own})


class MSDStudentObjective:
    """One MSD student: score-matching pre-training (smaller students), then DMD2, then DMD2 with
    its GAN term. Networks, groups and sampler are the wrapped DMD2 objective's.

    Args:
        params:  MSDParams (validated).
        dmd:     the DMD2 objective over this student (built with the GAN head when params.gan).
        pretrain_steps, gan_start: the stage boundaries (`MSDParams.stages`).
    """

    def __init__(
        self,
        params: MSDParams,
        dmd: DMDObjective,
        pretrain_steps: int,
        gan_start: int,
        student_info: dict[str, Any] | None = None,
    ):
        self.p = params
        self.dmd = dmd
        self.nets = dmd.nets  # the same dict: wrappers the entry point sets reach both
        self.groups = dmd.groups
        self.sampling = dmd.sampling
        self.path = dmd.path
        self.pretrain_steps = int(pretrain_steps)
        self.gan_start = int(gan_start)
        self.student_info = student_info or {}
        self._p_nogan = dataclasses.replace(dmd.p, gan=False)
        self._p_gan = dmd.p

    def stage(self, step: int) -> str:
        if step < self.pretrain_steps:
            return "pretrain"
        return "dm+gan" if self.p.gan and step >= self.gan_start else "dm"

    def phases(self, step: int) -> list[str]:
        if step < self.pretrain_steps:
            return ["generator"]
        return self.dmd.phases(step - self.pretrain_steps)

    @contextmanager
    def _gan(self, on: bool) -> Iterator[None]:
        self.dmd.p = self._p_gan if on else self._p_nogan
        try:
            yield
        finally:
            self.dmd.p = self._p_gan

    def pretrain_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """L_SM: the student, as a denoiser at any t, matches the teacher's native output."""
        teacher, student = self.nets["teacher"], self.nets["student"]
        cond = batch.get("cond")
        rng = self.dmd.draws(batch, step, "msd_pretrain")
        x = batch.get("x0")
        if x is None:
            x = self._teacher_samples(batch, rng)
        x = x.float()
        t = rng.uniform(low=self.p.fake_t_min, high=1.0).to(x.device)
        x_t = self.path.add_noise(x, rng.normal_like(x), t)
        with torch.no_grad():
            target = teacher(x_t, t, cond, output="native")
        loss = dsm_loss(student(x_t, t, cond, output="native"), target)
        return loss, {"score_matching": loss.item(), "stage": 0.0}

    @torch.no_grad()
    def _teacher_samples(self, batch: Batch, rng: SampleDraws) -> Tensor:
        from ..samplers import sample

        noise = rng.normal(*self.dmd._shape(batch)[1:]) * self.path.init_noise_sigma
        times = [float(t) for t in self.path.sampling_times(int(self.p.pretrain_teacher_steps))]
        return sample(self.nets["teacher"], noise, batch.get("cond"), times, guidance=self.p.guidance, renoise="ddim")

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if step < self.pretrain_steps:
            if phase != "generator":
                raise ValueError(f"MSD pre-training has only the 'generator' phase, got {phase!r}")
            return self.pretrain_loss(batch, step)
        gan = self.p.gan and step >= self.gan_start
        with self._gan(gan):
            loss, logs = self.dmd.loss(phase, batch, step - self.pretrain_steps)
        logs["stage"] = 2.0 if gan else 1.0
        return loss, logs


def build(params: MSDParams | dict | None, teacher: Denoiser, ctx: Any) -> MSDStudentObjective:
    """The registry's builder for `msd`: one student's objective (the entry point's MSD driver sets
    `student_index` and `data.conditions` for each student's sub-run)."""
    params = checked_params(params, MSDParams)
    info: dict[str, Any] = {}
    if params.smaller:
        from ..msd.small import smaller_student

        lora = getattr(ctx, "lora", None)
        if getattr(lora, "student", False):
            raise ValueError(
                "objective.student_width / student_depth < 1 builds a new smaller network; it cannot be "
                "a LoRA adapter on the teacher (set lora.student: false)"
            )
        if params.shared_base:
            raise ValueError(
                "objective.shared_base=true needs a same-size student (objective.student_width / student_depth 1)"
            )

        def make_student(t):
            den, meta = smaller_student(t, params.student_width, params.student_depth)
            info.update(meta)
            return den

        ctx = SimpleNamespace(**{**vars(ctx), "make_student": make_student}) if hasattr(ctx, "__dict__") else ctx
    dmd = build_dmd(params.dmd_params(), teacher, ctx)
    pre, gan = params.stages(int(getattr(ctx, "steps", 1) or 1))
    return MSDStudentObjective(params, dmd, pre, gan, info)
