"""LoRA students and fake scores via peft, the factories behind `ctx.make_student` /
`ctx.make_copy`, and merging adapters back into plain weights for export.

A LoRA copy shares the teacher's frozen weight tensors (no second copy of the base model) unless
the networks are sharded with FSDP, where every network is sharded on its own and gets its own
copy. Adapters start with B = 0 (peft's default), so a LoRA student starts equal to the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..families import default_lora_targets, family_by_name

__all__ = [
    "lora_targets",
    "add_lora",
    "has_lora",
    "copy_backbone",
    "make_factories",
    "merge_lora_state_dict",
    "lora_only_state_dict",
]


def lora_targets(backbone: nn.Module, targets: list[str] | None = None, family: str | None = None) -> list[str]:
    """The configured targets, or the family default (`Family.lora_targets`), keeping only
    suffixes present in the model."""
    if targets is None:
        targets = list(family_by_name(family).lora_targets if family else default_lora_targets(backbone))
    names = [n for n, _ in backbone.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(
            f"lora.target_modules={targets}: none of these module names occur in {type(backbone).__name__}"
        )
    return present


def add_lora(
    backbone: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Inject LoRA adapters in place; only adapter weights stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    backbone.requires_grad_(False)
    cfg = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        init_lora_weights=True,
    )
    inject_adapter_in_model(cfg, backbone, adapter_name=adapter_name)
    for n, p in backbone.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n and p.dtype != torch.float32:  # peft follows the base dtype; train adapters in fp32
            p.data = p.data.float()
    backbone._fewstep_lora = {
        "rank": int(rank),
        "alpha": float(alpha),
        "targets": list(targets),
        "adapter": adapter_name,
    }
    return backbone


def has_lora(backbone: nn.Module) -> bool:
    return any("lora_" in n for n, _ in backbone.named_parameters())


def copy_backbone(backbone: nn.Module, share_frozen: bool) -> nn.Module:
    """A deep copy; with share_frozen the copy reuses the original's frozen parameter tensors
    (requires_grad False: a teacher's weights under LoRA, which stay frozen) and its buffers."""
    if not share_frozen:
        return copy.deepcopy(backbone)
    memo: dict[int, Any] = {id(p): p for p in backbone.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in backbone.buffers()})
    return copy.deepcopy(backbone, memo)


def make_factories(
    lora_cfg: Any, *, sharded: bool = False, gradient_checkpointing: bool = False, family: str | None = None
) -> tuple[Callable[[Denoiser], Denoiser], Callable[[Denoiser], Denoiser]]:
    """(make_student, make_copy) for a run: full trainable copies in float32, or LoRA on frozen
    weights, per `lora.student` / `lora.fake`."""

    def make(teacher: Denoiser, use_lora: bool) -> Denoiser:
        if use_lora:
            bb = copy_backbone(teacher.backbone, share_frozen=not sharded)
            targets = lora_targets(bb, lora_cfg.target_modules, family)
            add_lora(bb, lora_cfg.rank, lora_cfg.alpha, targets, lora_cfg.dropout)
        else:
            bb = copy_backbone(teacher.backbone, share_frozen=False).float()
            bb.requires_grad_(True)
        if gradient_checkpointing and getattr(bb, "_supports_gradient_checkpointing", False):
            bb.enable_gradient_checkpointing()
        return Denoiser(bb, teacher.path, teacher.conditioner)

    use_student = bool(getattr(lora_cfg, "student", False))
    use_fake = bool(getattr(lora_cfg, "fake", False))
    return (lambda teacher: make(teacher, use_student)), (lambda teacher: make(teacher, use_fake))


# ---------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------
def merge_lora_state_dict(sd: dict[str, Tensor], scale: float, adapter: str = "default") -> dict[str, Tensor]:
    """Fold peft LoRA weights of a backbone state dict into the base weights:
    W = W_base + scale * B A (Linear), and the same with A flattened over its kernel (Conv2d).
    Returns the plain model's keys (".base_layer" removed, adapter keys dropped)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k or ".lora_embedding_" in k or ".lora_magnitude" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    for k in sd:
        if not k.endswith(f".lora_A.{adapter}.weight"):
            continue
        mod = k[: -len(f".lora_A.{adapter}.weight")]
        a = sd[k].float()
        b = sd[f"{mod}.lora_B.{adapter}.weight"].float()
        wkey = f"{mod}.weight"
        if wkey not in out:
            raise KeyError(f"LoRA merge: {mod} has adapters but no base weight {mod}.base_layer.weight")
        w = out[wkey]
        if a.ndim == 2:
            delta = b @ a
        else:  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
            delta = (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
        out[wkey] = (w.float() + scale * delta).to(w.dtype)
    return out


def lora_only_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in sd.items() if "lora_" in k}


def lora_meta(backbone: nn.Module) -> dict | None:
    return getattr(backbone, "_fewstep_lora", None)
