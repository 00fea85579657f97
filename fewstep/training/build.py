"""Steps 4.-6. of the training loop: the objective through the registry, its trainable networks
placed, sharded and cast, and one optimizer and learning-rate schedule per group; with the two
records the loop passes around (where this process runs, and the built run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError, resolve_group
from ..families import family_name
from ..objectives.registry import BuildContext, build_objective, make_params
from .bundle import TeacherBundle
from .checkpoint import saved_keys
from .checkpointing import enable_activation_checkpointing
from .compile import compile_backbones
from .data import BatchSource
from .ema import EMA
from .lora import make_factories
from .outdir import OutputFolder
from .outputs import backbone_of
from .parallel import broadcast_parameters, shard_module, wrap_autocast
from .resume import settings
from .schedules import make_scheduler
from .updates import resolve_steps, update_counts

__all__ = ["Env", "Trainer", "build_trainer", "run_context"]


@dataclass
class Env:
    """Where and how this process runs."""

    accelerator: Any
    run_dir: Path
    device: torch.device
    main: bool
    world: int
    rank: int
    sharded: bool
    mp: str
    output: OutputFolder | None = None  # the output folder's rules (overwrite keeps the old run until a checkpoint)

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)


@dataclass
class Trainer:
    """The built run: objective and networks, what each optimizer group trains, the optimizers,
    the EMA, and the counters the loop keeps."""

    obj: Any
    params: Any
    family: str | None
    tden: nn.Module
    nets: dict[str, nn.Module]
    holder: nn.ModuleDict
    keys: set[str]
    group_params: dict[str, list[nn.Parameter]]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    gcfg: dict[str, Any]
    ema: EMA | None
    student_group: str | None
    skipped: int = 0
    consecutive: dict[str, int] = field(default_factory=dict)  # non-finite updates in a row, per group
    made: dict[str, int] = field(default_factory=dict)  # updates per group so far (attempted)
    settings: dict[str, Any] = field(default_factory=dict)  # what a checkpoint records to check a resume


# ---- 4.-6. objective, placement, optimizers ---------------------------------------------------------
def build_trainer(cfg: Config, env: Env, bundle: TeacherBundle, source: BatchSource) -> Trainer:
    """The objective through the registry, its trainable networks placed, sharded and cast, and one
    optimizer and learning-rate schedule per group."""
    tden = bundle.denoiser
    teacher_tensors = {id(t) for t in list(tden.parameters()) + list(tden.buffers())}
    family = bundle.family or family_name(tden.backbone)
    ctx = _context(cfg, env, bundle, source, family)
    params = make_params(cfg.objective.name, cfg.objective.params)
    obj = build_objective(cfg.objective.name, params, tden, ctx)
    _check_groups(cfg, obj, cfg.objective.name)
    cfg.steps = resolve_steps(cfg, obj)  # generator_steps -> steps (the objective's update schedule)
    nets: dict[str, nn.Module] = obj.nets
    if "student" not in nets:
        raise TypeError(
            f"objective {cfg.objective.name!r}: nets has no 'student' role (sampling, EMA and the "
            "final weights need it)"
        )
    holder, teacher_roles = _holder(cfg, env, tden, nets)
    group_names = _group_names(cfg, obj, holder, teacher_roles)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = saved_keys(holder, teacher_tensors)
    keys &= set(get_model_state_dict(holder, options=StateDictOptions()).keys())
    student_group = next((g for g, roles in obj.groups.items() if "student" in roles), None)
    _place(env, tden, holder)
    if cfg.precision.compile:
        compile_backbones([*holder.values(), tden], cfg.precision.compile_mode, env.say)
    named = dict(holder.named_parameters(remove_duplicate=False))
    group_params = {g: [named[n] for n in names] for g, names in group_names.items()}
    optimizers, schedulers, gcfg = _optimizers(cfg, obj, group_params, group_names)
    ema = None
    if cfg.ema.rate > 0:
        ema = EMA(
            {n: p for n, p in named.items() if n.startswith("student.") and p.requires_grad},
            cfg.ema.rate,
            cfg.ema.start_step,
        )
    return Trainer(
        obj,
        params,
        family,
        tden,
        nets,
        holder,
        keys,
        group_params,
        optimizers,
        schedulers,
        gcfg,
        ema,
        student_group,
        consecutive={g: 0 for g in obj.groups},
        settings=settings(cfg, gcfg, cfg.objective.name, params),
    )


def _context(cfg: Config, env: Env, bundle: TeacherBundle, source: BatchSource, family: str | None) -> BuildContext:
    """What an objective's builder may know of this run (shapes, conditioning, placement)."""
    data = {
        "num_classes": source.num_classes,
        "has_real_data": source.has_real_data,
        "decode": bundle.decode,
        "vae": bundle.vae,
    }
    placement = {"device": env.device, "num_processes": env.world, "sharded": env.sharded, "mixed_precision": env.mp}
    return run_context(cfg, bundle, family, **data, **placement)


