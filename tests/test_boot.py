"""BOOT: the signal-space step is one teacher DDIM step, the bootstrap target is a fixed point of the
exact student, a short run learns the teacher's ODE map on an exact mixture teacher, one step
trains only the student on several backbone families, and data is refused."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.denoiser import copy_denoiser
from fewstep.objectives.boot import BOOT, BOOTParams, build, signal_step
from fewstep.paths import FlowPath, VPPath
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser
from tests.tiny import make_tiny

VP = VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
PATHS = {"vp": VP, "flow": FlowPath(1000)}
MEANS = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0]]).view(3, 2, 1, 1)
CLASSES = torch.tensor([0, 1, 1])


def _ctx(**kw):
    base = {
        "latent_shape": (2, 1, 1),
        "has_real_data": False,
        "gradient_checkpointing": False,
        "make_student": lambda t: copy_denoiser(t),
    }
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_signal_step_is_one_ddim_step(kind):
    path = PATHS[kind]
    g = torch.Generator().manual_seed(0)
    y_t, f, eps = (torch.randn(5, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.1])
    s = torch.tensor([0.9, 0.5, 0.4, 0.05, 0.0])
    x_t = path.add_noise(y_t, eps, t)
    x_s = path.ddim_step(x_t, f, t, s)
    a_s, sig_s = path.alpha_sigma(s)
    y_s = (x_s - sig_s.view(-1, 1, 1, 1) * eps) / a_s.view(-1, 1, 1, 1)
    torch.testing.assert_close(signal_step(path, y_t, f, t, s), y_s, rtol=1e-4, atol=1e-4)


class _ExactStudent(nn.Module):
    """g(eps, s) = the signal y_s of the teacher's own CFG DDIM trajectory from x_1 = eps on the
    objective's grid (the limit f_cfg(eps, 1) where alpha_1 = 0)."""

    def __init__(self, teacher, grid, guidance):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.teacher, self.grid, self.guidance = teacher, grid, guidance

    def forward(self, x_in, t, cond=None, guidance=1.0, output="x0", target=None):
        path = self.teacher.path
        out = torch.empty_like(x_in)
        for i in range(x_in.shape[0]):
            s = float(target[i])
            j = min(range(len(self.grid)), key=lambda m: abs(self.grid[m] - s))
            assert abs(self.grid[j] - s) < 1e-6
            c = None if cond is None else {k: v[i : i + 1] for k, v in cond.items()}
            eps = x_in[i : i + 1]
            x = eps
            for a, b in zip(self.grid[:j], self.grid[1 : j + 1]):
                x = path.ddim_step(x, self.teacher(x, a, c, self.guidance), a, b)
            a_s, sig_s = path.alpha_sigma(torch.tensor([s]))
            out[i] = self.teacher(eps, 1.0, c, self.guidance)[0] if float(a_s) == 0.0 else (x[0] - sig_s * eps[0]) / a_s
        return out


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_bootstrap_target_of_the_exact_student_is_one_exact_teacher_step(kind):
    teacher = gmm_denoiser(PATHS[kind], MEANS, std=0.3, classes=CLASSES, null_class=-1)
    p = BOOTParams(guidance=2.0, intervals=6)
    obj = BOOT(nn.Identity(), teacher, p)  # placeholder student, replaced below
    student = _ExactStudent(teacher, obj.grid, p.guidance)
    obj.nets["student"] = student
    n = len(obj.grid) - 1
    eps = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    cond = {"class_labels": torch.tensor([0, 1] * (n // 2) + [0] * (n % 2))}
    t = torch.tensor(obj.grid[:-1], dtype=torch.float32)
    s = torch.tensor(obj.grid[1:], dtype=torch.float32)
    target = obj.targets(eps, t, s, torch.zeros(n, dtype=torch.bool), cond)
    # the exact student's own value at s (its trajectory, one step further)
    exact = student(eps, 1.0, cond, target=s)
    torch.testing.assert_close(target, exact, rtol=1e-4, atol=1e-4)
    # and the target moved: the step is not the identity
    g_t = student(eps, 1.0, cond, target=t)
    assert (target - g_t).abs().max() > 0.05
    # the boundary target is the teacher's CFG x0 at the noise
    b = obj.targets(eps, torch.ones(n), torch.ones(n), torch.ones(n, dtype=torch.bool), cond)
    torch.testing.assert_close(b, teacher(eps, 1.0, cond, 2.0), rtol=1e-5, atol=1e-5)


def test_x_space_weighting_scales_each_sample_by_alpha_s_squared():
    """weighting: x_space multiplies each sample's signal-space loss by alpha_s^2 (so the loss is the
    error of the implied trajectory point); 'none' leaves it as written in the paper."""
    teacher = gmm_denoiser(VP, MEANS, std=0.3, classes=CLASSES, null_class=-1)
    batch = {"shape": (16, 2, 1, 1), "cond": {"class_labels": torch.tensor([0, 1] * 8)}}

    def per_sample_losses(weighting):
        obj = BOOT(_MLPStudent(), teacher, BOOTParams(guidance=1.5, intervals=4, weighting=weighting))
        torch.manual_seed(0)
        obj.nets["student"] = _MLPStudent()
        seen = {}
        orig = obj.draw

        def draw(rng, dev):
            seen["ts"] = orig(rng, dev)
            return seen["ts"]

        obj.draw = draw
        loss, _ = obj.loss("generator", batch, step=0)
        return loss, seen["ts"][1]

    plain, s = per_sample_losses("none")
    weighted, s2 = per_sample_losses("x_space")
    torch.testing.assert_close(s, s2)
    a_s = VP.alpha_sigma(s)[0]
    assert float(a_s.min()) < 0.1 < float(a_s.max())  # the draw spans low and high noise
    # recompute the unweighted per-sample terms and check the weighted mean against them
    obj = BOOT(_MLPStudent(), teacher, BOOTParams(guidance=1.5, intervals=4))
    torch.manual_seed(0)
    obj.nets["student"] = _MLPStudent()
    from fewstep.randomness import SampleDraws

    rng = SampleDraws.for_batch(batch, obj.seed, 0, "boot", torch.device("cpu"), rows=16)
    eps = rng.normal(2, 1, 1)
    t, s3, boundary = obj.draw(rng, torch.device("cpu"))
    target = obj.targets(eps, t, s3, boundary, batch["cond"])
    per = ((obj.g(eps, s3, batch["cond"]) - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(plain, per.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weighted, (per * a_s**2).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="objective.weighting"):
        BOOTParams(weighting="snr").validate()


class _MLPStudent(nn.Module):
    """g(eps, s): an MLP of the noise and Fourier features of s (x0 space, no path reading)."""

    def __init__(self, d: int = 2, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )

    def forward(self, x_in, t, cond=None, guidance=1.0, output="x0", target=None):
        s = torch.as_tensor(target, dtype=torch.float32).reshape(-1, 1).expand(x_in.shape[0], 1)
        k = torch.arange(1, 5, dtype=torch.float32)[None] * math.pi
        feats = torch.cat([torch.sin(k * s), torch.cos(k * s)], 1)
        return self.net(torch.cat([x_in.flatten(1), feats], 1)).view_as(x_in)


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_boot_learns_the_teachers_one_step_map(kind):
    torch.manual_seed(0)
    teacher = gmm_denoiser(PATHS[kind], MEANS, std=0.3)
    student = _MLPStudent()
    obj = BOOT(student, teacher, BOOTParams(guidance=1.0, intervals=8, boundary_fraction=0.125))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    z = torch.randn(512, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ode = sample(teacher, z, None, PATHS[kind].sampling_times(50))  # the map BOOT distils

    exact = teacher.backbone.sample_data(2000, generator=torch.Generator().manual_seed(1))

    def distance():
        with torch.no_grad():
            return (obj.g(z, torch.zeros(z.shape[0]), None) - ode).flatten(1).norm(dim=1).mean().item()

    def to_mixture():
        with torch.no_grad():
            return _sliced_w2(obj.g(z, torch.zeros(z.shape[0]), None), exact)

    before, w2_before = distance(), to_mixture()
    for step in range(400):
        loss, _ = obj.loss("generator", {"cond": None, "shape": (256, 2, 1, 1)}, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after, w2_after = distance(), to_mixture()
    print(
        f"{kind}: mean distance of the one-step output to the teacher's ODE endpoint {before:.3f} -> {after:.3f}; "
        f"sliced W2 to the mixture {w2_before:.3f} -> {w2_after:.3f}"
    )
    assert after < 0.35 * before
    assert w2_after < 0.5 * w2_before


def _sliced_w2(a, b, n_proj=64, seed=3) -> float:
    g = torch.Generator().manual_seed(seed)
    a, b = a.flatten(1), b.flatten(1)
    th = torch.randn(a.shape[1], n_proj, generator=g)
    th = th / th.norm(dim=0)
    pa, pb = (a @ th).sort(0).values, (b @ th).sort(0).values
    n = min(pa.shape[0], pb.shape[0])
    pa, pb = pa[torch.linspace(0, pa.shape[0] - 1, n).long()], pb[torch.linspace(0, pb.shape[0] - 1, n).long()]
    return ((pa - pb) ** 2).mean().sqrt().item()


@pytest.mark.parametrize(
    "family,prediction",
    [
        ("dit", "epsilon"),
        ("unet", "v_prediction"),
        ("sd15", "epsilon"),
        ("pixart", "epsilon"),
        ("sd3", "flow"),
        ("flux", "flow"),
    ],
)
def test_one_step_trains_only_the_student(family, prediction):
    kw = {"guidance_embeds": False} if family == "flux" else {}
    tiny = make_tiny(family, prediction=prediction if prediction != "flow" else "epsilon", seed=1, **kw)
    teacher = tiny.denoiser
    ref = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    obj = build(
        {"guidance": 2.0, "intervals": 4, "boundary_fraction": 0.5}, teacher, _ctx(latent_shape=tiny.latent_shape)
    )
    student = obj.nets["student"]
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    extra = [p for n, p in student.named_parameters() if n.endswith("extra.weight")]
    assert extra and all(bool((p == 0).all()) for p in extra)
    batch = {"cond": tiny.cond(4), "shape": (4, *tiny.latent_shape)}
    loss, logs = obj.loss("generator", batch, 0)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in extra), "the trajectory time gets no gradient"
    opt.step()
    assert not any(p.requires_grad for p in teacher.parameters())
    after = teacher.backbone.state_dict()
    assert all(torch.equal(ref[k], after[k]) for k in ref), "the teacher changed"
    # the saved student is the teacher's class and keys, and reproduces the sampler's output
    solo = student.standalone()
    assert type(solo.backbone) is type(teacher.backbone) and solo.backbone.state_dict().keys() == ref.keys()
    x, c = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        torch.testing.assert_close(solo(x, obj.p.input_time, c), student(x, obj.p.input_time, c), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            student(x, obj.p.input_time, c),
            obj.g(x / teacher.path.init_noise_sigma, torch.zeros(2), c),
            rtol=1e-5,
            atol=1e-6,
        )


def test_real_data_is_refused_naming_the_key():
    tiny = make_tiny("dit", seed=0)
    with pytest.raises(ValueError, match=r"data\.real_data"):
        build({}, tiny.denoiser, _ctx(latent_shape=tiny.latent_shape, has_real_data=True))
    obj = build({}, tiny.denoiser, _ctx(latent_shape=tiny.latent_shape))
    batch = {"cond": tiny.cond(2), "shape": (2, *tiny.latent_shape), "x0": torch.randn(2, *tiny.latent_shape)}
    with pytest.raises(ValueError, match=r"data\.real_data"):
        obj.loss("generator", batch, 0)


def test_preset_with_real_data_fails_at_start(tmp_path):
    from fewstep.config import config_from_dict
    from fewstep.training.loop import run
    from tests.dist.bundles import real_data_bundle

    tiny = make_tiny("dit", seed=0)
    bundle = real_data_bundle(tiny, 20)
    cfg = config_from_dict(
        {
            "name": "boot-real",
            "output_dir": str(tmp_path / "run"),
            "steps": 1,
            "objective": {"name": "boot"},
            "data": {"batch_size": 2, "real_data": True},
            "log": {"sample_every": 0, "trackers": [], "progress": False},
            "checkpoint": {"every": 0},
        }
    )
    with pytest.raises(ValueError, match=r"data\.real_data"):
        run(cfg, teacher=bundle)
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"guidance": 0.5}, "guidance"),
        ({"intervals": 0}, "intervals"),
        ({"input_time": 0.0}, "input_time"),
        ({"boundary_fraction": 1.0}, "boundary_fraction"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_bad_params_name_the_key(kw, key):
    from fewstep.objectives.registry import make_params

    with pytest.raises(ValueError, match=rf"objective\.{key}"):
        make_params("boot", kw)
