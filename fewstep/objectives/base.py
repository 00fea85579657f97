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
    lr_scales                          optional {role: factor}: that role's parameters get their own
                  parameter group in their optimizer group, at factor x its learning rate (Flash-DMD's
                  `disc_lr_scale` for its discriminator heads).
    state_dict() / load_state_dict(d)  optional: state outside `nets` that must survive a resume
                  (tensors, numbers); weights and buffers in `nets` are saved by the entry point.

The batch
---------
    {"cond": dict | None,                   the condition (`fewstep.conditioning.Cond`), batch first
     "x0": (B, C, H, W),                    real latents; present only when ctx.has_real_data
     "shape": (B, C, H, W),                 this process's share of the batch
     "index": (B,),                         positions of these samples in the global batch
     "global_batch_size": int}
The batch may be one micro-batch of this process's share (`data.micro_batch_size`): "shape" is its
own, "index" its rows' positions in the global batch. The entry point weights each micro-batch's
loss by its share of the rows, so `loss` must be a mean over its rows (of per-sample terms, or of
terms normalised by global-batch counts, as twinflow's parts and tbcm's point subsets are).

Randomness: every draw in `loss` is per sample, a function of (seed, step, stream, the sample's
index in the global batch), through `fewstep.randomness.SampleDraws.for_batch(batch, seed, step,
stream)`; a number shared by the whole batch at a step comes from
`fewstep.randomness.shared_generator(seed, step, stream)` (or `step_generator`; `GlobalBatchDraws`
draws for the whole global batch from it and keeps this batch's rows). Never torch's
global generator: then a step trains the same however the global batch is split over processes
and micro-batches (tests/test_accumulation.py, tests/test_distributed.py check every objective).
Known exceptions, batch statistics: decoupled_dmd with dm_kind "meanvar" compares channel
statistics of each micro-batch (not of the global batch) with the reference, and DMD's cached
teacher samples (regression, meanvar "teacher") of a text teacher tile the first batch's prompts.

The entry point, per phase: loss -> backward -> average gradients over processes -> clip the
group's gradient norm -> skip the update if the loss or the norm is not finite -> step the
group's optimizer and scheduler -> zero the gradients of ALL networks -> after_step.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Any]


# members an objective may leave out; the entry point uses them when present
OPTIONAL_MEMBERS = ("after_step", "optim", "lr_scales", "state_dict", "load_state_dict")


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
        lr_scales: dict[str, float]

        def after_step(self, phase: str, step: int) -> None: ...

        def state_dict(self) -> dict[str, Any]: ...

        def load_state_dict(self, state: dict[str, Any]) -> None: ...


def import_factory(key: str, spec: str) -> Callable[..., Any]:
    """The callable a preset names as "module.path:factory" under `key` (e.g. objective.reward), or
    an error naming the key and what could not be imported."""
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r}: cannot import {attr} from {mod}: {e}") from None


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that gives the same draws on every process at a given step."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class GlobalBatchDraws:
    """Draws for the whole global batch from one `step_generator(seed, step)`, of which a
    (micro-)batch keeps its own rows (batch["index"], or 0..rows-1 for a batch without one): as
    split-invariant as `SampleDraws`, in one generator's sequence. IR-CM, TAD-SR and NCT draw this
    way; each call draws the next numbers of the sequence for all global rows.

        draws = GlobalBatchDraws(batch, seed, step, rows=B, device=dev)
        eps = draws.normal(C, H, W)     # (B, C, H, W)
        u = draws.uniform()             # (B,)
        n = draws.integers(K)           # (B,) in [0, K)
    """

    def __init__(self, batch: Batch, seed: int, step: int, rows: int, device: Any = None):
        self.generator = step_generator(seed, step)
        self.size = int(batch.get("global_batch_size", rows))
        idx = batch.get("index")
        self.index = torch.arange(rows) if idx is None else idx.cpu()
        self.device = device

    def _mine(self, x: Tensor) -> Tensor:
        return x[self.index].to(self.device)

    def normal(self, *shape: int) -> Tensor:
        return self._mine(torch.randn((self.size, *shape), generator=self.generator))

    def uniform(self, dtype: torch.dtype | None = None) -> Tensor:
        return self._mine(torch.rand(self.size, generator=self.generator, dtype=dtype))

    def integers(self, high: int) -> Tensor:
        return self._mine(torch.randint(0, high, (self.size,), generator=self.generator))


def phase_loss(
    name: str, losses: dict[str, Callable[[Batch, int], Any]], phase: str, batch: Batch, step: int
) -> tuple[Tensor, dict[str, float]]:
    """`Objective.loss` for an objective with one loss function per phase (`losses`: phase ->
    loss(batch, step)); an unknown phase is a ValueError naming the objective `name`'s phases."""
    if phase not in losses:
        raise ValueError(f"unknown phase {phase!r}; {name} has {' and '.join(repr(p) for p in losses)}")
    return losses[phase](batch, step)


def checked_params(params: Any, cls: type) -> Any:
    """A builder's hyperparameters as its dataclass `cls` (builders accept a plain dict too, for
    their tests), validated."""
    if not isinstance(params, cls):
        params = cls(**dict(params or {}))
    params.validate()
    return params


def run_facts(ctx: Any) -> dict[str, Any]:
    """The keyword arguments an objective's constructor takes from the BuildContext: the run's
    seed, the latent shape (C, H, W) and the device."""
    return {
        "seed": int(getattr(ctx, "seed", 0)),
        "latent_shape": tuple(ctx.latent_shape),
        "device": getattr(ctx, "device", None),
    }


def refuse_settings(ctx: Any, **why: str) -> None:
    """A builder's refusal of run settings it cannot work with: raise ValueError(why[key]) for the
    first BuildContext flag `key` among `why` that is set on ctx (absent flags count as unset)."""
    for key, message in why.items():
        if getattr(ctx, key, False):
            raise ValueError(message)


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


@torch.no_grad()
def ema_toward(target: nn.Module, source: nn.Module, decay: float, trainable_only: bool = False) -> None:
    """target <- decay target + (1 - decay) source, parameter by parameter (matched by name, both
    reached through `unwrap`); with trainable_only, over the source's trained parameters only."""
    tgt = dict(unwrap(target).named_parameters())
    for name, q_s in unwrap(source).named_parameters():
        if trainable_only and not q_s.requires_grad:
            continue
        q_t = tgt.get(name)
        if q_t is None:
            raise RuntimeError(f"EMA target: the target network has no parameter {name} of the source")
        q_t.lerp_(q_s.detach().to(q_t.dtype), 1.0 - decay)


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
