"""`--dry-run`: build the teacher from its config on the meta device (no weights read), build the
objective's networks the same way, and print per role the parameter count, what is trainable, and
the estimated memory per process for the chosen precision and sharding."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import Config
from ..families import family_name
from ..objectives.registry import build_objective, make_params
from .activations import activation_bytes, example_condition
from .build import run_context
from .bundle import TeacherBundle, meta_bundle
from .memory import estimate_table, format_bytes, role_memory

__all__ = ["dry_run", "launch_settings", "memory_plan"]


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
    """The dry-run report (a string; the caller prints it). `settings`: memory_plan's keywords
    (num_processes, sharding, mixed_precision, teacher)."""
    return memory_plan(cfg, **settings)[2]


def memory_plan(
    cfg: Config,
    num_processes: int | None = None,
    sharding: str | None = None,
    mixed_precision: str | None = None,
    teacher: TeacherBundle | None = None,
    example_cond: dict | None = None,
) -> tuple[list, int | None, str]:
    """(per-role `RoleMemory` rows, activation bytes of one gradient-recording forward of the
    student at the per-process batch or None where no example condition could be built, the
    dry-run report): the plan the report prints, as numbers. `example_cond`: a condition for the
    backbone at that batch (default: class labels for class-conditional teachers)."""
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
    )
    nets, groups, notes = _meta_networks(cfg, tden, ctx)
    trainable_roles = {r for roles in groups.values() for r in roles}
    rows = role_memory(nets, trainable_roles, "student" if cfg.ema.rate > 0 else None, n, sharded)
    per_process = max(1, int(cfg.data.batch_size) // n)
    act, act_note = None, ""
    cond = example_cond if example_cond is not None else example_condition(bundle, per_process)
    if cond is None:
        act_note = "activations: not estimated (no example condition for this teacher on the meta device)"
    else:
        try:
            act = activation_bytes(nets["student"], tuple(bundle.latent_shape), per_process, cond)
        except Exception as e:  # a backbone whose forward cannot run on meta tensors
            act_note = f"activations: not estimated ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    lines = _report(cfg, bundle, family, groups, rows, n, sharded, mp, act, act_note, per_process)
    return rows, act, "\n".join(lines + notes)


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
    groups: dict[str, list[str]],
    rows: list,
    n: int,
    sharded: bool,
    mp: str,
    act: int | None,
    act_note: str,
    per_process: int,
) -> list[str]:
    """The report's lines: the run's settings, the table of roles and the memory estimate."""
    total = sum(r.total for r in rows)
    head = (
        f"dry run: {cfg.name}  objective {cfg.objective.name}  teacher {bundle.source} ({family or '?'}, "
        f"latents {tuple(bundle.latent_shape)})\n"
        f"processes {n}, {'FSDP2 sharding (teacher included)' if sharded else 'no sharding (full copies per process)'}, "
        f"mixed precision {mp}, LoRA student {cfg.lora.student} / copies {cfg.lora.fake}"
        f"{f' (rank {cfg.lora.rank}, alpha {cfg.lora.alpha})' if cfg.lora.student or cfg.lora.fake else ''}, "
        f"EMA {cfg.ema.rate or 'off'}\n"
        f"optimizer groups: " + ", ".join(f"{g} -> {'+'.join(r)}" for g, r in groups.items())
    )
    lines = [
        head,
        "",
        estimate_table(rows),
        "",
        f"estimated memory per process: {format_bytes(total)} for weights, gradients, AdamW moments and EMA "
        f"(trainable weights and their states in float32; the teacher in {cfg.teacher.dtype}).",
    ]
    if act is not None:
        lines.append(
            f"activations: {format_bytes(act)} for one forward pass with gradients of the student at batch "
            f"{per_process} per process (saved for backward, counted on the meta device; gradient checkpointing "
            f"{'on' if cfg.precision.gradient_checkpointing else 'off'}); estimated peak {format_bytes(total + act)}"
            + (" (float32 activations; bf16 roughly halves them)" if mp == "bf16" else "")
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
        + "the VAE and text encoders (used once to encode data and for sample grids), framework overhead "
        "(the interpreter and libraries; on a GPU the CUDA context)."
    )
    return lines
