"""Backbone families: one module per family, one record type (`Family`), one registry.

    fam = family_of(backbone)              # the record of a diffusers backbone, or None
    fam = family_by_name("sdxl")           # by the name configs use (`teacher.family`)
    for fam in all_families(): ...

Every module of this package whose name does not start with "_" and is not `base` defines one
`FAMILY` record and is registered when the package is imported. Adding a family is:
  1. `fewstep/families/<name>.py` with `FAMILY = Family(...)` (see `base.Family` for the fields);
     a backbone with a new call convention defines its `Conditioner` subclass in that file too
     (the base class and helpers are in `fewstep.conditioning`);
  2. one entry in `TINY` in `tests/tiny.py`: a tiny backbone and its pipeline.
`tests/test_families.py` then checks the record against the tiny model.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from .base import Drive, Family

__all__ = [
    "DRIVES",
    "FAMILIES",
    "Drive",
    "Family",
    "all_families",
    "backbone_of",
    "default_lora_targets",
    "family_by_name",
    "family_name",
    "family_of",
    "family_of_pipeline",
    "is_text",
]

# the order in which families are listed in messages (new families follow, by module name)
_ORDER = ("dit", "unet", "sd15", "sdxl", "pixart", "sd3", "flux")


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"fewstep/families/{info.name}.py defines no FAMILY record")
        if fam.name in found:
            raise ValueError(f"two families are named {fam.name!r}")
        found[fam.name] = fam
    rank = {n: i for i, n in enumerate(_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


_REGISTRY = _discover()
FAMILIES: tuple[str, ...] = tuple(_REGISTRY)
# pipeline class -> how it drives its scheduler (what export replays), over every family
DRIVES: Mapping[str, Drive] = MappingProxyType({p: d for f in _REGISTRY.values() for p, d in f.drives.items()})


def all_families() -> tuple[Family, ...]:
    return tuple(_REGISTRY.values())


def family_by_name(name: str) -> Family:
    """The record named `name`; a ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
    return _REGISTRY[name]


def is_text(name: str | None) -> bool:
    """True for a known text-to-image family name (False for class-conditional, unknown, None)."""
    return name in _REGISTRY and _REGISTRY[name].text


def family_of(backbone: nn.Module) -> Family | None:
    """The family of a diffusers backbone (by its class, or a parent class), None for anything else."""
    for fam in _REGISTRY.values():
        if fam.is_backbone(backbone):
            return fam
    return None


def family_name(backbone: nn.Module) -> str | None:
    """The name of `family_of(backbone)` (None for a backbone of no known family)."""
    fam = family_of(backbone)
    return None if fam is None else fam.name


def default_lora_targets(backbone: nn.Module) -> tuple[str, ...]:
    """The family's default LoRA targets (`Family.lora_targets`); a clear error for a backbone of
    no known family."""
    fam = family_of(backbone)
    if fam is None:
        raise ValueError(
            f"lora.target_modules: no default for backbone {type(backbone).__name__}; "
            "set lora.target_modules to module-name suffixes (e.g. [to_q, to_k, to_v])"
        )
    return fam.lora_targets


def backbone_of(pipe) -> nn.Module:
    """The network a pipeline distils: its `transformer` or `unet` component."""
    for name in ("transformer", "unet"):
        m = getattr(pipe, name, None)
        if m is not None:
            return m
    raise ValueError(f"{type(pipe).__name__}: no 'unet' or 'transformer' component to distil")


def family_of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline: by its class, else by its backbone's class."""
    name = type(pipe).__name__
    for fam in _REGISTRY.values():
        if name in fam.pipeline_classes:
            return fam
    bb = backbone_of(pipe)
    fam = family_of(bb)
    if fam is None:
        raise ValueError(
            f"cannot tell the family of pipeline {name} with backbone {type(bb).__name__}; "
            f"pass family= one of {FAMILIES}"
        )
    return fam
