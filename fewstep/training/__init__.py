"""The training machinery behind `accelerate launch train/train.py` and `fewstep train`:
the loop (`run`, which returns the trained student and the objective with the run's outputs), the
final outputs (weights, grids, run card), checkpoints, EMA, LoRA and shared-base networks, the
teacher bundle, data, logging, memory estimates and the dry run."""

from __future__ import annotations

from typing import Any

__all__ = ["run", "RunResult", "NonFiniteError", "dry_run", "TeacherBundle"]


def __getattr__(name: str) -> Any:  # keep `import fewstep.training` light
    if name in ("run", "RunResult", "NonFiniteError"):
        from . import loop

        return getattr(loop, name)
    if name == "dry_run":
        from .dry_run import dry_run

        return dry_run
    if name == "TeacherBundle":
        from .bundle import TeacherBundle

        return TeacherBundle
    raise AttributeError(name)
