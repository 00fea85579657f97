"""The DMD family's builder: `params` checked against the run, the networks made (separate
student and fake score from the run's factories, or LoRA role views of one shared backbone), the
GAN head and its feature tap, the teacher's fingerprint for the sample caches; returns the
`DMDObjective` (`fewstep.objectives.dmd`). MSD and Flash-DMD build their DMD2 part with it."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..denoiser import Denoiser, copy_denoiser
from ..training.shared_base import RoleView, SharedBase
from .base import run_facts, unwrap
from .dmd import DMDObjective
from .dmd_params import DMDParams, check_run
from .gan import DiscriminatorHead, FeatureTap, feature_layer
from .regression import teacher_fingerprint

__all__ = ["build_dmd"]


def build_dmd(params: DMDParams, teacher: Denoiser, ctx: Any) -> DMDObjective:
    """Check `params` against the run, make the networks, return the objective.

    ctx (a registry BuildContext, or any object with these attributes): latent_shape,
    has_real_data, seed, device, num_classes, make_student / make_copy (full copies when absent),
    lora (rank / alpha / target_modules / dropout for shared-base mode), sharded,
    gradient_checkpointing (shared-base mode: checkpointing that reruns blocks under their role).
    """
    params.validate()
    check_run(params, teacher, ctx)
    teacher.requires_grad_(False)
    ddmd = params.variant == "ddmd"
    # Decoupled DMD with the mean/variance regulariser (or without the DM term) never queries a fake
    # score; it is then built only to feed the GAN head
    needs_fake = not ddmd or (params.dm_kind == "dm" and params.dm_weight != 0) or params.gan
    latent_shape = tuple(ctx.latent_shape)
    needs_key = params.regression_weight > 0 or (
        ddmd and params.dm_kind == "meanvar" and params.meanvar_target == "teacher"
    )
    key = teacher_fingerprint(teacher) if needs_key else None
    if params.shared_base:
        t_net, student, fake, fake_backbone = _shared_networks(teacher, ctx, needs_fake)
    else:
        t_net, student, fake, fake_backbone = _separate_networks(teacher, ctx, needs_fake)
    disc = tap = None
    if params.gan:
        feature_backbone = teacher.backbone if params.gan_features == "teacher" else fake_backbone
        block, channels = feature_layer(feature_backbone, params.gan_feature_layer, params.gan_block)
        # sharded backbones run every layer: FSDP's hooks on the layers after the tap must run
        tap = FeatureTap(block, early_exit=not getattr(ctx, "sharded", False))
        disc = DiscriminatorHead(channels, latent_shape[1:], params.gan_head_width)
        dev = getattr(ctx, "device", None)
        if dev is not None:
            disc.to(dev)
    return DMDObjective(
        params,
        t_net,
        student,
        fake,
        disc=disc,
        tap=tap,
        teacher_key=key,
        num_classes=getattr(ctx, "num_classes", None),
        **run_facts(ctx),
    )


def _shared_networks(teacher: Denoiser, ctx: Any, needs_fake: bool) -> tuple[nn.Module, nn.Module, Any, nn.Module]:
    """Shared-base mode: teacher, LoRA student and LoRA fake score as role views of one frozen
    backbone. Returns (teacher, student, fake or None, the fake score's backbone)."""
    lora = getattr(ctx, "lora", None)
    shared = SharedBase(
        teacher,
        ["student", "fake"] if needs_fake else ["student"],
        rank=getattr(lora, "rank", 16),
        alpha=getattr(lora, "alpha", 16.0),
        targets=getattr(lora, "target_modules", None),
        dropout=getattr(lora, "dropout", 0.0),
    )
    if getattr(ctx, "gradient_checkpointing", False):
        shared.enable_checkpointing()
    t_net, student = RoleView(shared, None), RoleView(shared, "student")
    fake = RoleView(shared, "fake") if needs_fake else None
    return t_net, student, fake, teacher.backbone


def _separate_networks(teacher: Denoiser, ctx: Any, needs_fake: bool) -> tuple[nn.Module, nn.Module, Any, Any]:
    """The student and fake score from the context's factories (full copies when absent); each must
    have trainable weights. Returns (teacher, student, fake or None, the fake score's backbone or None)."""
    make_student = getattr(ctx, "make_student", None) or copy_denoiser
    make_copy = getattr(ctx, "make_copy", None) or copy_denoiser
    student = make_student(teacher)
    fake = make_copy(teacher) if needs_fake else None
    for role, net in (("student", student), ("fake", fake)):
        if net is not None and not any(p.requires_grad for p in net.parameters()):
            raise ValueError(f"the {role} network has no trainable weights (check lora.* / the model)")
    fake_backbone = unwrap(fake).backbone if fake is not None else None
    return teacher, student, fake, fake_backbone
