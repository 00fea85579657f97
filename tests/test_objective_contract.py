"""The objective contract (fewstep/objectives/base.py): every registered objective resolves, and
every optional member the entry point looks for is declared in the protocol."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fewstep.objectives import base, registry

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_objective_resolves_to_a_builder_and_a_dataclass():
    for name in registry.REGISTRY:
        builder, cls = registry.resolve(name)
        assert callable(builder) and dataclasses.is_dataclass(cls), name


def test_optional_members_the_entry_point_uses_are_in_the_protocol():
    used = set()
    for f in (ROOT / "fewstep" / "training").rglob("*.py"):
        used |= set(re.findall(r"(?:hasattr|getattr)\((?:obj|objective), \"(\w+)\"", f.read_text()))
    assert used, "the entry point looks up no optional member: update this test's pattern"
    assert used <= set(base.OPTIONAL_MEMBERS), used - set(base.OPTIONAL_MEMBERS)
    required = {"nets", "groups", "sampling", "phases", "loss"}
    assert not required & set(base.OPTIONAL_MEMBERS)
    doc = base.__doc__
    for member in sorted(required | set(base.OPTIONAL_MEMBERS)):
        assert re.search(rf"^\s+(\S+ / )?{member}\b", doc, re.M), f"{member} is not described in base.py"
