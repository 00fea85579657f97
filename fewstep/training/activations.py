"""The activation term of the `--dry-run` memory plan: the bytes a backbone keeps for backward
during one forward pass with gradients, measured on the meta device (no memory, no weights read).

One pass of the backbone through its conditioner (the adapter's own call, so the keyword
arguments are the family's) runs under `saved_tensors_hooks`, and every distinct storage saved
for backward that is not a weight is counted once. With activation checkpointing on, a
checkpointed block saves only its inputs, and the count shows it. The plan adds one such pass at
the per-process batch: score-distillation objectives run their gradient-recording passes one
phase at a time, and a phase's backward frees its activations before the next phase starts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["activation_bytes", "example_condition"]


def example_condition(bundle: Any, batch: int, device: str | torch.device = "cpu") -> dict | None:
    """A condition of the right shapes for `bundle`'s backbone, where the bundle says enough to
    build one (class labels for class-conditional teachers); else None (the plan then says the
    activations were not estimated)."""
    if getattr(bundle, "num_classes", None) and not getattr(bundle, "text", False):
        return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
    return None


def activation_bytes(denoiser: Any, latent_shape: tuple[int, ...], batch: int, cond: dict | None) -> int:
    """Bytes saved for backward by one forward pass of `denoiser.backbone` at `batch` (meta
    device; the backbone's own checkpointing setting applies; a shared-base role view runs with
    its adapter active)."""
    bb: nn.Module = denoiser.backbone
    shared, role = getattr(denoiser, "shared", None), getattr(denoiser, "role", None)
    weights = {p.untyped_storage()._cdata for p in bb.parameters()}
    weights |= {b.untyped_storage()._cdata for b in bb.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in weights:
            saved[s._cdata] = s.nbytes()
        return t

    p0 = next(bb.parameters())  # the meta device in a dry run (a real teacher: its own device)
    x = torch.zeros(batch, *latent_shape, device=p0.device, dtype=p0.dtype, requires_grad=True)
    timestep = torch.full((batch,), 500.0, device=p0.device)
    meta_cond = {k: (v.to(p0.device) if torch.is_tensor(v) else v) for k, v in (cond or {}).items()}
    was_training = bb.training
    bb.train()  # as in training (some backbones checkpoint only in training mode)
    if shared is not None:  # a shared-base role view: its adapter takes part, as in the run
        shared.activate(role)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            denoiser.conditioner.call(bb, x, timestep, meta_cond)
    finally:
        bb.train(was_training)
        if shared is not None:
            shared.activate(None)
    return sum(saved.values())
