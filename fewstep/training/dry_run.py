"""`--dry-run`: build the teacher from its config on the meta device (no weights read), build the
objective's networks the same way, and print per role the parameter count, what is trainable, and
the estimated memory per process for the chosen precision and sharding.

The estimated peak per process follows what the training loop holds at each moment:

    weights + AdamW moments + EMA                 (held for the whole run)
  + activations of one gradient-recording forward pass of the student
  + max(gradients of the largest optimizer group, transient of the largest no-gradient pass)

The loop sets every gradient to None after each group's update (training/loop.py, `_update`), so
one group's gradients exist at a time, and none while a phase runs its forward passes: the
transient of a pass without gradients (the teacher's classifier-free-guidance pass at twice the
batch) and the gradients of a backward pass never coexist; the saved activations are there for
both."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..conditioning import cat_cond
from ..config import Config
from ..families import family_name
from ..objectives.registry import build_objective, make_params
from .activations import activation_bytes, example_condition, transient_bytes
from .build import run_context
from .bundle import TeacherBundle, meta_bundle
from .memory import estimate_table, format_bytes, role_memory

__all__ = ["MemoryPlan", "dry_run", "launch_settings", "plan_memory"]


def launch_settings(
    num_processes: int | None = None,
    sharding: str | None = None,
    mixed_precision: str | None = None,
    cfg: Config | None = None,
) -> tuple[int, bool, str]:
    """(processes, sharded, mixed precision): explicit arguments first, then what `accelerate
    launch` put in the environment, then the config."""
    n = num_processes or int(os.environ.get("WORLD_SIZE") or os.environ.get("ACCELERATE_NUM_PROCESSES") or 1)
    if sharding is None:
        sharded = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    else:
        if sharding not in ("none", "fsdp"):
            raise ValueError(f"--sharding must be 'none' or 'fsdp', got {sharding!r}")
        sharded = sharding == "fsdp"
    mp = (
        mixed_precision
        or (cfg.precision.mixed_precision if cfg is not None else None)
        or os.environ.get("ACCELERATE_MIXED_PRECISION")
        or "no"
    )
    return n, sharded, mp


def dry_run(cfg: Config, **settings: Any) -> str:
    """The dry-run report (a string; the caller prints it). `settings`: plan_memory's keywords
    (num_processes, sharding, mixed_precision, teacher)."""
    return plan_memory(cfg, **settings).report


@dataclass
class MemoryPlan:
    """The plan `--dry-run` prints, as numbers (bytes per process)."""

    rows: list  # per-role `RoleMemory` (each role's gradients listed, though not all live at once)
    groups: dict[str, list[str]]  # optimizer group -> roles
    group_grad_bytes: dict[str, int]  # optimizer group -> gradient bytes of its trainable tensors
    activation_bytes: int | None  # saved by one gradient-recording forward of the student (None: not estimated)
    transient_bytes: int | None  # peak alive in the largest forward pass without gradients
    transient_batch: int  # that pass's batch (twice the per-process batch with CFG)
    report: str

    @property
    def held_bytes(self) -> int:
        """Weights, AdamW moments and EMA: held for the whole run."""
        return sum(r.weight_bytes + r.optim_bytes + r.ema_bytes for r in self.rows)

    @property
    def grad_bytes(self) -> int:
        """Gradients at their peak: the largest optimizer group's."""
        return max(self.group_grad_bytes.values(), default=0)

    @property
    def static_bytes(self) -> int:
        """Weights, AdamW moments, EMA and the largest group's gradients."""
        return self.held_bytes + self.grad_bytes

    @property
    def peak_bytes(self) -> int:
        return self.held_bytes + (self.activation_bytes or 0) + max(self.grad_bytes, self.transient_bytes or 0)


