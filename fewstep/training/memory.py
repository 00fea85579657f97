"""Parameter counts, memory estimates per process (for --dry-run), and measured peaks.

The estimate counts what lives for the whole run: weights in their storage dtype, and for
trainable weights a float32 gradient, AdamW's two float32 moments and (for the student) a float32
EMA shadow. Under FSDP all of it is divided by the number of processes (the teacher included).
Activations are not included: they depend on batch size, resolution and checkpointing.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "RoleMemory",
    "role_memory",
    "estimate_table",
    "format_bytes",
    "format_count",
    "peak_memory_bytes",
    "current_rss_bytes",
    "reset_peak",
]


@dataclass
class RoleMemory:
    role: str
    cls: str
    params: int  # parameters of this role not already counted for an earlier role
    shared: int  # parameters shared with an earlier role (counted there)
    trainable: int
    weight_bytes: int
    grad_bytes: int
    optim_bytes: int
    ema_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optim_bytes + self.ema_bytes


def _elt(p: torch.Tensor) -> int:
    return p.element_size()


def role_memory(
    nets: dict[str, nn.Module],
    trainable_roles: set[str],
    ema_role: str | None,
    num_processes: int = 1,
    sharded: bool = False,
    order: tuple[str, ...] = ("teacher", "student", "fake", "disc", "discriminator"),
) -> list[RoleMemory]:
    """Per-role counts and bytes per process. Shared tensors (a LoRA student on the teacher's
    weights, one network under two roles) are counted once, for the first role in `order`; the
    gradient and AdamW states of a trainable tensor are counted for the role that trains it, also
    when an earlier role holds it (shared-base mode: the adapters live in the teacher's backbone)."""
    seen: set[int] = set()
    trained: set[int] = set()
    roles = sorted(nets, key=lambda r: (order.index(r) if r in order else len(order), r))
    div = num_processes if sharded else 1
    out = []
    for role in roles:
        m = nets[role]
        own = shared = trainable = wb = gb = ob = eb = 0
        for p in m.parameters():
            n = p.numel()
            if id(p) in seen:
                shared += n
            else:
                seen.add(id(p))
                own += n
                wb += n * _elt(p)
            if p.requires_grad and role in trainable_roles and id(p) not in trained:
                trained.add(id(p))
                trainable += n
                gb += n * 4
                ob += 2 * n * 4
                if role == ema_role:
                    eb += n * 4
        bb = getattr(m, "backbone", m)
        cls = type(bb).__name__.removeprefix("FSDP")
        out.append(RoleMemory(role, cls, own, shared, trainable, wb // div, gb // div, ob // div, eb // div))
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def format_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def estimate_table(rows: list[RoleMemory]) -> str:
    head = (
        f"{'role':<10} {'class':<26} {'params':>9} {'trainable':>17} {'weights':>11} {'grads':>11} "
        f"{'adamw':>11} {'ema':>11} {'total':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = f" ({100 * r.trainable / max(1, r.params + r.shared):.1f}%)" if r.trainable else ""
        pshow = format_count(r.params) + (f" +{format_count(r.shared)} shared" if r.shared else "")
        lines.append(
            f"{r.role:<10} {r.cls[:26]:<26} {pshow:>9} {format_count(r.trainable) + pct:>17} "
            f"{format_bytes(r.weight_bytes):>11} {format_bytes(r.grad_bytes):>11} "
            f"{format_bytes(r.optim_bytes):>11} {format_bytes(r.ema_bytes):>11} {format_bytes(r.total):>11}"
        )
    tot = sum(r.total for r in rows)
    lines.append(
        f"{'total':<10} {'':<26} {format_count(sum(r.params for r in rows)):>9} "
        f"{format_count(sum(r.trainable for r in rows)):>17} {'':>11} {'':>11} {'':>11} {'':>11} "
        f"{format_bytes(tot):>11}"
    )
    return "\n".join(lines)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        return 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> dict[str, int]:
    """{"cuda_peak": bytes allocated at peak (CUDA), "rss_peak": the process's peak resident set}."""
    out = {"rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return out
