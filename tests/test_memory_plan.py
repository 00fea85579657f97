"""The `--dry-run` memory plan in shared-base mode: the adapters live in the teacher's backbone,
and their gradients and AdamW moments are still counted for the roles that train them."""

from __future__ import annotations

from fewstep.config import config_from_dict
from fewstep.training.bundle import TeacherBundle
from fewstep.training.dry_run import memory_plan
from fewstep.training.shared_base import SharedBase
from tests.tiny import make_tiny


def test_shared_base_plan_counts_adapter_gradients_and_adamw_states():
    base = sum(p.numel() for p in make_tiny("dit", seed=0).denoiser.backbone.parameters())
    probe = SharedBase(make_tiny("dit", seed=0).denoiser, ["student", "fake"], rank=2, alpha=2.0)
    adapter = sum(p.numel() for p in probe.adapter_params["student"].values())
    assert adapter > 0
    tiny = make_tiny("dit", seed=0)
    bundle = TeacherBundle(tiny.denoiser, tuple(tiny.latent_shape), family="dit", num_classes=10)
    cfg = config_from_dict(
        {"objective": {"name": "dmd2", "shared_base": True}, "lora": {"rank": 2, "alpha": 2.0}, "ema": {"rate": 0}}
    )
    rows, act, report = memory_plan(cfg, 1, "none", "no", teacher=bundle)
    by_role = {r.role: r for r in rows}
    # weights: the base once plus both adapters (4 B each); each adapter: grad + 2 moments (12 B)
    assert by_role["student"].trainable == by_role["fake"].trainable == adapter
    assert by_role["student"].grad_bytes == 4 * adapter and by_role["student"].optim_bytes == 8 * adapter
    assert sum(r.total for r in rows) == 4 * (base + 2 * adapter) + 2 * 12 * adapter
    assert "(1392" not in report and "%)" in report  # the trainable share is of the role's weights


def test_activation_term_counts_saved_tensors_and_shrinks_with_checkpointing():
    import copy

    import torch

    from fewstep.training.activations import activation_bytes

    tiny = make_tiny("dit", seed=0)
    with torch.device("meta"):
        den = copy.deepcopy(tiny.denoiser).to("meta")
    cond = {"class_labels": torch.zeros(2, dtype=torch.long)}
    a2 = activation_bytes(den, tiny.latent_shape, 2, cond)
    a4 = activation_bytes(den, tiny.latent_shape, 4, {"class_labels": torch.zeros(4, dtype=torch.long)})
    assert a2 > 0 and 1.6 < a4 / a2 < 2.1  # activations grow with the batch; weights are not counted
    den.backbone.enable_gradient_checkpointing()
    assert activation_bytes(den, tiny.latent_shape, 2, cond) < 0.5 * a2  # blocks keep only their inputs


def test_dry_run_report_shows_the_activation_term():
    tiny = make_tiny("dit", seed=0)
    bundle = TeacherBundle(tiny.denoiser, tuple(tiny.latent_shape), family="dit", num_classes=10)
    cfg = config_from_dict({"objective": {"name": "dsm"}, "data": {"batch_size": 4}, "ema": {"rate": 0}})
    rows, act, report = memory_plan(cfg, 2, "none", "no", teacher=bundle)
    assert act > 0 and "activations:" in report and "at batch 2 per process" in report
