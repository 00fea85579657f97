"""Activation checkpointing (`precision.gradient_checkpointing`): the same DMD2 losses and gradients
with it on, with full copies and in shared-base mode (one backbone, adapters switched per role),
where the rerun of a block in backward must see the adapter of its forward pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.dmd import DMDParams, build, context
from fewstep.training.checkpointing import enable_activation_checkpointing
from tests.tiny import make_tiny

LORA = SimpleNamespace(rank=2, alpha=2.0, target_modules=None, dropout=0.0)


def _losses_and_grads(obj, batch):
    out = {}
    for phase in ("fake_score", "generator"):
        torch.manual_seed(5)  # the same draws for both runs
        loss, _ = obj.loss(phase, batch, 0)
        loss.backward()
        params = trainable_parameters(obj, phase)
        out[phase] = (loss.detach().clone(), [p.grad.clone() if p.grad is not None else None for p in params])
        for net in obj.nets.values():
            for p in net.parameters():
                p.grad = None
    return out


def _assert_same(a, b):
    for phase in a:
        torch.testing.assert_close(a[phase][0], b[phase][0], rtol=1e-5, atol=1e-7)
        assert sum(g is not None for g in a[phase][1]) > 0
        for ga, gb in zip(a[phase][1], b[phase][1]):
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def _setup(family: str, shared: bool):
    tiny = make_tiny(family, seed=0)
    obj = build(
        DMDParams(shared_base=shared, gan=True, guidance=2.0),
        tiny.denoiser,
        context(latent_shape=tiny.latent_shape, has_real_data=True, seed=3, lora=LORA),
    )
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start at zero (every role = the teacher): make the roles differ
        for role in ("student", "fake"):
            for p in obj.nets[role].parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    batch = {
        "cond": tiny.cond(2, g),
        "x0": torch.randn((2, *tiny.latent_shape), generator=g),
        "shape": (2, *tiny.latent_shape),
    }
    return obj, batch


@pytest.mark.parametrize("shared", [False, True], ids=["full_copy", "shared_base"])
@pytest.mark.parametrize("family", ["dit", "sdxl"])
def test_checkpointing_leaves_losses_and_gradients_unchanged(family, shared):
    obj, batch = _setup(family, shared)
    bbs = {id(obj.nets[r].backbone): obj.nets[r].backbone for r in ("student", "fake")}
    block = next(m for m in next(iter(bbs.values())).modules() if type(m).__name__ == "BasicTransformerBlock")
    calls = []
    block.register_forward_pre_hook(lambda *a: calls.append(1))  # (rerun stops early: no post-hook)
    ref = _losses_and_grads(obj, batch)
    plain_calls, calls[:] = len(calls), []
    assert not any(bb.is_gradient_checkpointing for bb in bbs.values())
    assert enable_activation_checkpointing(obj.nets.values(), say=lambda m: None) == []
    assert all(bb.is_gradient_checkpointing for bb in bbs.values())
    got = _losses_and_grads(obj, batch)
    assert len(calls) > plain_calls  # the blocks really reran in backward
    _assert_same(ref, got)


def test_shared_base_stock_checkpointing_would_use_the_wrong_adapter():
    """The control for the test above: diffusers' own checkpoint function reruns blocks under
    whichever adapter is active in backward (none), which either fails torch's check of the
    recomputation or changes the student's gradient."""
    obj, batch = _setup("dit", True)
    ref = _losses_and_grads(obj, batch)
    obj.nets["student"].backbone.enable_gradient_checkpointing()  # stock function, not role-aware
    try:
        got = _losses_and_grads(obj, batch)
    except torch.utils.checkpoint.CheckpointError:
        return
    diff = max((a - b).abs().max().item() for a, b in zip(ref["generator"][1], got["generator"][1]) if a is not None)
    assert diff > 1e-4


def test_shared_base_build_with_checkpointing_uses_the_role_aware_function():
    tiny = make_tiny("dit", seed=0)
    obj = build(
        DMDParams(shared_base=True),
        tiny.denoiser,
        context(latent_shape=tiny.latent_shape, lora=LORA, gradient_checkpointing=True),
    )
    bb = obj.nets["student"].backbone
    assert bb.is_gradient_checkpointing
    assert bb._gradient_checkpointing_func.__module__ == "fewstep.training.checkpointing"
