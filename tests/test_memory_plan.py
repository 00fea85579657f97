"""The `--dry-run` memory plan: shared-base accounting (the adapters live in the teacher's
backbone, and their gradients and AdamW moments are still counted for the roles that train them),
the gradient term (one optimizer group's at a time), and the activation and transient terms
counted on the meta device."""

from __future__ import annotations

import torch

from fewstep.config import config_from_dict
from fewstep.training.bundle import TeacherBundle
from fewstep.training.dry_run import plan_memory
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
    plan = plan_memory(cfg, 1, "none", "no", teacher=bundle)
    rows, report = plan.rows, plan.report
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
    plan = plan_memory(cfg, 2, "none", "no", teacher=bundle)
    act, report = plan.activation_bytes, plan.report
    assert act > 0 and "activations:" in report and "at batch 2 per process" in report
    assert "transient:" in report and "estimated peak per process:" in report


def test_live_bytes_peak_of_a_sequential_model_is_the_hand_computed_one():
    from fewstep.training.activations import LiveBytes

    for dev in ("meta", "cpu"):
        seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dev)
        with torch.no_grad(), LiveBytes() as live:
            x = torch.zeros(3, 8, device=dev)  # 96 B
            y = seq(x)
        # x (96) + first Linear's output (3 x 16 x 4 = 192) + ReLU's output (192) alive at once; the
        # weights (made before the mode) and their transposed views count nothing
        assert live.peak == 96 + 192 + 192, dev
        assert live.current == 96 + 48  # x and y; the hidden states are freed
        del x
        assert live.current == 48
        del y
        assert live.current == 0


def test_live_bytes_counts_views_and_in_place_results_once():
    from fewstep.training.activations import LiveBytes

    with LiveBytes() as live:
        a = torch.ones(4, 4, device="meta")  # 64 B
        v = a.view(16).t()  # a view: nothing new
        a.add_(1.0)  # in place: nothing new
        b = a * 2  # 64 B
    assert live.peak == 128 and live.current == 128
    del a
    assert live.current == 128  # the view keeps a's storage
    del v
    assert live.current == 64
    del b
    assert live.current == 0


def test_meta_estimates_equal_what_a_cpu_pass_saves_and_allocates():
    """On the meta device attention is counted as the fused kernel a CPU (or GPU) runs, not as the
    math path that builds the score matrix: the counts equal those of real CPU passes."""
    import copy

    from fewstep.training.activations import activation_bytes, transient_bytes

    for family in ("dit", "sd15"):
        tiny = make_tiny(family, seed=0)
        cond = tiny.cond(2)
        with torch.device("meta"):
            meta = copy.deepcopy(tiny.denoiser).to("meta")
        for gc in (False, True):
            if gc:
                tiny.denoiser.backbone.enable_gradient_checkpointing()
                meta.backbone.enable_gradient_checkpointing()
            a_cpu = activation_bytes(tiny.denoiser, tiny.latent_shape, 2, cond)
            a_meta = activation_bytes(meta, tiny.latent_shape, 2, cond)
            t_cpu = transient_bytes(tiny.denoiser, tiny.latent_shape, 2, cond)
            t_meta = transient_bytes(meta, tiny.latent_shape, 2, cond)
            assert a_meta == a_cpu > 0 and t_meta == t_cpu > 0, (family, gc, a_meta, a_cpu, t_meta, t_cpu)


def test_gradient_term_is_the_largest_groups_and_the_transient_runs_at_the_cfg_batch():
    """The loop sets every gradient to None after each group's update: the plan counts the largest
    group's gradients, not the sum over roles; the no-gradient pass is the teacher's CFG pass."""
    from fewstep.training.activations import transient_bytes
    from fewstep.training.dry_run import plan_memory

    tiny = make_tiny("dit", seed=0)
    bundle = TeacherBundle(tiny.denoiser, tuple(tiny.latent_shape), family="dit", num_classes=10)
    cfg = config_from_dict(
        {
            "objective": {"name": "dmd2", "gan": True, "guidance": 2.0},
            "data": {"batch_size": 2, "real_data": True},
            "ema": {"rate": 0},
        }
    )
    plan = plan_memory(cfg, 1, "none", "no", teacher=bundle)
    by_role = {r.role: r for r in plan.rows}
    n_net = sum(p.numel() for p in tiny.denoiser.backbone.parameters())
    n_disc = by_role["disc"].trainable
    assert n_disc > n_net > 0
    assert plan.group_grad_bytes == {"generator": 4 * n_net, "fake_score": 4 * (n_net + n_disc)}
    assert plan.grad_bytes == 4 * (n_net + n_disc) < sum(r.grad_bytes for r in plan.rows)
    held = sum(r.weight_bytes + r.optim_bytes + r.ema_bytes for r in plan.rows)
    assert plan.static_bytes == held + 4 * (n_net + n_disc)
    assert plan.transient_batch == 4  # cond and uncond of the per-process batch of 2
    cond4 = {"class_labels": torch.zeros(4, dtype=torch.long)}
    assert plan.transient_bytes == transient_bytes(tiny.denoiser, tiny.latent_shape, 4, cond4)
    assert plan.peak_bytes == held + plan.activation_bytes + max(plan.grad_bytes, plan.transient_bytes)
    assert "less 42.06 KiB of gradients" in plan.report and "largest: fake_score" in plan.report

    unguided = config_from_dict(
        {"objective": {"name": "dmd2", "guidance": 1.0}, "data": {"batch_size": 2}, "ema": {"rate": 0}}
    )
    assert plan_memory(unguided, 1, "none", "no", teacher=bundle).transient_batch == 2
