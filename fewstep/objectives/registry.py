"""Objective names -> builders, and the contract every builder follows.

    obj = build_objective("dmd2", {"guidance": 3.0}, teacher, ctx)

The registry only holds "module:builder" strings (plus, for names that share a builder, the
fields the name fixes: dmd / dmd2 / decoupled_dmd set DMD's `variant`), so a module that is
missing (not written yet, or failing to import) makes only its own names unavailable.

The builder contract
--------------------
Each objective module defines

1. a dataclass of its hyperparameters, every field with a default and a short comment; these are
   the keys a preset writes under `objective:` (and `objective.<field>=value` on the command line).
   The registry finds it, in this order, as
     - a `CONFIG` attribute of the builder function,
     - the dataclass in the type annotation of the builder's first parameter
       (`def build(params: TDMParams | dict | None, ...)`),
     - `<module>.<Name>Config` or `<module>.<Name>Params`, Name being the objective name without
       underscores, any case (dmd2 -> DMD2Config, decoupled_dmd -> DecoupledDMDConfig).
   The registry builds the instance itself from the preset (unknown keys and wrong types are errors
   naming `objective.<key>`) and then calls its `validate()` method when it takes no arguments (a
   validate that needs run facts, e.g. has_real_data, is the builder's to call); `validate()`
   raises ValueError naming `objective.<key>` for bad values (e.g. "objective.num_steps=4 needs
   objective.student_times with 4 entries").

2. a builder `build(params, teacher, ctx) -> Objective`:
     params   the dataclass instance above (builders may also accept a plain dict for their tests);
     teacher  the frozen teacher `fewstep.denoiser.Denoiser` (requires_grad False, on ctx.device);
              guidance goes through its call: teacher(x_t, t, cond, guidance=w, output=...);
     ctx      a `BuildContext` (below): shapes, data facts, device, seed, and the factories
              `ctx.make_student(teacher)` / `ctx.make_copy(teacher)` that return trainable Denoisers
              set up as the run asks (full copies, or LoRA adapters on frozen teacher weights;
              gradient checkpointing). Use them rather than copying the teacher yourself, so LoRA
              and memory settings apply to your networks. A network that must differ from the
              teacher's architecture (e.g. an extra guidance embedding) is built by the objective.

The returned object follows `fewstep.objectives.base.Objective`:
     nets      {"teacher": ..., "student": ..., "fake": ..., "disc": ...}: every nn.Module it uses.
               The entry point may place, shard (FSDP2) or wrap these; call them only as functions
               through `self.nets[role](...)` at loss time, never through a reference kept from the
               constructor, so that the wrapped module runs. The teacher (the role named "teacher",
               or the teacher Denoiser under any name) is never saved; every other tensor that is
               not a frozen tensor shared with the teacher is checkpointed (targets, EMA copies).
     groups    {"generator": ["student"], "guidance": ["fake", "disc"]}: optimizer group -> roles;
               the group trains the parameters of those roles that have requires_grad at start.
               The student's group should be named "generator" (the presets' `optim.generator`).
     phases(step) -> ["guidance", "generator"]: the groups to update at this step, in order.
     loss(phase, batch, step) -> (scalar loss, {"name": float}) for that group.
     sampling  {"times": [1.0, ..., 0.0], "renoise": "fresh" | "ddim"}: the student's sampler.
     after_step(phase, step)   optional, called after a successful update of `phase`.
     state_dict() / load_state_dict(d)  optional: state outside `nets` that must survive a resume
               (tensors, numbers); network weights and buffers in `nets` are saved by the entry point.
     optim     optional {group: {"lr": ..., "betas": ..., "weight_decay": ..., ...}}: the objective's
               recommended AdamW settings; a preset's `optim.<group>` overrides them, and they
               override `optim.default`.
     A role named "student_ema" (an EMA the objective keeps itself) is also written as the run's
     final/student_ema when the entry point's own EMA (ema.rate) is off.

For each phase the entry point does: loss -> backward -> average gradients over processes ->
clip the group's gradient norm -> skip the update if the loss or the norm is not finite -> step
the group's optimizer and scheduler -> zero the gradients of ALL networks -> after_step. The
objective never steps optimizers, moves devices or reads global arguments.

A batch is {"cond": dict | None, "x0": real latents (B, C, H, W) when ctx.has_real_data,
"shape": (B, C, H, W) of this process, "index": (B,) positions of these samples in the global
batch, "global_batch_size": int}. Randomness comes from torch's global RNG (seeded per process
and checkpointed), or, where draws must not depend on the number of processes, from
`base.step_generator(seed, step)` over the global batch indexed by batch["index"] (see dsm.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "REGISTRY",
    "BuildContext",
    "ObjectiveUnavailable",
    "available",
    "resolve",
    "params_class",
    "make_params",
    "build_objective",
    "check_objective",
]

# name -> "module:builder", or ("module:builder", {field: value}) for names that fix some
# hyperparameters of a shared builder (one DMD module serves three names through `variant`)
REGISTRY: dict[str, str | tuple[str, dict[str, Any]]] = {
    "dsm": "fewstep.objectives.dsm:build",
    "dmd": ("fewstep.objectives.dmd:build", {"variant": "dmd"}),
    "dmd2": ("fewstep.objectives.dmd:build", {"variant": "dmd2"}),
    "decoupled_dmd": ("fewstep.objectives.dmd:build", {"variant": "ddmd"}),
    "lcm": "fewstep.objectives.consistency:build",
    "scm": "fewstep.objectives.scm:build_scm",
    "tbcm": "fewstep.objectives.scm:build_tbcm",
    "tdm": "fewstep.objectives.tdm:build",
    "boot": "fewstep.objectives.boot:build",
    "twinflow": "fewstep.objectives.twinflow:build",
}


class ObjectiveUnavailable(RuntimeError):
    """The objective's module or builder cannot be imported (not written yet, or broken)."""


