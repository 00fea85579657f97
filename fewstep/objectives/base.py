"""The objective contract, stated once: what a builder receives, what an objective exposes, what
a batch holds and what the training entry point does with it. Everything else points here.

An objective receives its networks through its builder, says which optimizer group trains which
roles and which groups update at a given step, and returns a loss plus scalars to log. It never
steps optimizers, moves devices, reads global arguments or branches on a backbone's class or
prediction type (it asks the path, the `Denoiser` or the family record, `fewstep.families`).

The objective module
--------------------
1. A dataclass of its hyperparameters, every field with a default and a short comment: the keys
   a preset writes under `objective:` (and `objective.<field>=value` on the command line). The
   registry (`fewstep.objectives.registry`) finds it as the builder's `CONFIG` attribute, else
   the dataclass in the annotation of the builder's first parameter, else `<Name>Config` /
   `<Name>Params` in the module (Name: the objective name without underscores, any case). The
   registry builds it from the preset (unknown keys and wrong types are errors naming
   `objective.<key>`) and calls its `validate()` when that takes no arguments; `validate()`
   raises ValueError naming `objective.<key>` (a check that needs run facts, e.g.
   has_real_data, is the builder's).
2. A builder `build(params, teacher, ctx) -> Objective`:
     params   the dataclass instance (builders may also accept a plain dict, for their tests);
     teacher  the frozen teacher `Denoiser` (requires_grad False, on ctx.device); guidance goes
              through its call, `teacher(x_t, t, cond, guidance=w, output=...)`;
     ctx      a `registry.BuildContext`: shapes, data facts, device, seed, family, and the
              factories `ctx.make_student(teacher)` / `ctx.make_copy(teacher)` that return
              trainable Denoisers as the run asks (full copies, or LoRA on frozen teacher weights;
              gradient checkpointing). Use them rather than copying the teacher, so LoRA and
              memory settings apply. A network whose architecture differs from the teacher's
              (e.g. an LCM w-embedding, through `Family.w_embedding`) is made by the objective.
   Register the name in `registry.REGISTRY`.

The objective (`Objective` below; optional members may be absent)
-----------------------------------------------------------------
    nets          {"teacher": ..., "student": ..., "fake": ..., "disc": ...}: every nn.Module it
                  uses. The entry point may place, shard (FSDP2) or wrap (DDP) these: call them
                  only as functions through `self.nets[role](...)` at loss time, never through a
                  reference kept from the constructor. Networks are called as
                  `net(x_t, t, cond, guidance, output=...)`. The teacher (the role "teacher", or
                  the teacher Denoiser under any name) is never saved; every other tensor that is
                  not a frozen tensor shared with the teacher is checkpointed (targets, EMA copies).
                  A role "student_ema" (an EMA the objective keeps itself) is written as the run's
                  final/student_ema when the entry point's own EMA (ema.rate) is off.
    groups        {"generator": ["student"], "fake_score": ["fake", "disc"]}: optimizer group ->
                  roles; a group trains the parameters of its roles that have requires_grad at
                  start. The student's group is named "generator" (the presets' `optim.generator`).
    phases(step)  ["fake_score", "generator"]: the groups to update at this step, in order.
    loss(phase, batch, step) -> (scalar loss, {"name": float}) for that group.
    sampling      the student's sampler: {"times": [1.0, ..., 0.0], "renoise": "fresh" | "ddim"},
                  optionally "prediction_type" and "guidance_embedding" ({"key", "dim",
                  "guidance"}: a w-conditioned student), recorded in the run card for export.
    after_step(phase, step)            optional: called after a successful update of `phase`.
    optim                              optional {group: {"lr": ..., "betas": ..., ...}}: the
                  objective's recommended AdamW settings; a preset's `optim.<group>` overrides
                  them, and they override `optim.default`.
    state_dict() / load_state_dict(d)  optional: state outside `nets` that must survive a resume
                  (tensors, numbers); weights and buffers in `nets` are saved by the entry point.

The batch
---------
    {"cond": dict | None,                   the condition (`fewstep.conditioning.Cond`), batch first
     "x0": (B, C, H, W),                    real latents; present only when ctx.has_real_data
     "shape": (B, C, H, W),                 this process's share of the batch
     "index": (B,),                         positions of these samples in the global batch
     "global_batch_size": int}
Randomness comes from torch's global RNG (seeded per process and checkpointed by the entry
point), or, where draws must not depend on the number of processes, from
`step_generator(seed, step)` over the global batch indexed by batch["index"] (see dsm.py).

The entry point, per phase: loss -> backward -> average gradients over processes -> clip the
group's gradient norm -> skip the update if the loss or the norm is not finite -> step the
group's optimizer and scheduler -> zero the gradients of ALL networks -> after_step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


# members an objective may leave out; the entry point uses them when present
OPTIONAL_MEMBERS = ("after_step", "optim", "state_dict", "load_state_dict")


@runtime_checkable
class Objective(Protocol):
    """See the module docstring. `isinstance(obj, Objective)` checks the required members."""

    nets: dict[str, nn.Module]
    groups: dict[str, list[str]]
    sampling: dict[str, Any]

    def phases(self, step: int) -> list[str]: ...

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]: ...

    if TYPE_CHECKING:  # optional members (OPTIONAL_MEMBERS): declared for readers and type checkers
        optim: dict[str, dict[str, Any]]

        def after_step(self, phase: str, step: int) -> None: ...

        def state_dict(self) -> dict[str, Any]: ...

        def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


def require_image_conditioned(name: str, ctx) -> None:
    """Restoration objectives need a teacher that takes the degraded image (its family record's
    `image_conditioned`); a clear start-up error otherwise."""
    from ..families import FAMILIES, family_by_name

    fam = getattr(ctx, "family", None)
    if fam not in FAMILIES or not family_by_name(fam).image_conditioned:
        raise ValueError(
            f"objective {name} restores images: teacher.source must be an image-conditioned teacher "
            f"(e.g. digits-restore), not a {fam!r} one"
        )
