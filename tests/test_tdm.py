"""TDM: the inference sampler is the training rollout, one step trains only what it should, the
importance weight, the time grid, parameter validation, and learning on an exact teacher."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fewstep.denoiser import copy_denoiser
from fewstep.objectives.tdm import TDM, TDMParams, _importance_weight, build, student_times
from fewstep.paths import FlowPath, VPPath
from fewstep.randomness import SampleDraws
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser
from tests.tiny import make_tiny


def _tdm(tiny, **kw) -> TDM:
    return TDM(copy_denoiser(tiny.denoiser), copy_denoiser(tiny.denoiser), tiny.denoiser, TDMParams(**kw))


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_times_match_the_reference_grid():
    # T_tot = 900 of 1000 DDPM steps: timesteps 899, 674, 449, 224 (fewstep t = (i + 1) / 1000)
    times = student_times(4, 0.9)
    assert times == pytest.approx([0.9, 0.675, 0.45, 0.225, 0.0])
    vp = VPPath.from_config({"num_train_timesteps": 1000})
    idx = vp.timestep(torch.tensor(times[:-1], dtype=torch.float64))
    assert idx.tolist() == pytest.approx([899, 674, 449, 224], abs=1e-9)
    assert student_times(2, 0.9) == pytest.approx([0.9, 0.45, 0.0])
    assert student_times(1, 1.0) == [1.0, 0.0]


@pytest.mark.parametrize("family,num_steps", [("dit", 4), ("dit", 2), ("dit", 1), ("sd3", 4), ("sd3", 2)])
def test_inference_sampler_reproduces_training_rollout(family, num_steps):
    tiny = make_tiny(family, seed=1)
    obj = _tdm(tiny, num_steps=num_steps)
    # the student must differ from the teacher for this to mean anything
    with torch.no_grad():
        for p in obj.nets["student"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    cond = tiny.cond(3, torch.Generator().manual_seed(5))
    batch = {"cond": cond, "shape": (3, *tiny.latent_shape)}

    xs, x0s = obj._rollout(batch, step=0)
    assert xs.shape[0] == num_steps

    # inference: the sampler with the objective's own `sampling` dict, same noise
    noise = SampleDraws(range(3), obj.seed, 0, "tdm/rollout").normal(*batch["shape"][1:])
    student = obj.nets["student"]
    assert obj.sampling["renoise"] == "ddim"
    assert obj.sampling["times_by_steps"][str(num_steps)] == obj.sampling["times"]
    out = sample(student, noise, cond, obj.sampling["times"], renoise=obj.sampling["renoise"])
    assert torch.equal(out, x0s[-1]), "the inference sampler's result differs from the training rollout"
    times = obj.sampling["times"]
    assert torch.equal(xs[0], noise), "the rollout starts from the raw noise at the first student time"
    for j in range(1, num_steps):  # stopping at an intermediate time returns x there
        assert torch.equal(sample(student, noise, cond, times[: j + 1], renoise="ddim"), xs[j])

    # and the rollout is the reference's deterministic loop: re-noise with the student's own eps
    x = noise
    path = tiny.path
    with torch.no_grad():
        for t, t_next in zip(times, times[1:]):
            x0, eps = student(x, t, cond, output="x0_eps")
            a, s = path.alpha_sigma(torch.tensor([t_next]))
            x = a * x0 + s * eps if t_next > 0 else x0
    torch.testing.assert_close(x, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["dit", "unet", "sd15", "sdxl", "pixart", "sd3"])
def test_one_step_trains_only_student_and_fake(family):
    tiny = make_tiny(family, seed=2)
    obj = _tdm(tiny, guidance=3.0)
    teacher0 = _state(obj.nets["teacher"])
    opts = {
        g: torch.optim.AdamW(
            [p for r in roles for p in obj.nets[r].parameters() if p.requires_grad],
            lr=1e-2,
            betas=(0.0, 0.95),
            weight_decay=0.0,
        )
        for g, roles in obj.groups.items()
    }
    assert obj.phases(0) == ["fake_score", "generator"]
    assert not any(p.requires_grad for p in obj.nets["teacher"].parameters())
    batch = {"cond": tiny.cond(2), "shape": (2, *tiny.latent_shape)}
    for phase in obj.phases(0):
        before = {r: _state(n) for r, n in obj.nets.items()}
        loss, logs = obj.loss(phase, batch, 0)
        assert torch.isfinite(loss) and all(isinstance(v, float) for v in logs.values())
        loss.backward()
        opts[phase].step()
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        changed = {r for r, n in obj.nets.items() if not _same(before[r], _state(n))}
        want = {"fake_score": {"fake"}, "generator": {"student"}}[phase]
        assert changed == want, f"{phase} phase changed {sorted(changed)}, expected {sorted(want)}"
    assert _same(teacher0, _state(obj.nets["teacher"])), "the teacher changed"


def test_importance_weight():
    z = torch.randn(4, 3, 5, 5)
    assert torch.equal(_importance_weight(z, z), torch.ones(4))
    w = _importance_weight(2 * z, z)  # mixed noise with more energy than fresh noise is less likely
    torch.testing.assert_close(w, torch.exp(-1.5 * z.flatten(1).pow(2).mean(1)))
    assert bool((w < 1).all())


@pytest.mark.parametrize("path", [VPPath.from_config({"num_train_timesteps": 1000}), FlowPath(1000)])
def test_segment_point_on_the_last_segment_carries_only_fresh_noise(path):
    # segment (0, t_1]: x_mid is x0_hat itself, so x_t = alpha x0_hat + sigma z and w_IS = 1
    means = torch.stack([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])
    d = gmm_denoiser(path, means)
    obj = TDM(copy_denoiser(d), copy_denoiser(d), d, TDMParams())
    b = 6
    x_g, x0_hat = torch.randn(b, 1, 2, 2), torch.randn(b, 1, 2, 2)
    t_g, t_mid, t = torch.full((b,), 0.225), torch.zeros(b), torch.linspace(0.03, 0.2, b)
    x_t, z, m = obj._segment_point(x_g, x0_hat, t_g, t_mid, t, SampleDraws(range(b), 0, 0, "test"))
    torch.testing.assert_close(m, z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_importance_weight(m, z), torch.ones(b), rtol=1e-4, atol=1e-4)
    # on a higher segment the student's own noise is part of x_t, and x_t = alpha x0_hat + sigma m
    t_g, t_mid, t = torch.full((b,), 0.9), torch.full((b,), 0.675), torch.full((b,), 0.8)
    x_t, z, m = obj._segment_point(x_g, x0_hat, t_g, t_mid, t, SampleDraws(range(b), 0, 0, "test"))
    torch.testing.assert_close(x_t, path.add_noise(x0_hat, m, t))
    assert not torch.allclose(m, z, atol=1e-2)


def test_segment_times_stay_inside_their_segment():
    d = gmm_denoiser(VPPath.from_config({}), torch.zeros(1, 1, 2, 2))
    obj = TDM(copy_denoiser(d), copy_denoiser(d), d, TDMParams(num_steps=4))
    i, t_g, t_mid, t = obj._segments(SampleDraws(range(4000), 0, 0, "test"), "cpu")
    times = torch.tensor(obj.times)
    assert torch.equal(t_g, times[i]) and torch.equal(t_mid, times[i + 1])
    assert bool((t >= t_mid.clamp_min(0.02)).all() and (t <= t_g - 0.01 + 1e-7).all())
    assert set(i.tolist()) == {0, 1, 2, 3}
    obj2 = TDM(copy_denoiser(d), copy_denoiser(d), d, TDMParams(num_steps=4, separate_segments=False))
    _, t_g, _, t = obj2._segments(SampleDraws(range(4000), 0, 0, "test"), "cpu")
    assert bool((t > t_g).any()), "without separate segments t ranges up to t_total"


def test_params_errors_name_the_key():
    with pytest.raises(ValueError, match="objective.num_steps"):
        TDMParams.from_dict({"num_steps": 0})
    with pytest.raises(ValueError, match="objective.t_total"):
        TDMParams.from_dict({"t_total": 1.5})
    with pytest.raises(ValueError, match="objective.guidance"):
        TDMParams.from_dict({"guidance": 0.5})
    with pytest.raises(ValueError, match="objective.t_min"):
        TDMParams.from_dict({"num_steps": 4, "t_total": 0.1, "t_min": 0.02})
    with pytest.raises(ValueError, match="unknown key.*guidance_scale"):
        TDMParams.from_dict({"guidance_scale": 4.5})


def test_build_uses_the_context():
    tiny = make_tiny("dit", seed=3)
    made = []

    def copy(t):
        made.append(t)
        return copy_denoiser(t)

    ctx = SimpleNamespace(
        make_student=copy,
        make_copy=copy,
        latent_shape=tiny.latent_shape,
        num_classes=10,
        has_real_data=False,
        seed=0,
        device="cpu",
    )
    obj = build({"num_steps": 2, "guidance": 2.0}, tiny.denoiser, ctx)
    assert len(made) == 2 and obj.nets["teacher"] is tiny.denoiser
    assert obj.sampling["times"] == pytest.approx([0.9, 0.45, 0.0])
    assert obj.groups == {"generator": ["student"], "fake_score": ["fake"]}


@pytest.mark.parametrize(
    "path",
    [VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}), FlowPath(1000)],
)
def test_student_learns_the_teacher_mixture(path):
    # exact teacher: a two-component Gaussian mixture; student and fake score are mixtures with
    # learnable means, initialised 0.7 away. TDM must bring the student's means to the teacher's.
    means = torch.stack([torch.full((2, 2, 2), 1.0), torch.full((2, 2, 2), -1.0)])
    teacher = gmm_denoiser(path, means, std=0.2)
    student = gmm_denoiser(path, means + 0.7, std=0.2, learnable=True)
    fake = gmm_denoiser(path, means + 0.7, std=0.2, learnable=True)
    obj = TDM(student, fake, teacher, TDMParams(num_steps=4, guidance=1.0))
    opts = {
        "generator": torch.optim.AdamW(student.parameters(), lr=1e-2, betas=(0.0, 0.95), weight_decay=0.0),
        "fake_score": torch.optim.AdamW(fake.parameters(), lr=5e-2, betas=(0.0, 0.95), weight_decay=0.0),
    }
    err0 = (student.backbone.means - means).abs().mean().item()
    for step in range(120):
        batch = {"cond": None, "shape": (64, 2, 2, 2)}
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, batch, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    err = (student.backbone.means - means).abs().mean().item()
    assert err < 0.25 * err0, f"student means error {err0:.3f} -> {err:.3f}"


def test_registry_builds_tdm_from_preset_keys():
    from fewstep.objectives.registry import BuildContext, build_objective, make_params

    tiny = make_tiny("sd3", seed=4)
    ctx = BuildContext(latent_shape=tiny.latent_shape, text=True, family="sd3")
    obj = build_objective("tdm", {"num_steps": 2, "t_total": 1.0, "guidance": 3.0}, tiny.denoiser, ctx)
    assert isinstance(obj, TDM) and obj.sampling["times"] == pytest.approx([1.0, 0.5, 0.0])
    assert obj.nets["student"] is not tiny.denoiser and obj.nets["fake"] is not obj.nets["student"]
    with pytest.raises(ValueError, match="objective.num_steps"):
        make_params("tdm", {"num_steps": 0})
