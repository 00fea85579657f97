"""Objective names -> builders.

    obj = build_objective("dmd2", {"guidance": 3.0}, teacher, ctx)

`REGISTRY` holds "module:builder" strings (plus, for names that share a builder, the fields the
name fixes: dmd / dmd2 / decoupled_dmd set DMD's `variant`). What a builder receives and what
the objective it returns must expose is stated once, in `fewstep/objectives/base.py`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "REGISTRY",
    "BuildContext",
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
    "rcm": "fewstep.objectives.rcm:build",
    "flash_dmd": "fewstep.objectives.flash_dmd:build",
    "msd": ("fewstep.objectives.msd:build", {"variant": "dmd2"}),
    "ircm": "fewstep.objectives.ircm:build",
    "tadsr": "fewstep.objectives.tadsr:build",
    "nct": "fewstep.objectives.nct:build",
}


def _full_copy(teacher):
    from ..denoiser import copy_denoiser

    d = copy_denoiser(teacher, trainable=True)
    d.backbone.float()
    return d


@dataclass
class BuildContext:
    """What a builder may know about the run besides its own hyperparameters."""

    latent_shape: tuple[int, ...]  # (C, H, W) of the teacher's latents
    num_classes: int | None = None  # class-conditional teachers: labels 0..num_classes-1
    null_class: int | None = None  # the label of the unconditional branch, if any
    text: bool = False  # conditions are text embeddings (cond dicts from prompts)
    has_real_data: bool = False  # batches carry real latents in batch["x0"]
    seed: int = 0  # the run's seed (for `base.step_generator`)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    family: str | None = None  # dit, unet, sd15, sdxl, pixart, sd3, flux (None: other)
    lora: Any = None  # fewstep.config.LoraConfig (rank, alpha, targets, switches)
    num_processes: int = 1
    sharded: bool = False  # FSDP: networks are sharded, keep them separate modules
    mixed_precision: str = "no"  # "no" | "bf16": backbones run under autocast
    gradient_checkpointing: bool = False
    steps: int = 1  # total training steps (for warm-up schedules)
    make_student: Callable[[Any], Any] = _full_copy  # teacher Denoiser -> trainable student Denoiser
    make_copy: Callable[[Any], Any] = _full_copy  # teacher Denoiser -> trainable copy (fake score, ...)
    decode: Callable[[Any], Any] | None = None  # latents -> images in [-1, 1] (teachers with a VAE), for
    #   objectives that score images (Flash-DMD's rewards)
    vae: Any = None  # the teacher's VAE (frozen), when it has one: Flash-DMD's pixel discriminator reads its encoder


# ---------------------------------------------------------------------------------------------
def resolve(name: str) -> tuple[Callable, type]:
    """(builder, params dataclass) of a registered objective."""
    if name not in REGISTRY:
        from ..config import ConfigError

        raise ConfigError(f"objective.name: unknown objective {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    mod_name, fn_name = _entry(name)[0].split(":")
    mod = importlib.import_module(mod_name)
    builder = getattr(mod, fn_name)
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
    raise TypeError(
        f"objective {name!r}: cannot find its hyperparameter dataclass in {mod.__name__} "
        f"(give the builder a CONFIG attribute, annotate its first parameter, or name it "
        f"{name.replace('_', '').upper()}Config)"
    )


def params_class(name: str) -> type:
    return resolve(name)[1]


def make_params(name: str, raw: dict[str, Any] | None, prefix: str = "objective") -> Any:
    """The objective's dataclass from plain data; errors name `objective.<key>`."""
    from ..config_convert import ConfigError, dataclass_from

    cls = params_class(name)
    raw = dict(raw or {})
    for k, v in _entry(name)[1].items():
        if k in raw and raw[k] != v:
            raise ConfigError(f"{prefix}.{k}={raw[k]!r} contradicts {prefix}.name={name!r}, which means {k}={v!r}")
        raw[k] = v
    try:
        params = dataclass_from(cls, raw, prefix)
    except ConfigError:
        raise
    except TypeError as e:  # e.g. a field without default that the preset did not set
        raise ConfigError(f"{prefix}: cannot build {cls.__name__} for {name!r}: {e}") from None
    validate = getattr(params, "validate", None)
    if callable(validate):
        # a validate() that needs run facts (e.g. has_real_data) is left to the builder
        required = [
            p
            for p in inspect.signature(validate).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
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
            raise TypeError(f"{name}: the built objective has no `{attr}` (the contract: fewstep/objectives/base.py)")
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
