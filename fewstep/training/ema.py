"""Exponential moving average of the student's trainable weights (float32 shadows; sharded like
the weights themselves under FSDP, since the shadows are DTensors then)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """shadow <- rate * shadow + (1 - rate) * weight after each student update; before
    `start_step` the shadow just follows the weights.

    Args:
        params:     name -> parameter (the student's trainable weights).
        rate:       decay in [0, 1).
        start_step: steps before this copy the weights instead of averaging.
    """

    def __init__(self, params: dict[str, nn.Parameter], rate: float, start_step: int = 0):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema.rate must lie in [0, 1), got {rate}")
        self.rate = float(rate)
        self.start_step = int(start_step)
        self.params = dict(params)
        self.shadow: dict[str, Tensor] = {n: p.detach().clone().float() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        for n, p in self.params.items():
            s = self.shadow[n]
            if step < self.start_step:
                s.copy_(p.detach().float())
            else:
                s.lerp_(p.detach().float(), 1.0 - self.rate)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        unexpected = sorted(set(sd) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for n, v in sd.items():
            self.shadow[n].copy_(v)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Run with the EMA weights in the student, then put the trained weights back."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])
