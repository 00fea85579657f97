"""TwinFlow: which parts reach the negative-time branch, one step on tiny models of several
families with one trained network, a short run on a mixture, the any-step sampler, the label
dropout and CFG enhancement row masks, the EMA target network, and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.conditioning import Conditioner
from fewstep.objectives.twinflow import TwinFlow, TwinFlowParams, build, sampling_times, target_decay
from fewstep.paths import FlowPath
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser
from tests.tiny import make_tiny

MEANS = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0]]).view(3, 2, 1, 1)


class _Plain(Conditioner):
    def call(self, backbone, x, timestep, cond):
        raise NotImplementedError

    def null(self, cond, batch):
        return cond


class _TwoBranch(nn.Module):
    """u(x, t, r) with separate weights for the positive- and negative-time branches, called like
    a TwoTimeDenoiser on a flow path (returns x0, eps); like it, u(x, t, r) = u(x, t, t) at start."""

    def __init__(self, d: int = 2, width: int = 64):
        super().__init__()
        self.path = FlowPath(1000)
        self.conditioner = _Plain()

        def mlp():
            return nn.Sequential(
                nn.Linear(d + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
            )

        self.pos, self.neg = mlp(), mlp()
        with torch.no_grad():  # the target time enters as the gap t - r through a zero-initialised column
            self.pos[0].weight[:, -1] = 0.0
            self.neg[0].weight[:, -1] = 0.0

    def forward(self, x, t, cond=None, guidance=1.0, output="x0", target=None, sign=1.0):
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(b)
        r = torch.as_tensor(0.0 if target is None else target, dtype=torch.float32).reshape(-1).expand(b)
        sign = torch.as_tensor(sign, dtype=torch.float32).reshape(-1).expand(b)
        inp = torch.cat([x.flatten(1), t[:, None], (t - r)[:, None]], 1)
        v = torch.where((sign > 0)[:, None], self.pos(inp), self.neg(inp)).view_as(x)
        tb = t.view(-1, 1, 1, 1)
        x0, eps = x - tb * v, x + (1 - tb) * v
        return (x0, eps) if output == "x0_eps" else x0


def _grads(module):
    return [p.grad.abs().sum().item() if p.grad is not None else 0.0 for p in module.parameters()]


def test_negative_time_branch_is_trained_only_by_the_adversarial_part():
    torch.manual_seed(0)
    net = _TwoBranch()
    obj = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0))
    teacher = gmm_denoiser(FlowPath(1000), MEANS, std=0.3)
    batch = {"cond": None, "x0": teacher.backbone.sample_data(16)}
    torch.manual_seed(1)
    parts, _ = obj.losses(batch, 0)
    assert set(parts) == {"e2e", "mul", "any", "adv", "dm"}
    for name, loss in parts.items():
        net.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        pos, neg = sum(_grads(net.pos)), sum(_grads(net.neg))
        if name == "adv":
            assert neg > 0 and pos == 0, f"adv part: positive branch grad {pos}, negative {neg}"
        else:
            assert pos > 0 and neg == 0, f"{name} part reached the negative-time branch ({neg})"


def test_distribution_matching_direction_points_from_fake_to_real():
    # F_grad = clamp(u_fake - u_real): with u_fake = u_real + c the direction is c (clamped)
    net = _TwoBranch()
    with torch.no_grad():
        net.neg.load_state_dict(net.pos.state_dict())
        net.neg[-1].bias.add_(torch.tensor([0.3, -5.0]))
    obj = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0))
    g = obj.dm_direction(torch.randn(8, 2, 1, 1), None, torch.rand(8), torch.randn(8, 2, 1, 1))
    torch.testing.assert_close(g[:, :, 0, 0], torch.tensor([0.3, -1.0]).expand(8, 2), rtol=1e-5, atol=1e-5)


def _sliced_w2(a, b, n_proj=64, seed=3) -> float:
    g = torch.Generator().manual_seed(seed)
    a, b = a.flatten(1), b.flatten(1)
    th = torch.randn(a.shape[1], n_proj, generator=g)
    th = th / th.norm(dim=0)
    n = min(a.shape[0], b.shape[0])
    pa, pb = (a[:n] @ th).sort(0).values, (b[:n] @ th).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def test_twinflow_learns_a_mixture_in_one_and_two_steps():
    # the network is first trained by flow matching alone (what a teacher is: its one-step output
    # collapses to the data mean), then TwinFlow turns it into a one- and two-step generator
    torch.manual_seed(0)
    teacher = gmm_denoiser(FlowPath(1000), MEANS, std=0.3)
    net = _TwoBranch(width=96)
    obj = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0))
    exact = teacher.backbone.sample_data(2000, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(5)

    def w2(n):
        with torch.no_grad():
            x = sample(net, z, None, sampling_times(n), renoise="fresh", generator=torch.Generator().manual_seed(4))
        return _sliced_w2(x, exact)

    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(500):
        x0 = teacher.backbone.sample_data(128, generator=gen)
        zz, t = torch.randn_like(x0), torch.rand(128)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * zz
        sign = torch.where(torch.rand(128) < 0.5, -1.0, 1.0)
        ((obj.u(x_t, t, t, None, sign) - (zz - x0)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    before = w2(1)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    obj.nets["target"].load_state_dict(net.state_dict())  # TwinFlow starts here: its EMA copy is this net
    for step in range(300):
        batch = {"cond": None, "x0": teacher.backbone.sample_data(128, generator=gen)}
        loss, _ = obj.loss("generator", batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_step("generator", step)
    after1, after2 = w2(1), w2(2)
    print(f"sliced W2 to the mixture: 1 step {before:.3f} -> {after1:.3f}; 2 steps {after2:.3f}")
    assert after1 < 0.5 * before and after2 < 0.5 * before


def _ctx(**kw):
    base = {"latent_shape": (4, 8, 8), "has_real_data": True, "gradient_checkpointing": False, "lora": None}
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "family,prediction",
    [("sd3", "flow"), ("flux", "flow"), ("dit", "epsilon"), ("unet", "v_prediction"), ("pixart", "epsilon")],
)
def test_one_step_on_tiny_families_with_one_network(family, prediction):
    kw = {"guidance_embeds": False} if family == "flux" else {}
    tiny = make_tiny(family, prediction="epsilon" if prediction == "flow" else prediction, seed=2, **kw)
    teacher = tiny.denoiser
    n_teacher = sum(p.numel() for p in teacher.parameters())
    x, c = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        ref = teacher(x, 0.6, c)
    obj = build({"guidance": 2.0, "uncond_prob": 0.25}, teacher, _ctx(latent_shape=tiny.latent_shape))
    student = obj.nets["student"]
    # one trained network; the default target_ema 0.99 adds its frozen EMA copy, in no group
    assert list(obj.nets) == ["student", "target"] and obj.groups == {"generator": ["student"]}
    assert not any(q.requires_grad for q in obj.nets["target"].parameters())
    # one network: the student runs the teacher's own weights, plus the zero-initialised target-time term
    assert student.backbone is teacher.backbone
    extra = [p for n, p in student.named_parameters() if n.endswith("extra.weight")]
    assert sum(p.numel() for p in student.parameters()) == n_teacher + sum(p.numel() for p in extra)
    with torch.no_grad():  # it starts as the teacher (r = t: flow matching; r = 0 differs only once trained)
        torch.testing.assert_close(student(x, 0.6, c, target=0.6), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student(x, 0.6, c), ref, rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    batch = {"cond": tiny.cond(8), "x0": torch.randn(8, *tiny.latent_shape), "shape": (8, *tiny.latent_shape)}
    loss, logs = obj.loss("generator", batch, 0)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra), "the target time gets no gradient"
    assert all(q.grad is None for q in obj.nets["target"].parameters())
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(student(x, 0.6, c), ref)
    # the saved network folds the r = 0 setting into the stock time embedding
    solo = student.standalone()
    assert type(solo.backbone) is type(teacher.backbone)
    with torch.no_grad():
        torch.testing.assert_close(solo(x, 0.6, c), student(x, 0.6, c), rtol=1e-4, atol=1e-5)


def test_any_number_of_steps_and_the_fresh_noise_sampler():
    assert sampling_times(1) == [1.0, 0.0]
    assert sampling_times(2, 0.4) == pytest.approx([1.0, 0.4, 0.0])
    assert sampling_times(4, 0.5) == pytest.approx([1.0, 5 / 6, 4 / 6, 0.5, 0.0])
    tiny = make_tiny("sd3", seed=0)
    obj = build({"num_steps": 2}, tiny.denoiser, _ctx())
    assert obj.sampling["times"] == pytest.approx([1.0, 0.5, 0.0]) and obj.sampling["renoise"] == "fresh"
    assert set(obj.sampling["times_by_steps"]) == {"1", "2", "4"}
    # each sampler step is the r = 0 prediction, then fresh noise at the next time
    student = obj.nets["student"]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    noise, cond = torch.randn(2, 4, 8, 8), tiny.cond(2)
    out = sample(student, noise, cond, [1.0, 0.5, 0.0], renoise="fresh", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = noise - obj.u(noise, torch.ones(2), torch.zeros(2), cond)
        zz = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
        x = 0.5 * x0 + 0.5 * zz
        ref = x - 0.5 * obj.u(x, torch.full((2,), 0.5), torch.zeros(2), cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_vp_teacher_through_the_same_snr_conversion():
    tiny = make_tiny("dit", seed=3)
    obj = build({"guidance": 1.5}, tiny.denoiser, _ctx())
    # flow time s <-> the VP teacher at equal SNR: u(x, s, s) is the teacher's eps - x0 there
    x, s = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    c = tiny.cond(2)
    t_p, scale = obj.view.to_path(s)
    with torch.no_grad():
        x0, eps = tiny.denoiser(x * scale.view(-1, 1, 1, 1), t_p, c, output="x0_eps")
        torch.testing.assert_close(obj.u(x, s, s, c), eps - x0, rtol=1e-5, atol=1e-5)
    loss, _ = obj.loss("generator", {"cond": tiny.cond(4), "x0": torch.randn(4, 4, 8, 8)}, 0)
    assert torch.isfinite(loss)
    assert obj.sampling["times"][0] == 1.0


def test_bad_input_names_the_key():
    # a teacher whose backbone has no time embedding cannot take a target time
    gmm = gmm_denoiser(FlowPath(1000), MEANS)
    with pytest.raises(ValueError, match=r"teacher\.source"):
        build({}, gmm, _ctx())
    tiny = make_tiny("sd3", seed=0)
    with pytest.raises(ValueError, match=r"data\.real_data"):
        build({}, tiny.denoiser, _ctx(has_real_data=False))
    obj = build({}, make_tiny("sd3", seed=0).denoiser, _ctx())
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        obj.loss("generator", {"cond": tiny.cond(3), "x0": torch.randn(3, 4, 8, 8)}, 0)
    from fewstep.objectives.registry import make_params

    for kw, key in (
        ({"guidance": 0.5}, "guidance"),
        ({"estimate_order": 0}, "estimate_order"),
        ({"sampling_end": 1.0}, "sampling_end"),
        ({"num_steps": 0}, "num_steps"),
        ({"target_ema": 1.0}, "target_ema"),
        ({"target_ema": -0.1}, "target_ema"),
    ):
        with pytest.raises(ValueError, match=rf"objective\.{key}"):
            make_params("twinflow", kw)
    flux = make_tiny("flux", seed=0)  # guidance-distilled: no unconditional branch for the CFG target
    with pytest.raises(ValueError, match=r"objective\.guidance"):
        build({"guidance": 2.0}, flux.denoiser, _ctx())


# ---- label dropout and the CFG enhancement: which rows ---------------------------------------------
class _Wrapped(nn.Module):
    """What a wrapper (DDP, accelerate) looks like to an objective: the network under `.module`."""

    def __init__(self, module: nn.Module, calls: list | None = None):
        super().__init__()
        self.module = module
        self.calls = calls

    def forward(self, *args, **kwargs):
        if self.calls is not None:  # (condition, whether it runs with grad)
            self.calls.append((args[2], torch.is_grad_enabled()))
        return self.module(*args, **kwargs)


def test_label_dropout_never_reaches_the_end_to_end_rows():
    # the e2e rows (part 0) carry the DM term: their labels are never dropped, the mul and any
    # rows' are (here most of them), the adv rows' never
    tiny = make_tiny("dit", seed=1)
    null = tiny.denoiser.conditioner.null_class
    obj = build({"guidance": 1.0, "uncond_prob": 0.9}, tiny.denoiser, _ctx())
    calls: list = []
    obj.nets["student"] = _Wrapped(obj.nets["student"], calls)
    n = 64
    cond = {"class_labels": torch.arange(n) % null}
    obj.loss("generator", {"cond": cond, "x0": torch.randn(n, 4, 8, 8), "shape": (n, 4, 8, 8)}, 0)
    grad_calls = [c for c, g in calls if g]
    assert len(grad_calls) == 1  # the one gradient forward, over the whole batch
    labels = grad_calls[0]["class_labels"]
    part = torch.arange(n) % 4  # e2e, mul, any, adv
    dropped = labels == null
    assert not dropped[part == 0].any(), "label dropout reached the e2e rows"
    assert dropped[part == 1].any() and dropped[part == 2].any()
    assert not dropped[part == 3].any()
    torch.testing.assert_close(labels[~dropped], cond["class_labels"][~dropped])
    # the DM pair (the last pass) reads the e2e rows under their own labels
    dm = calls[-1][0]["class_labels"]
    assert dm.shape[0] == 2 * int((part == 0).sum()) and not (dm == null).any()


def test_cfg_enhancement_only_strictly_below_enhance_t_max():
    # the authors' open range: t = enhance_t_max (here the e2e rows at t = 1) gets no enhancement
    for t_max in (1.0, 0.6):
        tiny = make_tiny("dit", seed=1)
        obj = build({"guidance": 2.0, "uncond_prob": 0.0, "enhance_t_max": t_max}, tiny.denoiser, _ctx())
        seen = {}
        enhance = obj._enhance

        def spy(x_t, t, cond, idx, enhance=enhance, seen=seen):
            seen["t"], seen["idx"] = t.clone(), idx.clone()
            return enhance(x_t, t, cond, idx)

        obj._enhance = spy
        n = 32
        batch = {"cond": tiny.cond(n), "x0": torch.randn(n, 4, 8, 8), "shape": (n, 4, 8, 8)}
        obj.loss("generator", batch, 0)
        t, idx = seen["t"], seen["idx"]
        part = torch.arange(n) % 4
        assert (t[part == 0] == 1.0).all()
        assert not idx[part == 0].any(), f"enhance_t_max={t_max}: the e2e rows at t = 1 were enhanced"
        assert not idx[part == 3].any()
        inner = (part == 1) | (part == 2)
        torch.testing.assert_close(idx[inner], (t[inner] > 0) & (t[inner] < t_max))
        assert idx.any()
    # the boundary itself: a row at exactly t = enhance_t_max is left out, at any enhance_t_max
    t = torch.tensor([0.5, 0.25, 0.75, 1.0, 0.0, 0.3])
    excluded = torch.tensor([False, False, False, False, False, True])
    for t_max, want in (
        (0.5, [False, True, False, False, False, False]),
        (1.0, [True, True, True, False, False, False]),
    ):
        obj = build({"guidance": 2.0, "enhance_t_max": t_max}, make_tiny("dit", seed=1).denoiser, _ctx())
        assert obj.enhanced_rows(t, excluded).tolist() == want


# ---- the EMA target network -----------------------------------------------------------------------
def test_target_decay_follows_the_authors_warm_up():
    # their cmd: 0 at the first update (a copy), then cmd += (1 - cmd)(rate - cmd) / 2 per update
    c, want = 0.0, []
    for _ in range(600):
        c = c + (1 - c) * (0.99 - c) * 0.5
        want.append(c)
    got = [target_decay(k, 0.99) for k in range(1, 601)]
    assert got[:2] == pytest.approx([0.495, 0.6199875])
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert target_decay(0, 0.99) == 0.0 and target_decay(10**6, 0.99) == pytest.approx(0.99, abs=1e-12)
    obj = TwinFlow(_TwoBranch(), TwinFlowParams(guidance=1.0, uncond_prob=0.0, target_ema=0.99))
    # continued from the last update asked for, and from scratch when asked for an earlier one
    assert [obj.target_decay(k) for k in (1, 2, 600, 3)] == pytest.approx([want[0], want[1], want[599], want[2]])


def _perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in module.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=g).to(q))


def test_targets_come_from_the_ema_copy_or_with_target_ema_0_from_the_live_network():
    # three identical tiny teachers: the live-target objective and the EMA one take the same
    # update of their live weights, the reference keeps the start weights
    objs = {
        k: build({"guidance": 2.0, "uncond_prob": 0.0, "target_ema": ema}, make_tiny("sd3", seed=0).denoiser, _ctx())
        for k, ema in (("live", 0.0), ("ema", 0.99), ("ref", 0.0))
    }
    assert list(objs["live"].nets) == ["student"] and objs["live"].target_role == "student"
    assert list(objs["ema"].nets) == ["student", "target"] and objs["ema"].target_role == "target"
    _perturb(objs["live"].nets["student"], 4)
    _perturb(objs["ema"].nets["student"], 4)
    tiny = make_tiny("sd3", seed=0)
    g = torch.Generator().manual_seed(0)
    x_t, F, v = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t, r = torch.tensor([1.0, 0.8, 0.5, 0.3]), torch.tensor([0.0, 0.4, 0.45, 0.0])
    c = tiny.cond(4, g)
    idx = torch.ones(4, dtype=torch.bool)

    def targets(obj):
        return obj._enhance(x_t, t, c, idx), obj.rcgm_target(F, v, x_t, t, r, c)

    live, ema, ref = (targets(objs[k]) for k in ("live", "ema", "ref"))
    for a, b in zip(ema, ref):  # the EMA target still holds the start weights (no update yet)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(live, ref):  # target_ema 0 reads the live, changed, weights
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    obj = objs["ema"]
    obj.nets["target"].load_state_dict(obj.nets["student"].state_dict())
    for a, b in zip(targets(obj), live):  # the same function of the weights either way
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the gradient forward, the adv samples and the DM pair stay on the live network
    x, c2 = torch.randn(2, 4, 8, 8, generator=g), tiny.cond(2, g)
    torch.testing.assert_close(obj.one_step(x, c2), objs["live"].one_step(x, c2), rtol=1e-5, atol=1e-6)


def test_ema_target_follows_the_recursion_and_never_gets_gradients():
    torch.manual_seed(0)
    net = _TwoBranch(width=16)
    obj = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0, target_ema=0.9))
    target = obj.nets["target"]
    assert target is not net and obj.groups == {"generator": ["student"]}
    assert not any(q.requires_grad for q in target.parameters())
    obj.nets["student"] = _Wrapped(net)  # as the entry point may wrap it: after_step goes through unwrap
    start = {k: q.detach().clone() for k, q in net.named_parameters()}
    for k, q in target.named_parameters():
        torch.testing.assert_close(q, start[k], rtol=0, atol=0)  # update 0: the copy
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    teacher = gmm_denoiser(FlowPath(1000), MEANS, std=0.3)
    expect, c = start, 0.0
    for step in range(4):
        loss, _ = obj.loss("generator", {"cond": None, "x0": teacher.backbone.sample_data(16)}, step)
        loss.backward()
        assert all(q.grad is None for q in target.parameters()), "the target network got a gradient"
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_step("generator", step)
        c = c + (1 - c) * (0.9 - c) / 2  # c_{step + 1}
        expect = {k: c * expect[k] + (1 - c) * q.detach() for k, q in net.named_parameters()}
    tgt = dict(target.named_parameters())
    for k, q in net.named_parameters():
        torch.testing.assert_close(tgt[k], expect[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(tgt[k], q), f"{k}: the target equals the live weights"
    assert not any(q.requires_grad or q.grad is not None for q in target.parameters())
    # target_ema 0: no copy, and after_step changes nothing
    live = TwinFlow(_TwoBranch(width=16), TwinFlowParams(guidance=1.0, uncond_prob=0.0, target_ema=0.0))
    assert list(live.nets) == ["student"]
    live.after_step("generator", 0)


def test_ema_target_is_checkpointed_and_shares_only_frozen_tensors():
    from fewstep.training.checkpoint import saved_keys

    tiny = make_tiny("sd3", seed=0)
    teacher = tiny.denoiser
    teacher_tensors = {id(q) for q in [*teacher.parameters(), *teacher.buffers()]}
    obj = build({}, teacher, _ctx())
    holder = nn.ModuleDict(obj.nets)
    keys = saved_keys(holder, teacher_tensors)
    target = obj.nets["target"]
    # every parameter of the copy is saved (the student's in-place weights are trained: none is shared)
    assert {k for k in keys if k.startswith("target.")} == {f"target.{k}" for k, _ in target.named_parameters()}
    student_ids = {id(q) for q in obj.nets["student"].parameters()}
    assert not any(id(q) in student_ids for q in target.parameters())
    # a student with frozen tensors (LoRA base weights): the copy reuses those, copies the rest
    net = _TwoBranch(width=8)
    net.pos[0].requires_grad_(False)
    obj = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0), share_frozen=True)
    tgt = obj.nets["target"]
    assert tgt.pos[0].weight is net.pos[0].weight and tgt.pos[2].weight is not net.pos[2].weight
    obj.after_step("generator", 0)  # the frozen, shared tensors are not updated (nor need to be)
    unshared = TwinFlow(net, TwinFlowParams(guidance=1.0, uncond_prob=0.0), share_frozen=False).nets["target"]
    assert unshared.pos[0].weight is not net.pos[0].weight
