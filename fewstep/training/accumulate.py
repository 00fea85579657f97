"""Gradient accumulation: one step's global batch through the loss in micro-batches.

`data.batch_size` is the global batch of a step: each of the W processes takes N / W samples,
and runs them through the objective's loss `data.micro_batch_size` samples at a time (all at once
when unset). A micro-batch's loss is a mean over its rows, so it is weighted by its share of the
process's samples before its backward; summed over micro-batches, and averaged over processes by
the entry point, the gradient is that of the mean loss over the whole global batch:

    grad = 1/W sum_p sum_m (n_m / (N / W)) grad L_m = sum_m (n_m / N) grad L_m

The optimizer then steps once. Since every objective's random draws are per sample, functions of
(seed, step, global sample index) (`fewstep.randomness`), and a micro-batch keeps its samples'
global positions in batch["index"], the numbers are the same as with one process and one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..conditioning import index_cond

__all__ = ["micro_batch_size", "split_batch", "accumulated_loss"]


def micro_batch_size(batch_size: int, num_processes: int, cap: int | None) -> int:
    """Rows per micro-batch: a process's share of the global batch, at most `cap`."""
    share = int(batch_size) // max(1, int(num_processes))
    return share if cap is None else max(1, min(share, int(cap)))


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """A process's batch (`fewstep.training.data`) cut into consecutive micro-batches of at most
    `size` rows; each keeps its rows' positions in the global batch ("index") and the global batch
    size. One piece (the batch itself) when it fits."""
    rows = int(tuple(batch["shape"])[0])
    if size >= rows:
        return [batch]
    out = []
    for lo in range(0, rows, size):
        hi = min(rows, lo + size)
        sl = torch.arange(lo, hi)
        mb: dict[str, Any] = {}
        for k, v in batch.items():
            if k == "shape":
                mb[k] = (hi - lo, *tuple(v)[1:])
            elif k == "cond":
                mb[k] = index_cond(v, sl.to(_device(v)))
            elif torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows:
                mb[k] = v[lo:hi]
            elif isinstance(v, list) and len(v) == rows:
                mb[k] = v[lo:hi]
            else:  # global_batch_size and other batch-wide entries
                mb[k] = v
        out.append(mb)
    return out


def _device(cond: Any) -> torch.device:
    for v in (cond or {}).values():
        if torch.is_tensor(v):
            return v.device
    return torch.device("cpu")


def accumulated_loss(
    obj: Any, phase: str, batches: list[dict[str, Any]], step: int, backward: Callable[[Tensor], None]
) -> tuple[Tensor, dict[str, float]]:
    """Loss and backward of `phase` over a process's micro-batches, each weighted by its share of
    the rows. Returns the process's mean loss (detached) and the objective's scalars averaged the
    same way (a scalar a micro-batch does not report is averaged over those that do)."""
    rows = [int(tuple(b["shape"])[0]) for b in batches]
    total_rows = sum(rows)
    total: Tensor | None = None
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for b, n in zip(batches, rows):
        w = n / total_rows
        loss, logs = obj.loss(phase, b, step)
        backward(loss * w if len(batches) > 1 else loss)
        part = loss.detach().float() * w
        total = part if total is None else total + part
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    if total is None:
        raise ValueError("no micro-batches to run")
    return total, {k: sums[k] / weights[k] for k in sums}