def run_context(
    cfg: Config,
    bundle: TeacherBundle,
    family: str | None,
    *,
    num_classes: int | None,
    has_real_data: bool,
    device: torch.device,
    num_processes: int,
    sharded: bool,
    mixed_precision: str,
    decode: Any = None,
    vae: Any = None,
) -> BuildContext:
    """The registry's BuildContext for a run of `cfg` on `bundle`'s teacher, with the factories
    that make its students and copies (LoRA or full, as cfg.lora says). The training run and the
    dry run (training/dry_run.py) both build their objective from it."""
    make_student, make_copy = make_factories(
        cfg.lora, sharded=sharded, family=family, gradient_checkpointing=cfg.precision.gradient_checkpointing
    )
    teacher = {"latent_shape": tuple(bundle.latent_shape), "null_class": bundle.null_class, "text": bundle.text}
    data = {"num_classes": num_classes, "has_real_data": has_real_data, "decode": decode, "vae": vae}
    placement = {
        "device": device,
        "num_processes": num_processes,
        "sharded": sharded,
        "mixed_precision": mixed_precision,
    }
    training = {"seed": cfg.seed, "family": family, "lora": cfg.lora, "steps": cfg.steps or 1}
    factories = {"make_student": make_student, "make_copy": make_copy}
    checkpointing = cfg.precision.gradient_checkpointing
    return BuildContext(**teacher, **data, **placement, **training, **factories, gradient_checkpointing=checkpointing)


def _holder(cfg: Config, env: Env, tden: nn.Module, nets: dict[str, nn.Module]) -> tuple[nn.ModuleDict, set[str]]:
    """The objective's networks other than the teacher, on this process's device (gradient
    checkpointing on where asked for); and the roles that are the teacher."""
    teacher_roles = {r for r, m in nets.items() if m is tden or r == "teacher"}
    holder = nn.ModuleDict({r: m for r, m in nets.items() if r not in teacher_roles})
    holder.to(env.device)
    if cfg.precision.gradient_checkpointing:
        enable_activation_checkpointing(holder.values(), say=env.say)
    return holder, teacher_roles


def _check_groups(cfg: Config, obj: Any, name: str) -> None:
    for g in cfg.optim:
        if g != "default" and g not in obj.groups:
            raise ConfigError(
                f"optim.{g}: objective {name!r} has no optimizer group {g!r} (its groups: {', '.join(obj.groups)})"
            )


def _group_names(cfg: Config, obj: Any, holder: nn.ModuleDict, teacher_roles: set[str]) -> dict[str, list[str]]:
    """Which parameters each optimizer group trains (by name, fixed now; sharding swaps the objects)."""
    group_names: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for g, roles in obj.groups.items():
        names = []
        for r in roles:
            if r in teacher_roles:
                raise TypeError(f"objective {cfg.objective.name!r}: group {g!r} trains the teacher")
            for n, p in holder[r].named_parameters(prefix=r):
                if p.requires_grad and n not in names:
                    if n in owner and owner[n] != g:
                        raise TypeError(f"parameter {n} is trained by two groups, {owner[n]!r} and {g!r}")
                    owner[n] = g
                    names.append(n)
        if not names:
            raise TypeError(f"objective {cfg.objective.name!r}: group {g!r} ({roles}) has no trainable parameters")
        group_names[g] = names
    return group_names


def _param_groups(plist: list[nn.Parameter], names: list[str], scales: dict[str, float], lr: float) -> list:
    """The parameters of one optimizer group, the roles in `scales` (by the first part of each
    parameter's name) apart with their own learning rate; plain `plist` when none applies."""
    rest: list[nn.Parameter] = []
    own: dict[str, list[nn.Parameter]] = {}
    for n, p in zip(names, plist):
        role = n.split(".", 1)[0]
        (own.setdefault(role, []) if role in scales else rest).append(p)
    if not own:
        return plist
    return [{"params": rest}] + [{"params": ps, "lr": lr * float(scales[r])} for r, ps in own.items()]


def _place(env: Env, tden: nn.Module, holder: nn.ModuleDict) -> None:
    """5. The same initial weights on every process; FSDP sharding and bf16 autocast per backbone."""
    broadcast_parameters(list(holder.values()), env.world)
    backbones: list[nn.Module] = []
    for m in [tden, *holder.values()]:
        bb = backbone_of(m)
        if all(bb is not b for b in backbones):
            backbones.append(bb)
    if env.sharded:
        if len(backbones) < 1 + len(holder):
            raise ConfigError(
                "FSDP sharding needs one backbone per role; this objective shares one backbone "
                "between roles (e.g. objective.shared_base=true): use lora.student / lora.fake "
                "copies, or run without FSDP"
            )
        for bb in backbones:
            shard_module(env.accelerator, bb)
    if env.mp == "bf16":
        for bb in backbones:
            wrap_autocast(bb, env.device.type)


def _optimizers(
    cfg: Config,
    obj: Any,
    group_params: dict[str, list[nn.Parameter]],
    group_names: dict[str, list[str]],
):
    """6. AdamW and a diffusers learning-rate schedule (training/schedules.py) per group, the schedule's length counted in that group's updates.
    An objective's `lr_scales` ({role: factor}) gives a role its own parameter group at factor x its
    optimizer group's learning rate (the schedule scales both alike)."""
    updates = update_counts(obj, cfg.steps, name=cfg.objective.name)  # raises on a phase that is no group
    scales = dict(getattr(obj, "lr_scales", None) or {})
    optimizers, schedulers, gcfg = {}, {}, {}
    for g, plist in group_params.items():
        gc = gcfg[g] = resolve_group(cfg, g, (getattr(obj, "optim", None) or {}).get(g))
        optimizers[g] = torch.optim.AdamW(
            _param_groups(plist, group_names[g], scales, gc.lr),
            lr=gc.lr,
            betas=tuple(gc.betas),
            eps=gc.eps,
            weight_decay=gc.weight_decay,
        )
        schedulers[g] = make_scheduler(optimizers[g], gc.scheduler, gc.warmup_steps, updates[g], gc.num_cycles)
    return optimizers, schedulers, gcfg