def _full_copy(teacher):
    from ..denoiser import copy_denoiser

    d = copy_denoiser(teacher, trainable=True)
    d.backbone.float()
    return d


@dataclass
class BuildContext:
    """What a builder may know about the run besides its own hyperparameters."""

    latent_shape: tuple[int, ...]               # (C, H, W) of the teacher's latents
    num_classes: int | None = None              # class-conditional teachers: labels 0..num_classes-1
    null_class: int | None = None               # the label of the unconditional branch, if any
    text: bool = False                          # conditions are text embeddings (cond dicts from prompts)
    has_real_data: bool = False                 # batches carry real latents in batch["x0"]
    seed: int = 0                               # the run's seed (for `base.step_generator`)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    family: str | None = None                   # dit, unet, sd15, sdxl, pixart, sd3, flux (None: other)
    lora: Any = None                            # fewstep.config.LoraConfig (rank, alpha, targets, switches)
    num_processes: int = 1
    sharded: bool = False                       # FSDP: networks are sharded, keep them separate modules
    mixed_precision: str = "no"                 # "no" | "bf16": backbones run under autocast
    gradient_checkpointing: bool = False
    steps: int = 1                              # total training steps (for warm-up schedules)
    make_student: Callable[[Any], Any] = _full_copy   # teacher Denoiser -> trainable student Denoiser
    make_copy: Callable[[Any], Any] = _full_copy      # teacher Denoiser -> trainable copy (fake score, ...)


# ---------------------------------------------------------------------------------------------
def available() -> dict[str, str | None]:
    """name -> None when importable, else the reason it is not."""
    out = {}
    for name in REGISTRY:
        try:
            resolve(name)
            out[name] = None
        except ObjectiveUnavailable as e:
            out[name] = str(e)
    return out


def resolve(name: str) -> tuple[Callable, type]:
    """(builder, params dataclass) of a registered objective."""
    if name not in REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"objective.name: unknown objective {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    mod_name, fn_name = _entry(name)[0].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
            raise ObjectiveUnavailable(f"objective {name!r}: module {mod_name} is not available yet") from None
        raise ObjectiveUnavailable(f"objective {name!r}: importing {mod_name} failed: {e}") from e
    except Exception as e:  # a broken module should not take the others down
        raise ObjectiveUnavailable(f"objective {name!r}: importing {mod_name} failed: "
                                   f"{type(e).__name__}: {e}") from e
    builder = getattr(mod, fn_name, None)
    if builder is None:
        raise ObjectiveUnavailable(f"objective {name!r}: {mod_name} has no builder {fn_name}()")
    return builder, _find_params_class(name, mod, builder)


