"""Learning-rate schedules: diffusers' `get_scheduler`, the one the diffusers training scripts use.

    sched = make_scheduler(optimizer, "cosine", warmup_steps=100, total_steps=10_000)

Names: diffusers' own (linear, cosine, cosine_with_restarts, polynomial, constant,
constant_with_warmup) and two kept from fewstep's first presets: `constant` with warmup_steps > 0
is diffusers' constant_with_warmup (fewstep's constant always had the linear warm-up), and
`cosine_restarts` is cosine_with_restarts. Steps count the updates of the optimizer's group.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEDULERS", "make_scheduler"]

SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup")
_OLD_NAMES = {"cosine_restarts": "cosine_with_restarts"}


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule `name` over `total_steps` updates with `warmup_steps` of linear warm-up (from 0)."""
    from diffusers.optimization import get_scheduler

    name = _OLD_NAMES.get(name, name)
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    if name not in SCHEDULERS:
        raise ValueError(f"unknown learning-rate scheduler {name!r}; known: {', '.join(SCHEDULERS)}, cosine_restarts")
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=int(warmup_steps),
        num_training_steps=max(1, int(total_steps)),
        num_cycles=int(num_cycles),
    )
