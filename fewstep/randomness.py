"""Training randomness as a function of (seed, step, stream, global sample index).

A training step's global batch is split over processes and, with gradient accumulation, over
micro-batches. For the split not to change the training, every number an objective draws for
sample i of the global batch at step s must be the same whichever process and micro-batch holds
it. So each sample gets its own generator, seeded from (seed, step, stream, i):

    rng = SampleDraws.for_batch(batch, seed, step, "dmd/generator")
    eps = rng.normal(C, H, W)            # (B, C, H, W): row b from sample batch["index"][b]'s generator
    t = rng.uniform(low=0.02, high=1.0)  # (B,)
    k = rng.integers(0, 4)               # (B,) int64

Draws from one `SampleDraws` come in sequence from each sample's own generator, so a row's
numbers depend only on that sample and on the order of the calls (which an objective fixes in its
code), never on which other rows are in the batch. `stream` names the draw site (one per
objective and phase), so two phases of one step, or two objectives composed into one, do not
reuse each other's numbers. Numbers that are the same for the whole batch at a step (a
backward-simulation depth, a time route) come from `shared_generator(seed, step, stream)`.

Draws are made on the CPU (float32 unless asked) and moved to the device, so a seed gives the same
numbers on every device. The cost is one small generator per sample per stream and step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["SampleDraws", "shared_generator", "stream_seed"]


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (stable across processes, runs and Python versions)."""
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def shared_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that gives the same numbers on every process at (seed, step, stream)."""
    return torch.Generator().manual_seed(stream_seed(int(seed), int(step), stream, "shared"))


def _rows(batch: dict[str, Any], rows: int | None) -> int:
    if rows is not None:
        return int(rows)
    if batch.get("shape") is not None:
        return int(tuple(batch["shape"])[0])
    if batch.get("x0") is not None:
        return int(batch["x0"].shape[0])
    idx = batch.get("index")
    if idx is not None:
        return int(len(idx))
    raise ValueError("the batch has no 'shape', 'x0' or 'index' to count its samples")


class SampleDraws:
    """Per-sample random draws for the rows of one (micro-)batch; see the module docstring.

    Args:
        index:  (B,) positions of the rows in the step's global batch.
        seed, step, stream: what the numbers are a function of, with the index.
        device: where the drawn tensors go (drawn on the CPU).
    """

    def __init__(self, index: Tensor | list[int], seed: int, step: int, stream: str, device: Any = None):
        self.index = [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._gens = [torch.Generator().manual_seed(stream_seed(int(seed), int(step), stream, i)) for i in self.index]

    @classmethod
    def for_batch(
        cls, batch: dict[str, Any], seed: int, step: int, stream: str, device: Any = None, rows: int | None = None
    ) -> SampleDraws:
        """Draws for the rows of `batch`: its "index" (positions in the global batch), or 0..B-1
        for a batch without one (a single-process batch built by hand)."""
        idx = batch.get("index")
        if idx is None:
            idx = list(range(_rows(batch, rows)))
        return cls(idx, seed, step, stream, device)

    def __len__(self) -> int:
        return len(self.index)

    def _stack(self, parts: list[Tensor], dtype: torch.dtype | None) -> Tensor:
        if not parts:
            raise ValueError("no rows to draw for")
        out = torch.stack(parts)
        return out.to(device=self.device, dtype=dtype or out.dtype)

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard normal."""
        return self._stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in self._gens], dtype)

    def normal_like(self, x: Tensor) -> Tensor:
        """Standard normal of x's shape (rows = samples), dtype and device."""
        if x.shape[0] != len(self):
            raise ValueError(f"normal_like: {x.shape[0]} rows, but draws for {len(self)} samples")
        return self.normal(*x.shape[1:]).to(device=x.device, dtype=x.dtype)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) uniform on [low, high); drawn in float64 so that `dtype` may be float64."""
        u = self._stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in self._gens], torch.float64)
        return (low + (high - low) * u).to(dtype)

    def integers(self, low: int, high: int, *shape: int) -> Tensor:
        """(B, *shape) int64 uniform on {low, ..., high - 1}."""
        return self._stack([torch.randint(int(low), int(high), shape, generator=g) for g in self._gens], torch.long)
