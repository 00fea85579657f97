"""rCM: the DMD term and the critic are off until the tangent warm-up ends and on after it, the
critic : student schedule, rCM's sampling angles and optimizer defaults, start-up errors, and
learning on the exact Gaussian-mixture teacher."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.denoiser import copy_denoiser
from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.rcm import RCMObjective, RCMParams, rcm_angles
from fewstep.objectives.registry import BuildContext, build_objective
from fewstep.paths import FlowPath, VPPath
from fewstep.testing import gmm_denoiser
from tests.tiny import make_tiny


def _count_calls(module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def _batch(tiny, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "cond": tiny.cond(b, g),
        "x0": torch.randn(b, *tiny.latent_shape, generator=g),
        "shape": (b, *tiny.latent_shape),
    }


def test_dmd_term_is_off_before_the_warmup_ends_and_on_after():
    tiny = make_tiny("dit")
    ctx = BuildContext(latent_shape=tiny.latent_shape, num_classes=10, has_real_data=True)
    obj = build_objective("rcm", {"tangent_warmup": 3, "guidance": 2.0, "num_steps": 2}, tiny.denoiser, ctx)
    assert obj.dmd_start == 3 and obj.groups == {"generator": ["student", "logvar"], "fake_score": ["fake"]}
    # warm-up: student only; then 4 critic updates per student update, the student closing each cycle
    assert [obj.phases(s) for s in range(3)] == [["generator"]] * 3
    assert [obj.phases(s)[0] for s in range(3, 13)] == ["fake_score"] * 4 + ["generator"] + ["fake_score"] * 4 + [
        "generator"
    ]
    fake_calls = _count_calls(obj.nets["fake"].backbone)
    batch = _batch(tiny)

    # before: the generator loss is exactly sCM's, the fake score is never run, and has no update
    torch.manual_seed(1)
    loss, logs = obj.loss("generator", batch, 2)
    torch.manual_seed(1)
    scm_only, _ = obj.cm.loss("generator", batch, 2)
    assert logs["dmd"] == 0.0 and "dm_grad_norm" not in logs and not fake_calls
    assert torch.equal(loss, scm_only)
    with pytest.raises(ValueError, match="dmd_start"):
        obj.loss("fake_score", batch, 2)

    # after: the DM term adds a non-zero gradient on the student (guided real score vs fake score)
    torch.manual_seed(1)
    loss, logs = obj.loss("generator", batch, 7)
    assert logs["dmd"] == 1.0 and logs["dm_grad_norm"] > 0 and fake_calls
    torch.manual_seed(1)
    scm_only, _ = obj.cm.loss("generator", batch, 7)
    student = obj.nets["student"]
    g_all = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    g_scm = torch.autograd.grad(scm_only, [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(g_all, g_scm) if a is not None and b is not None)
    assert diff > 0
    # the critic trains the fake score only
    fl, flogs = obj.loss("fake_score", batch, 3)
    fl.backward()
    assert flogs["loss_fake"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.nets["fake"].parameters())
    assert all(p.grad is None for p in student.parameters())


def test_sampling_times_are_rcm_angles_and_optimizer_defaults_published():
    assert rcm_angles(4) == pytest.approx([math.atan(80), 1.5, 1.4, 1.0, 0.0])
    assert rcm_angles(1) == pytest.approx([1.5582969777755349, 0.0])
    tiny = make_tiny("sd3")  # a flow teacher: angles map to flow times at equal SNR (sd = 1)
    obj = RCMObjective(
        RCMParams(num_steps=2), tiny.denoiser, copy_denoiser(tiny.denoiser), copy_denoiser(tiny.denoiser)
    )
    assert obj.sampling["renoise"] == "fresh" and obj.sampling["angles"] == pytest.approx([math.atan(80), 1.5, 0.0])
    t = obj.sampling["times"]
    assert t[0] == pytest.approx(80 / 81) and t[1] == pytest.approx(math.tan(1.5) / (1 + math.tan(1.5))) and t[2] == 0
    assert len(obj.sampling["times_by_steps"]["4"]) == 5
    assert obj.dm.times == obj.sampling["times_by_steps"]["4"][:-1]  # backward simulation on the sampler's grid
    assert obj.optim["generator"] == {"lr": 2e-6, "betas": (0.0, 0.999), "weight_decay": 0.01}
    assert obj.optim["fake_score"]["lr"] == 4e-7 and obj.p.critic_updates_per_student == 4 and obj.p.sigma_data == 1.0


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(mid_angles=[1.5, 1.6, 1.0]), "objective.mid_angles"),
        (dict(num_steps=4, max_simulation_steps=4, mid_angles=[1.5]), "objective.mid_angles"),
        (dict(critic_updates_per_student=0), "objective.critic_updates_per_student"),
        (dict(scm_weight=0.0, dmd_weight=0.0), "objective.scm_weight"),
        (dict(sampling_angles=[1.5]), "objective.sampling_angles"),
        (dict(num_steps=5), "objective.num_steps"),
    ],
)
def test_bad_params_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RCMParams(**kw).validate()


def test_needs_real_data():
    tiny = make_tiny("dit")
    with pytest.raises(ValueError, match="data.real_data"):
        build_objective("rcm", {}, tiny.denoiser, BuildContext(latent_shape=tiny.latent_shape, has_real_data=False))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_rcm_learns_the_mixture_means(kind):
    """Exact teacher: a two-component Gaussian mixture; student and fake score are mixtures with
    learnable means, 0.6 away. rCM (sCM warm-up, then sCM + DMD with the 4:1 critic) brings the
    student's means to the teacher's."""
    torch.manual_seed(0)
    path = (
        FlowPath(1000)
        if kind == "flow"
        else VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    )
    means = torch.stack([torch.full((2, 2, 2), 1.0), torch.full((2, 2, 2), -1.0)])
    teacher = gmm_denoiser(path, means, std=0.2)
    student = gmm_denoiser(path, means + 0.6, std=0.2, learnable=True)
    fake = gmm_denoiser(path, means + 0.6, std=0.2, learnable=True)
    kw = dict(tangent_warmup=20, adaptive_weighting=False, num_steps=1, guidance=1.0)
    obj = RCMObjective(RCMParams(**kw), teacher, student, fake, latent_shape=(2, 2, 2))
    opts = {
        "generator": torch.optim.Adam(trainable_parameters(obj, "generator"), lr=2e-2, betas=(0.0, 0.99)),
        "fake_score": torch.optim.Adam(trainable_parameters(obj, "fake_score"), lr=5e-2, betas=(0.0, 0.99)),
    }
    err0 = (student.backbone.means - means).abs().mean().item()
    for step in range(150):
        x0 = teacher.backbone.sample_data(64, generator=torch.Generator().manual_seed(step))
        batch = {"cond": None, "x0": x0, "shape": tuple(x0.shape)}
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, batch, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    err = (student.backbone.means - means).abs().mean().item()
    print(f"{kind}: mean |student means - teacher means| {err0:.3f} -> {err:.3f}")
    assert err < 0.3 * err0, f"student means error {err0:.3f} -> {err:.3f}"


def test_dmd_term_moves_the_students_samples_against_the_dm_gradient():
    """One SGD step on the DM term alone (scm_weight 0) moves the student's backward-simulated
    sample x_hat along -g, g = (x0_fake - x0_real) / mean|x_hat - x0_real| (DMD eq. 8): towards the
    guided teacher's denoising, away from the fake score's. A sign error in the term fails here."""
    tiny = make_tiny("dit")
    student = copy_denoiser(tiny.denoiser)
    obj = RCMObjective(
        RCMParams(
            num_steps=1,
            max_simulation_steps=1,
            scm_weight=0.0,
            dmd_weight=1.0,
            dmd_start=0,
            guidance=3.0,
            adaptive_weighting=False,
        ),
        tiny.denoiser,
        student,
        copy_denoiser(tiny.denoiser),
        latent_shape=tiny.latent_shape,
    )
    batch = _batch(tiny, b=4)

    def sample_and_grad():
        rng = obj.dm.draws(batch, 0, "generator")  # the generator loss's own draws
        with torch.no_grad():
            x_hat, _ = obj.dm.generate(batch, 0, grad=False, rng=rng)
            return x_hat, obj.dm._dm_grad(x_hat, batch["cond"], 3.0, rng)

    x_before, g = sample_and_grad()
    assert g.abs().sum() > 0
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=1e-3)
    torch.manual_seed(5)
    loss, logs = obj.loss("generator", batch, 0)
    assert logs["dmd"] == 1.0 and logs["dm_grad_norm"] == pytest.approx(
        g.flatten(1).norm(dim=1).mean().item(), rel=1e-4
    )
    loss.backward()
    opt.step()
    x_after, _ = sample_and_grad()
    move = (x_after - x_before).flatten()
    assert move.norm() > 0
    cos = float(torch.dot(move, g.flatten()) / (move.norm() * g.norm()))
    assert cos < -0.1, cos