def plan_memory(
    cfg: Config,
    num_processes: int | None = None,
    sharding: str | None = None,
    mixed_precision: str | None = None,
    teacher: TeacherBundle | None = None,
    example_cond: dict | None = None,
) -> MemoryPlan:
    """The plan the report prints, as a `MemoryPlan`. `example_cond`: a condition for the
    backbone at the per-process batch (default: class labels for class-conditional teachers)."""
    n, sharded, mp = launch_settings(num_processes, sharding, mixed_precision, cfg)
    bundle = teacher if teacher is not None else meta_bundle(cfg.teacher)
    tden = bundle.denoiser
    tden.requires_grad_(False)
    family = bundle.family or family_name(tden.backbone)
    ctx = run_context(
        cfg,
        bundle,
        family,
        num_classes=cfg.data.num_classes or bundle.num_classes,
        has_real_data=cfg.data.real_data or cfg.data.real_latents is not None or cfg.data.source is not None,
        device=torch.device("meta"),
        num_processes=n,
        sharded=sharded,
        mixed_precision=mp,
        vae=getattr(bundle, "vae", None),
    )
    nets, groups, notes = _meta_networks(cfg, tden, ctx)
    trainable_roles = {r for roles in groups.values() for r in roles}
    rows = role_memory(nets, trainable_roles, "student" if cfg.ema.rate > 0 else None, n, sharded)
    by_role = {r.role: r.grad_bytes for r in rows}
    group_grads = {g: sum(by_role.get(r, 0) for r in roles) for g, roles in groups.items()}
    per_process = max(1, int(cfg.data.batch_size) // n)
    guided = _guided(cfg) and not getattr(tden.conditioner, "guidance_embedded", False)
    t_batch = 2 * per_process if guided else per_process
    act = transient = None
    act_note = ""
    cond = example_cond if example_cond is not None else example_condition(bundle, per_process)
    if cond is None:
        act_note = "activations: not estimated (no example condition for this teacher on the meta device)"
    else:
        try:
            act = activation_bytes(nets["student"], tuple(bundle.latent_shape), per_process, cond)
            cond_t = cat_cond(cond, cond) if guided else cond  # the conditional and unconditional halves
            transient = transient_bytes(nets.get("teacher", tden), tuple(bundle.latent_shape), t_batch, cond_t)
        except Exception as e:  # a backbone whose forward cannot run on meta tensors
            act = transient = None
            act_note = f"activations: not estimated ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    plan = MemoryPlan(rows, dict(groups), group_grads, act, transient, t_batch, "")
    lines = _report(cfg, bundle, family, plan, n, sharded, mp, act_note, per_process, guided)
    plan.report = "\n".join(lines + notes)
    return plan


def _guided(cfg: Config) -> bool:
    """Whether the objective runs the teacher with classifier-free guidance (one pass at twice the
    batch): a CFG scale among its parameters other than 1."""
    params = make_params(cfg.objective.name, cfg.objective.params)
    scales = [getattr(params, k, None) for k in ("guidance", "guidance_min", "guidance_max")]
    return any(isinstance(w, (int, float)) and not isinstance(w, bool) and float(w) != 1.0 for w in scales)


def _meta_networks(cfg: Config, tden: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, list[str]], list[str]]:
    """The objective's networks and optimizer groups built on the meta device (or, for an
    objective that computes at build time, the teacher and a student), and notes on the fallback."""
    notes = []
    params = make_params(cfg.objective.name, cfg.objective.params)
    try:
        with torch.device("meta"):
            obj = build_objective(cfg.objective.name, params, tden, ctx)
        nets: dict[str, Any] = dict(obj.nets)
        groups = obj.groups
    except Exception as e:  # an objective that computes at build time cannot run on meta tensors
        notes.append(
            f"note: the objective could not be built on the meta device ({type(e).__name__}: {e}); "
            "showing the teacher and a student made by ctx.make_student"
        )
        with torch.device("meta"):
            nets = {"teacher": tden, "student": ctx.make_student(tden)}
        groups = {"generator": ["student"]}
    if not any(m is tden for m in nets.values()):
        nets["teacher"] = tden
    return nets, groups, notes


