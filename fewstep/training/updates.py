"""Training steps versus optimizer updates.

A training step runs the phases `objective.phases(step)` names, one optimizer group each. For most
objectives the student's group updates every step; in the DMD family the fake score updates every
step and the student every `objective.fake_updates_per_generator` steps, so `steps` counts
fake-score updates. `generator_steps` sets the number of student updates directly; the run's step
count is then the first step count that makes that many (and `steps`, where also given, must be it).
"""

from __future__ import annotations

from typing import Any

from ..config import Config, ConfigError

__all__ = ["student_group", "update_counts", "resolve_steps"]

_MAX_STEPS = 10_000_000


def student_group(obj: Any) -> str | None:
    """The optimizer group that trains the student (None: none does)."""
    return next((g for g, roles in obj.groups.items() if "student" in roles), None)


def update_counts(obj: Any, steps: int, start: int = 0, name: str = "objective") -> dict[str, int]:
    """Updates of each optimizer group over steps [start, steps) (attempted updates: a skipped
    non-finite update counts). A phase that names no group is a TypeError."""
    counts = {g: 0 for g in obj.groups}
    for s in range(start, steps):
        for ph in obj.phases(s):
            if ph not in counts:
                raise TypeError(f"objective {name!r}: phases({s}) names {ph!r}, not one of its groups")
            counts[ph] += 1
    return counts


def resolve_steps(cfg: Config, obj: Any) -> int:
    """The run's step count: `steps`, or, with `generator_steps`, the smallest step count whose
    phases update the student's group that many times. Raises ConfigError naming both keys when
    both are set and disagree."""
    if cfg.generator_steps is None:
        return int(cfg.steps)
    want = int(cfg.generator_steps)
    g = student_group(obj)
    if g is None:
        raise ConfigError(
            f"generator_steps={want}: objective {cfg.objective.name!r} has no optimizer group "
            "that trains the student; set steps instead"
        )
    n = 0
    for s in range(_MAX_STEPS):
        if g in obj.phases(s):
            n += 1
            if n == want:
                break
    else:
        raise ConfigError(
            f"generator_steps={want}: objective {cfg.objective.name!r} does not reach that many "
            f"updates of group {g!r} in {_MAX_STEPS} steps"
        )
    total = s + 1
    if cfg.steps is not None and int(cfg.steps) != total:
        per = total / want
        raise ConfigError(
            f"steps={cfg.steps} and generator_steps={want} disagree: objective "
            f"{cfg.objective.name!r} updates group {g!r} once every {per:g} steps, so "
            f"{want} generator updates take steps={total}; set one of the two"
        )
    return total
