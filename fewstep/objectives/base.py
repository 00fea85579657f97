"""What every objective looks like to the training entry point.

An objective receives its networks in its constructor (Denoisers built by `fewstep.pipeline_teacher`),
says which optimizer group trains which roles and which groups update at a given step, and
returns a loss plus scalars to log. It never steps optimizers, moves devices or reads global
arguments.

    obj.nets                  {"student": Denoiser, "fake": Denoiser, "teacher": Denoiser, ...}
    obj.groups                {"generator": ["student"], "guidance": ["fake", "disc"]}
    obj.phases(step)          ["guidance", "generator"]    groups to update at this step, in order
    obj.loss(phase, batch, step) -> (loss, {"name": float})
    obj.after_step(phase, step)  optional hook (EMA target networks)
    obj.sampling              {"times": [...], "renoise": "fresh" | "ddim"}  the student's sampler

The entry point may replace entries of `nets` with wrapped modules (DDP, FSDP); objectives call
networks only as functions, `net(x_t, t, cond, guidance, output=...)`, so wrappers see every pass.

A batch is {"cond": dict | None, "x0": real latents (B, C, H, W) or absent, "shape": (B, C, H, W)}.
Randomness comes from torch's global RNG (seeded and checkpointed by the entry point); what must
agree across processes (e.g. a backward-simulation step count) uses `step_generator(seed, step)`.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


@runtime_checkable
class Objective(Protocol):
    nets: dict[str, nn.Module]
    groups: dict[str, list[str]]
    sampling: dict[str, Any]

    def phases(self, step: int) -> list[str]: ...

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]: ...


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that gives the same draws on every process at a given step."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


def trainable_parameters(obj: Objective, group: str) -> list[nn.Parameter]:
    """Parameters with requires_grad of the roles an optimizer group trains."""
    params: list[nn.Parameter] = []
    for role in obj.groups[group]:
        params += [p for p in obj.nets[role].parameters() if p.requires_grad]
    return params


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / compile wrappers."""
    while hasattr(net, "module") and isinstance(net.module, nn.Module):
        net = net.module
    return getattr(net, "_orig_mod", net)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module
