"""TwinFlow: which parts reach the negative-time branch, one step on tiny models of several
families with one network held, a short run on a mixture, the any-step sampler, and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.conditioning import Conditioner
from fewstep.objectives.twinflow import TwinFlow, TwinFlowParams, build, sampling_times
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
    for step in range(300):
        batch = {"cond": None, "x0": teacher.backbone.sample_data(128, generator=gen)}
        loss, _ = obj.loss("generator", batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
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
    assert list(obj.nets) == ["student"] and obj.groups == {"generator": ["student"]}
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
    ):
        with pytest.raises(ValueError, match=rf"objective\.{key}"):
            make_params("twinflow", kw)
    flux = make_tiny("flux", seed=0)  # guidance-distilled: no unconditional branch for the CFG target
    with pytest.raises(ValueError, match=r"objective\.guidance"):
        build({"guidance": 2.0}, flux.denoiser, _ctx())
