"""Shared-base networks: the teacher's backbone with one LoRA adapter per trainable role, and a
Denoiser view of each role, so a DMD2 run (teacher, student, fake score) holds one backbone
instead of three. Built by `fewstep.objectives.dmd.build` when `objective.shared_base` is true.
"""

from __future__ import annotations

import copy
import re
import warnings

from torch import Tensor, nn

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..families import default_lora_targets

__all__ = ["SharedBase", "RoleView"]


class SharedBase:
    """The teacher's backbone with one LoRA adapter per trainable role (peft), so a DMD2 run
    holds one backbone instead of three.

    `activate(role)` selects the adapter that takes part in the next forward pass (None disables
    all: the teacher). Autograd records the weights that a pass used, so a backward reaches only
    the adapter that was active during that pass, whatever is active when backward runs. peft's
    `set_adapter` also flips requires_grad of the inactive adapters; `activate` restores it, so
    every adapter stays trainable by its own optimizer. The default state is "disabled", so the
    teacher Denoiser keeps behaving as the teacher outside role calls.

    Activation checkpointing goes through `enable_checkpointing`, whose rerun of a block in
    backward reactivates the adapter of its forward pass (`fewstep.training.checkpointing`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        roles: list[str],
        rank: int = 16,
        alpha: float = 16.0,
        targets: list[str] | tuple[str, ...] | None = None,
        dropout: float = 0.0,
    ):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser = denoiser
        bb = denoiser.backbone
        targets = tuple(targets or default_lora_targets(bb))
        names = [n for n, _ in bb.named_modules()]
        found = sorted({t for t in targets if any(n == t or n.endswith("." + t) for n in names)})
        if not found:
            raise ValueError(f"lora.target_modules: none of {list(targets)} names a module of {type(bb).__name__}")
        bb.requires_grad_(False)
        with warnings.catch_warnings():  # a second adapter on one model is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            for role in roles:
                cfg = LoraConfig(
                    r=int(rank), lora_alpha=float(alpha), target_modules=found, lora_dropout=float(dropout)
                )
                inject_adapter_in_model(cfg, bb, adapter_name=role)
        # what the entry point reads to save the final student with its adapter merged (the
        # same record fewstep.training.lora.add_lora leaves)
        bb._fewstep_lora = {"rank": int(rank), "alpha": float(alpha), "targets": found, "adapter": roles[0]}
        self.layers = [m for m in bb.modules() if isinstance(m, BaseTunerLayer)]
        self.roles = list(roles)
        self.adapter_params: dict[str, dict[str, nn.Parameter]] = {}
        for role in roles:
            pat = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(role)}\.")
            self.adapter_params[role] = {n: p for n, p in bb.named_parameters() if pat.search(n)}
            if not self.adapter_params[role]:  # pragma: no cover - peft naming changed
                raise RuntimeError(f"no LoRA weights found for role {role!r}")
        lora_ids = {id(p) for ps in self.adapter_params.values() for p in ps.values()}
        self.base_params = {n: p for n, p in bb.named_parameters() if id(p) not in lora_ids}
        self._active: str | None = "?"
        self.activate(None)
        if getattr(bb, "is_gradient_checkpointing", False):  # stock checkpointing would rerun blocks
            self.enable_checkpointing()  # under whichever adapter is active in backward

    @property
    def active(self) -> str | None:
        """The role whose adapter takes part in a forward pass now (None: the teacher)."""
        return self._active

    def enable_checkpointing(self) -> None:
        """Activation checkpointing of the backbone's blocks, each rerun in backward under the
        adapter that was active in its forward pass."""
        from .checkpointing import role_checkpoint_function

        self.denoiser.backbone.enable_gradient_checkpointing(role_checkpoint_function(self))

    def activate(self, role: str | None) -> None:
        if role == self._active:
            return
        if role is not None and role not in self.roles:
            raise KeyError(f"no adapter for role {role!r}; roles are {self.roles}")
        for layer in self.layers:
            if role is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(role)
                layer.enable_adapters(True)
        for ps in self.adapter_params.values():
            for p in ps.values():
                p.requires_grad_(True)
        self._active = role

    def parameter_bytes(self) -> int:
        """Bytes of every weight held (base once, plus all adapters)."""
        return sum(p.numel() * p.element_size() for p in self.denoiser.backbone.parameters())


class RoleView(Denoiser):
    """One role of a `SharedBase`, called like a Denoiser (it is one, for code that asks).

    It registers as its own parameters only that role's weights (the student's or fake's adapter;
    the teacher's frozen base weights), so optimizers, gradient averaging, DDP wrappers and
    checkpoints see each trainable weight under exactly one role; `backbone`, `path` and
    `conditioner` are the shared ones. Device and dtype moves (`.to`) apply to the whole shared
    backbone. Only `forward` switches adapters: call the view as a function.
    """

    def __init__(self, shared: SharedBase, role: str | None):
        nn.Module.__init__(self)  # not Denoiser.__init__: the backbone is not a submodule here
        object.__setattr__(self, "_shared", shared)
        self.role = role
        params = shared.adapter_params[role] if role is not None else shared.base_params
        self.weights = nn.ParameterDict({n.replace(".", "__"): p for n, p in params.items()})

    @property
    def shared(self) -> SharedBase:
        return self._shared

    @property
    def path(self):
        return self._shared.denoiser.path

    @property
    def conditioner(self):
        return self._shared.denoiser.conditioner

    @property
    def backbone(self) -> nn.Module:
        return self._shared.denoiser.backbone

    def forward(self, x_t: Tensor, t, cond: Cond | None = None, guidance=1.0, output: str = "x0"):
        self._shared.activate(self.role)
        try:
            return self._shared.denoiser(x_t, t, cond, guidance, output=output)
        finally:
            self._shared.activate(None)

    def _apply(self, fn, recurse=True):
        self._shared.denoiser._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def standalone(self) -> Denoiser:
        """A plain Denoiser with this role's adapter merged into a copy of the base weights (for
        export and evaluation with stock code)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        den = self._shared.denoiser
        bb = copy.deepcopy(den.backbone)
        tuner = [(n, m) for n, m in bb.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, m in tuner:
            if self.role is not None:
                m.set_adapter(self.role)
                m.enable_adapters(True)
                m.merge(adapter_names=[self.role])
            parent_name, _, child = name.rpartition(".")
            parent = bb.get_submodule(parent_name) if parent_name else bb
            setattr(parent, child, m.get_base_layer())
        bb.requires_grad_(False)
        return Denoiser(bb, den.path, den.conditioner)
