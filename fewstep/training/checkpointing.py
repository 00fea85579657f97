"""Activation checkpointing of the trainable backbones (`precision.gradient_checkpointing`).

A checkpointed block keeps only its inputs in the forward pass and runs again during backward to
rebuild what its gradient needs: less activation memory for about one extra forward per backward.
diffusers backbones checkpoint their own blocks (`enable_gradient_checkpointing`); what this module
adds is the shared-base case, where one backbone serves the teacher, the student and the fake score
through LoRA adapters switched per call (`fewstep.training.shared_base`). There the rerun in
backward must see the adapter that was active in the forward pass, not whichever is active when
backward reaches the block, so the checkpoint function remembers the role and reactivates it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["enable_activation_checkpointing", "role_checkpoint_function"]


def role_checkpoint_function(shared: Any):
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing` that reruns a
    block in backward under the adapter (`shared.active`) that was active in its forward pass."""

    def checkpoint(block: nn.Module, *args):
        role = shared.active

        def run(*inputs):
            before = shared.active
            shared.activate(role)  # a no-op in the forward pass; the recorded role in backward
            try:
                return block(*inputs)
            finally:
                shared.activate(before)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpoint


def enable_activation_checkpointing(nets: Iterable[nn.Module], say=print) -> list[str]:
    """Checkpoint the blocks of every backbone among `nets` that has trainable weights.

    A shared-base role view (an object with `.shared`) enables it once for the shared backbone with
    the role-aware function. Returns the class names of trainable backbones that cannot checkpoint
    (they train without it; `say` prints one line for each)."""
    from ..objectives.base import unwrap

    done: set[int] = set()
    skipped: list[str] = []
    for net in nets:
        net = unwrap(net)
        shared = getattr(net, "shared", None)
        bb = getattr(net, "backbone", None)
        if not isinstance(bb, nn.Module) or id(bb) in done:  # heads and other small modules: no blocks
            continue
        if not any(p.requires_grad for p in net.parameters()):  # the frozen teacher (role view)
            continue
        done.add(id(bb))
        if not getattr(bb, "_supports_gradient_checkpointing", False):
            skipped.append(type(bb).__name__)
            say(
                f"precision.gradient_checkpointing: {type(bb).__name__} has no block checkpointing; "
                "it trains without it"
            )
            continue
        if shared is not None:
            shared.enable_checkpointing()
        elif not getattr(bb, "is_gradient_checkpointing", False):
            bb.enable_gradient_checkpointing()
    return skipped
