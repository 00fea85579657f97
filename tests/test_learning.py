"""Every registered objective learns, measured against ground truth.

The teacher is the exact class-conditional Gaussian mixture of `fewstep.testing` (three classes in
2-D, std 0.3, null class 3 = the whole mixture) on a flow path. The reference distribution is the
mixture itself at guidance 1, and the teacher's own 100-step guided DDIM sampler at guidance > 1.
Each test builds the objective through the registry, trains briefly, and compares the sliced
Wasserstein-2 distance of the student's few-step samples (its own sampler, `objective.sampling`) to
reference samples before and after; the assertion message states both.

Students: objectives that start the student as a copy of the teacher (LCM, sCM, TBCM, TDM, DSM) get
a copy of the mixture whose means are moved 0.7 off (trainable means); the DMD family, whose
one- or few-step generator maps noise to samples, gets a small MLP generator and an MLP-corrected
copy of the teacher as its fake score (it starts as the teacher, as the methods prescribe).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fewstep.conditioning import ClassConditioner
from fewstep.denoiser import Denoiser, copy_denoiser
from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.registry import BuildContext, build_objective
from fewstep.paths import FlowPath
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser

MEANS = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0]]).view(3, 2, 1, 1)
K, NULL, SHAPE = 3, 3, (2, 1, 1)
N_EVAL = 1000
W = 3.0  # the CFG scale of the guided tests


def teacher_gmm(shift: float = 0.0, learnable: bool = False) -> Denoiser:
    return gmm_denoiser(
        FlowPath(1000), MEANS + shift, std=0.3, classes=torch.arange(K), null_class=NULL, learnable=learnable
    )


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % K


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    g = torch.Generator().manual_seed(3)
    a, b = a.flatten(1).float(), b.flatten(1).float()
    th = torch.randn(a.shape[1], n_proj, generator=g)
    th = th / th.norm(dim=0)
    pa, pb = (a @ th).sort(0).values, (b @ th).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


_REF: dict[float, torch.Tensor] = {}


def reference(w: float) -> torch.Tensor:
    """Exact mixture samples (w = 1) or the teacher's 100-step guided DDIM samples (w > 1)."""
    if w not in _REF:
        t = teacher_gmm()
        y = labels(N_EVAL)
        if w == 1.0:
            _REF[w] = t.backbone.sample_data(N_EVAL, y, generator=torch.Generator().manual_seed(1))
        else:
            z = torch.randn(N_EVAL, *SHAPE, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                _REF[w] = sample(t, z, {"class_labels": y}, t.path.sampling_times(100), guidance=w, renoise="ddim")
    return _REF[w]


def distance(obj, w: float) -> float:
    """Sliced W2 between the student's samples (its own sampler) and the reference."""
    student = obj.nets["student"]
    z = torch.randn(N_EVAL, *SHAPE, generator=torch.Generator().manual_seed(2))
    s = obj.sampling
    with torch.no_grad():
        x = sample(
            student,
            z,
            {"class_labels": labels(N_EVAL)},
            s["times"],
            renoise=s["renoise"],
            generator=torch.Generator().manual_seed(4),
        )
    return sliced_w2(x, reference(w))


# ---- networks for the DMD family --------------------------------------------------------------
class _Out:
    def __init__(self, sample):
        self.sample = sample


class MLPGenerator(nn.Module):
    """A generator network: native output from (x, t, one-hot label)."""

    def __init__(self, width: int = 64):
        super().__init__()
        d = SHAPE[0]
        self.net = nn.Sequential(
            nn.Linear(d + K + 2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )

    def forward(self, x, timestep, class_labels=None):
        t = (timestep.float() / 1000).view(-1, 1)
        lab = torch.nn.functional.one_hot(class_labels.clamp(max=K), K + 1)[:, :K].float()
        h = torch.cat([x.flatten(1), lab, t, (class_labels == NULL).float().view(-1, 1)], 1)
        return _Out(self.net(h).view_as(x))


class ResidualFake(nn.Module):
    """The teacher's exact output plus a zero-initialised MLP correction: starts as the teacher."""

    def __init__(self, base, width: int = 64):
        super().__init__()
        self.base = base
        self.corr = MLPGenerator(width)
        nn.init.zeros_(self.corr.net[-1].weight)
        nn.init.zeros_(self.corr.net[-1].bias)

    def forward(self, x, timestep, class_labels=None):
        return _Out(
            self.base(x, timestep, class_labels=class_labels).sample + self.corr(x, timestep, class_labels).sample
        )


def _cond():
    return ClassConditioner(null_class=NULL, kind="unet")


def ctx_for(kind: str, real: bool = True) -> BuildContext:
    """kind "copy": student and copies are the teacher's mixture with means 0.7 off (trainable);
    "copy+mlp": the same plus a zero-initialised MLP correction (room for a guided or few-step
    map that no mixture posterior is); "mlp": an MLP generator student and MLP-corrected teacher
    copies."""
    torch.manual_seed(0)
    if kind == "copy":

        def make_student(teacher):
            return teacher_gmm(0.7, learnable=True)

        make_copy = make_student
    elif kind == "copy+mlp":

        def make_student(teacher):
            return Denoiser(ResidualFake(teacher_gmm(0.7, learnable=True).backbone), teacher.path, _cond())

        make_copy = make_student
    else:

        def make_student(teacher):
            return Denoiser(MLPGenerator(), teacher.path, _cond())

        def make_copy(teacher):
            return Denoiser(ResidualFake(copy_denoiser(teacher, trainable=False).backbone), teacher.path, _cond())

    return BuildContext(
        latent_shape=SHAPE,
        num_classes=K,
        null_class=NULL,
        has_real_data=real,
        seed=0,
        make_student=make_student,
        make_copy=make_copy,
    )


def train(obj, steps: int, lr: dict[str, float], batch: int = 128, real: bool = True, betas=(0.9, 0.99)):
    opts = {
        g: torch.optim.Adam(trainable_parameters(obj, g), lr=lr.get(g, lr["generator"]), betas=betas)
        for g in obj.groups
    }
    truth = teacher_gmm().backbone
    gen = torch.Generator().manual_seed(5)
    for step in range(steps):
        y = labels(batch)
        b = {"cond": {"class_labels": y}, "shape": (batch, *SHAPE)}
        if real:
            b["x0"] = truth.sample_data(batch, y, generator=gen)
        for phase in obj.phases(step):
            loss, logs = obj.loss(phase, b, step)
            assert torch.isfinite(loss), (phase, step, logs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(obj, phase), 1.0)
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            if hasattr(obj, "after_step"):
                obj.after_step(phase, step)


def trained_distances(name: str, params: dict, kind: str, w: float, steps: int, lr: dict, seed: int = 0, **kw):
    """(before, after): the sliced W2 to the reference before and after `steps` steps of training,
    the objective built with the run seed `seed`."""
    teacher = teacher_gmm()
    ctx = dataclasses.replace(ctx_for(kind, kw.get("real", True)), seed=seed)
    obj = build_objective(name, params, teacher, ctx)
    before = distance(obj, w)
    torch.manual_seed(1)
    train(obj, steps, lr, **kw)
    return before, distance(obj, w)


def learns(
    name: str,
    params: dict,
    kind: str,
    w: float,
    steps: int,
    lr: dict[str, float],
    factor: float,
    real: bool = True,
    **kw,
) -> tuple[float, float]:
    """Train `steps` steps; the distance to the reference must fall below `factor` times its start."""
    before, after = trained_distances(name, params, kind, w, steps, lr, real=real, **kw)
    msg = f"{name} {params} at w={w}: sliced W2 to the reference {before:.3f} -> {after:.3f}"
    print("LEARN", msg)
    assert after < factor * before, msg
    return before, after


# ---- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1.0, W])
def test_dmd2_one_step_learns(w):
    learns(
        "dmd2",
        {"guidance": w, "fake_updates_per_generator": 2},
        "mlp",
        w,
        300,
        {"generator": 2e-3, "fake_score": 1e-2},
        0.5,
    )


@pytest.mark.parametrize("w", [1.0, W])
def test_dmd2_four_step_learns(w):
    learns(
        "dmd2",
        {"guidance": w, "num_steps": 4, "student_times": [1.0, 0.75, 0.5, 0.25], "fake_updates_per_generator": 2},
        "mlp",
        w,
        160,
        {"generator": 3e-3, "fake_score": 1e-2},
        0.5,
        batch=64,
    )


@pytest.mark.parametrize("w", [1.0, W])
def test_dmd_with_regression_learns(w, tmp_path):
    learns(
        "dmd",
        {"guidance": w, "regression_pairs": 256, "regression_steps": 20, "cache_dir": str(tmp_path)},
        "mlp",
        w,
        160,
        {"generator": 3e-3, "fake_score": 1e-2},
        0.5,
        batch=64,
    )


@pytest.mark.parametrize("w", [1.0, W])
def test_decoupled_dmd_learns(w):
    learns(
        "decoupled_dmd",
        {"guidance": w, "fake_updates_per_generator": 2},
        "mlp",
        w,
        300,
        {"generator": 2e-3, "fake_score": 1e-2},
        0.5,
    )


@pytest.mark.parametrize("w,factor", [(1.0, 0.5), (W, 0.65)])
def test_lcm_learns(w, factor):
    learns(
        "lcm",
        {"guidance_min": w, "guidance_max": w, "num_steps": 4, "ema_decay": 0.9, "loss_type": "l2"},
        "copy+mlp",
        w,
        150,
        {"generator": 1e-2},
        factor,
    )


def learns_over_seeds(name: str, params: dict, kind: str, w: float, steps: int, lr: dict, factor: float, **kw):
    """`learns` for objectives whose guided runs depend on the run's seed (the sCM family at
    w = 3 on this mixture: after/before ranges from 0.35 to 2.9 over seeds 0-5 at 150 steps): the
    median ratio over seeds 0-4 must be below `factor`."""
    ratios = []
    for seed in range(5):
        before, after = trained_distances(name, params, kind, w, steps, lr, seed=seed, **kw)
        ratios.append(after / before)
    msg = f"{name} {params} at w={w}: sliced W2 after / before per seed {[round(r, 3) for r in ratios]}"
    print("LEARN", msg)
    assert sorted(ratios)[2] < factor, msg


@pytest.mark.parametrize("w,kind,lr,factor", [(1.0, "copy", 2e-2, 0.5), (W, "copy+mlp", 1e-2, 0.75)])
def test_scm_learns(w, kind, lr, factor):
    # the published default: exact JVP tangent, adaptive weighting, sigma_d 0.5
    params = {"guidance": w, "tangent_warmup": 20, "num_steps": 2}
    if w == 1.0:
        learns("scm", params, kind, w, 150, {"generator": lr}, factor)
    else:
        learns_over_seeds("scm", params, kind, w, 150, {"generator": lr}, factor)


@pytest.mark.parametrize("w,kind,lr,factor", [(1.0, "copy", 2e-2, 0.5), (W, "copy+mlp", 3e-2, 0.8)])
def test_tbcm_learns(w, kind, lr, factor):
    params = {"guidance": w, "tangent_warmup": 20, "num_steps": 2, "route_steps": 8}
    if w == 1.0:
        learns("tbcm", params, kind, w, 150, {"generator": lr}, factor, real=False, batch=16)
    else:
        learns_over_seeds("tbcm", params, kind, w, 150, {"generator": lr}, factor, real=False, batch=16)


@pytest.mark.parametrize("w", [1.0, W])
def test_tdm_learns(w):
    learns(
        "tdm",
        {"guidance": w, "num_steps": 4},
        "copy",
        w,
        150,
        {"generator": 1e-2, "fake_score": 5e-2},
        0.5,
        betas=(0.0, 0.95),
    )


def test_dsm_learns_the_data():
    learns("dsm", {"sampling_steps": 8}, "copy", 1.0, 150, {"generator": 2e-2}, 0.5)


def test_dsm_learns_the_guided_teacher_data_free():
    learns(
        "dsm",
        {"sampling_steps": 8, "teacher_guidance": W, "teacher_steps": 16},
        "copy",
        W,
        150,
        {"generator": 2e-2},
        0.6,
        real=False,
    )