def _entry(name: str) -> tuple[str, dict[str, Any]]:
    e = REGISTRY[name]
    return (e, {}) if isinstance(e, str) else (e[0], dict(e[1]))


def _find_params_class(name: str, mod: types.ModuleType, builder: Callable) -> type:
    cls = getattr(builder, "CONFIG", None)
    if dataclasses.is_dataclass(cls):
        return cls
    try:
        hints = typing.get_type_hints(builder)
        params = next(iter(inspect.signature(builder).parameters))
        tp = hints.get(params)
        cands = typing.get_args(tp) if typing.get_args(tp) else (tp,)
        for c in cands:
            if isinstance(c, type) and dataclasses.is_dataclass(c):
                return c
    except Exception:  # unresolvable annotations: fall through to the naming rule
        pass
    want = {name.replace("_", "").lower() + "config", name.replace("_", "").lower() + "params"}
    for attr, val in vars(mod).items():
        if attr.lower() in want and isinstance(val, type) and dataclasses.is_dataclass(val):
            return val
    raise ObjectiveUnavailable(
        f"objective {name!r}: cannot find its hyperparameter dataclass in {mod.__name__} "
        f"(give the builder a CONFIG attribute, annotate its first parameter, or name it "
        f"{name.replace('_', '').upper()}Config)")


def params_class(name: str) -> type:
    return resolve(name)[1]


def make_params(name: str, raw: dict[str, Any] | None, prefix: str = "objective") -> Any:
    """The objective's dataclass from plain data; errors name `objective.<key>`."""
    from ..config import ConfigError, _dataclass_from

    cls = params_class(name)
    raw = dict(raw or {})
    for k, v in _entry(name)[1].items():
        if k in raw and raw[k] != v:
            raise ConfigError(f"{prefix}.{k}={raw[k]!r} contradicts {prefix}.name={name!r}, which means {k}={v!r}")
        raw[k] = v
    try:
        params = _dataclass_from(cls, raw, prefix)
    except ConfigError:
        raise
    except TypeError as e:  # e.g. a field without default that the preset did not set
        raise ConfigError(f"{prefix}: cannot build {cls.__name__} for {name!r}: {e}") from None
    validate = getattr(params, "validate", None)
    if callable(validate):
        # a validate() that needs run facts (e.g. has_real_data) is left to the builder
        required = [p for p in inspect.signature(validate).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not required:
            validate()
    return params


def build_objective(name: str, raw_params: dict[str, Any] | Any, teacher, ctx: BuildContext):
    """Resolve, build and check an objective."""
    builder, cls = resolve(name)
    params = raw_params if isinstance(raw_params, cls) else make_params(name, raw_params)
    obj = builder(params, teacher, ctx)
    check_objective(obj, name)
    return obj


def check_objective(obj: Any, name: str = "objective") -> None:
    """Raise a clear error when a built objective does not follow the protocol."""
    for attr in ("nets", "groups", "sampling", "phases", "loss"):
        if not hasattr(obj, attr):
            raise TypeError(f"{name}: the built objective has no `{attr}` (see fewstep/objectives/base.py)")
    if not isinstance(obj.nets, dict) or not all(isinstance(m, nn.Module) for m in obj.nets.values()):
        raise TypeError(f"{name}: `nets` must map role names to nn.Modules")
    if not isinstance(obj.groups, dict) or not obj.groups:
        raise TypeError(f"{name}: `groups` must map optimizer group names to lists of roles")
    for g, roles in obj.groups.items():
        for r in roles:
            if r not in obj.nets:
                raise TypeError(f"{name}: group {g!r} trains role {r!r}, which is not in `nets` ({list(obj.nets)})")
    s = obj.sampling
    if not isinstance(s, dict) or "times" not in s or s.get("renoise") not in ("fresh", "ddim"):
        raise TypeError(f"{name}: `sampling` must be {{'times': [...], 'renoise': 'fresh' | 'ddim'}}, got {s!r}")
    from ..samplers import check_times

    check_times(s["times"])