def _report(
    cfg: Config,
    bundle: TeacherBundle,
    family: str | None,
    plan: MemoryPlan,
    n: int,
    sharded: bool,
    mp: str,
    act_note: str,
    per_process: int,
    guided: bool,
) -> list[str]:
    """The report's lines: the run's settings, the table of roles and the memory estimate."""
    groups, rows = plan.groups, plan.rows
    head = (
        f"dry run: {cfg.name}  objective {cfg.objective.name}  teacher {bundle.source} ({family or '?'}, "
        f"latents {tuple(bundle.latent_shape)})\n"
        f"processes {n}, {'FSDP2 sharding (teacher included)' if sharded else 'no sharding (full copies per process)'}, "
        f"mixed precision {mp}, LoRA student {cfg.lora.student} / copies {cfg.lora.fake}"
        f"{f' (rank {cfg.lora.rank}, alpha {cfg.lora.alpha})' if cfg.lora.student or cfg.lora.fake else ''}, "
        f"EMA {cfg.ema.rate or 'off'}\n"
        f"optimizer groups: " + ", ".join(f"{g} -> {'+'.join(r)}" for g, r in groups.items())
    )
    grads_all = sum(r.grad_bytes for r in rows)
    freed = grads_all - plan.grad_bytes
    largest = max(plan.group_grad_bytes, key=plan.group_grad_bytes.get) if plan.group_grad_bytes else None
    lines = [
        head,
        "",
        estimate_table(rows),
        "",
        f"estimated memory per process: {format_bytes(plan.static_bytes)} for weights, gradients, AdamW moments and "
        f"EMA (trainable weights and their states in float32; the teacher in {cfg.teacher.dtype})"
        + (
            f": the table's total less {format_bytes(freed)} of gradients, since the loop frees each group's "
            f"gradients after its update and one group's exist at a time (the largest: {largest}, "
            f"{format_bytes(plan.grad_bytes)})."
            if freed > 0
            else "."
        ),
    ]
    act, transient = plan.activation_bytes, plan.transient_bytes
    if act is not None:
        lines.append(
            f"activations: {format_bytes(act)} for one forward pass with gradients of the student at batch "
            f"{per_process} per process (saved for backward; gradient checkpointing "
            f"{'on' if cfg.precision.gradient_checkpointing else 'off'}); transient: {format_bytes(transient or 0)} "
            f"at most alive in one forward pass without gradients of the teacher at batch {plan.transient_batch}"
            f"{' (its classifier-free-guidance pass)' if guided else ''}; both counted on the meta device, "
            "attention as a fused kernel" + (" (float32 activations; bf16 roughly halves them)" if mp == "bf16" else "")
        )
        lines.append(
            f"estimated peak per process: {format_bytes(plan.peak_bytes)} = {format_bytes(plan.held_bytes)} "
            f"(weights, AdamW moments, EMA) + {format_bytes(act)} (activations) + the larger of "
            f"{format_bytes(plan.grad_bytes)} (gradients, which exist only in backward and the update) and "
            f"{format_bytes(transient or 0)} (transient, only in forward passes)"
        )
    else:
        lines.append(act_note)
    if mp == "bf16":
        lines.append(
            "bf16: backbones run under autocast (activations in bf16); "
            + (
                "FSDP2 gathers each unit's weights in bf16 transiently."
                if sharded
                else "the weights above stay float32."
            )
        )
    lines.append(
        "not included: "
        + ("" if act is not None else "activations, ")
        + "the backward pass's own workspace (gradients of activations; with checkpointing, one block's "
        "rerun), the VAE and text encoders (used once to encode data and for sample grids), framework overhead "
        "(the interpreter and libraries; on a GPU the CUDA context)."
    )
    return lines
