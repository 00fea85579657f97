"""Restoration: the mean-reverting SDE, the embedded default's pieces, the restoration protocol,
and the IR-CM and TAD-SR objectives on an analytic restoration teacher.

The analytic teacher: the clean image is a fixed function of the degraded one, x0 = h(mu) =
-mu, so the exact denoiser returns h(mu) at every (x_t, t) and the exact consistency function
is h(mu) too. Any error in a loss's target shows up as a non-zero loss at that solution, and a
flipped sign makes the learning tests move away from it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewstep.conditioning import Conditioner
from fewstep.denoiser import Denoiser
from fewstep.mean_reverting import MeanRevertingPath
from fewstep.objectives.base import GlobalBatchDraws
from fewstep.objectives.registry import BuildContext
from fewstep.paths import VPPath
from tests.tiny import make_tiny


def _vp(prediction="v_prediction"):
    return VPPath.from_config(
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction, "num_train_timesteps": 1000}
    )


def h(mu):
    return -mu


class _ExactConditioner(Conditioner):
    """A 'sample'-prediction network that returns backbone(cond['image']) whatever x_t and t."""

    def call(self, backbone, x, timestep, cond):
        return backbone(cond["image"]).to(x.dtype)

    def null(self, cond, batch):  # pragma: no cover - never guided
        raise ValueError("no null")


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x):
        return self.fn(x) + 0 * self.dummy


def exact_teacher(fn=h) -> Denoiser:
    return Denoiser(_Fn(fn), _vp("sample"), _ExactConditioner())


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, 1, 8, 8, generator=g).clamp(-1, 1)
    return {
        "x0": h(mu),
        "cond": {"image": mu},
        "shape": (b, 1, 8, 8),
        "index": torch.arange(b),
        "global_batch_size": b,
    }


# ---- the mean-reverting SDE ---------------------------------------------------------------------
def test_mean_reverting_sde_marginals_match_closed_form():
    """Euler-Maruyama paths of dx = theta (mu - x) dt + sqrt(2 lam^2 theta) dW against the
    closed-form mean mu + (x0 - mu) a(t) and std lam sqrt(1 - a^2)."""
    sde = MeanRevertingPath(theta_min=0.5, theta_max=6.0, lam=0.7)
    g = torch.Generator().manual_seed(0)
    n_paths, n_steps = 40_000, 1000
    x0, mu = 0.8, -0.3
    x = torch.full((n_paths,), x0, dtype=torch.float64)
    dt = 1.0 / n_steps
    checks = {250: None, 500: None, 1000: None}
    for i in range(n_steps):
        t = torch.tensor(i * dt, dtype=torch.float64)
        th = sde.theta(t)
        x = (
            x
            + th * (mu - x) * dt
            + math.sqrt(2 * sde.lam**2 * float(th) * dt) * torch.randn(n_paths, generator=g, dtype=torch.float64)
        )
        if i + 1 in checks:
            checks[i + 1] = x.clone()
    for k, xs in checks.items():
        t = k / n_steps
        mean, std = sde.mean_std(
            torch.full((1, 1), x0, dtype=torch.float64), torch.full((1, 1), mu, dtype=torch.float64), t
        )
        assert abs(xs.mean().item() - mean.item()) < 0.01, (t, xs.mean().item(), mean.item())
        assert abs(xs.std().item() - std.item()) < 0.01, (t, xs.std().item(), std.item())
    # and marginal() draws from that law
    eps = torch.randn(n_paths, 1, generator=g, dtype=torch.float64)
    draws = sde.marginal(
        torch.full((n_paths, 1), x0, dtype=torch.float64), torch.full((n_paths, 1), mu, dtype=torch.float64), eps, 0.5
    )
    assert abs(draws.std().item() - checks[500].std().item()) < 0.01


def test_mean_reverting_state_maps_onto_the_teacher_path():
    """x_t - (1 - a) mu = a x0 + s eps lands on the VP path as alpha x0 + sigma eps (same x0, eps)."""
    sde, vp = MeanRevertingPath(lam=0.5), _vp()
    g = torch.Generator().manual_seed(1)
    x0, mu, eps = (torch.randn(5, 1, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.9])
    x_vp, t_vp = sde.to_path(sde.marginal(x0, mu, eps, t), mu, t, vp)
    a, s = vp.alpha_sigma(t_vp)
    want = a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(x_vp, want, atol=2e-4)
    # the SDE's deterministic step with the true x0 stays on the same (x0, eps) line
    x1 = sde.marginal(x0, mu, eps, 0.7)
    assert torch.allclose(sde.step(x1, x0, mu, 0.7, 0.2), sde.marginal(x0, mu, eps, 0.2), atol=1e-5)


# ---- the embedded default --------------------------------------------------------------------------
def test_pixel_vqvae_decodes_to_8bit_levels():
    from fewstep.digits.restoration import build_pixel_vqvae

    vq = build_pixel_vqvae()
    z = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = vq.decode(z).sample
    assert (out - z).abs().max() <= 1 / 255 + 1e-4  # half a level (2/255) from the nearest codebook value
    levels = (out + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_restoration_pairs_are_fixed_and_split():
    from fewstep.digits.restoration import restoration_pairs, restoration_split

    tr, held = restoration_split()
    assert len(set(tr.tolist()) & set(held.tolist())) == 0 and len(tr) + len(held) == 1797
    a, b = restoration_pairs("noise", limit=4), restoration_pairs("noise", limit=4)
    assert torch.equal(a.condition, b.condition)
    sr = restoration_pairs("sr4", limit=4)
    assert sr.degraded.shape == (4, 1, 8, 8) and sr.condition.shape == sr.target.shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="degradation must be one of"):
        restoration_pairs("jpeg")


def test_restoration_protocol_refuses_mismatched_sizes(tmp_path):
    from fewstep.evaluation import EvalSpec, InputError, evaluate
    from fewstep.evaluation.restoration import check_sizes, restoration_scores

    targets = torch.zeros(4, 1, 32, 32)
    with pytest.raises(
        InputError, match=r"restored images have shape \(4, 1, 8, 8\) but their targets \(4, 1, 32, 32\)"
    ):
        check_sizes(torch.zeros(4, 1, 8, 8), targets)
    with pytest.raises(InputError, match="sizes must match"):
        restoration_scores(torch.zeros(3, 1, 32, 32), targets, torch.zeros(4))
    # the protocol takes a model, not a folder of unpaired images
    with pytest.raises(InputError, match="give --pipeline, not --images"):
        evaluate(EvalSpec(images=str(tmp_path), protocol="restoration", out=str(tmp_path / "o")))


def test_restoration_scores_prefer_the_target():
    from fewstep.evaluation.restoration import restoration_scores

    g = torch.Generator().manual_seed(0)
    t = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    near = restoration_scores(t + 0.02 * torch.randn(t.shape, generator=g), t, torch.zeros(6), ("psnr", "ssim"))
    far = restoration_scores(t + 0.3 * torch.randn(t.shape, generator=g), t, torch.zeros(6), ("psnr", "ssim"))
    assert near["psnr"] > far["psnr"] + 10 and near["ssim"] > far["ssim"]


# ---- IR-CM -----------------------------------------------------------------------------------------
def _ircm(student, teacher, **kw):
    from fewstep.objectives.ircm import IRCM, IRCMConfig

    return IRCM(student, teacher, IRCMConfig(**{"grid": 10, "decouple_steps": 0, **kw}))


@pytest.mark.parametrize("distill", [True, False])
def test_ircm_losses_are_zero_at_the_exact_solution(distill):
    obj = _ircm(exact_teacher(), exact_teacher(), distill=distill)
    for step in range(3):
        loss, logs = obj.loss("generator", _batch(), step)
        assert loss.item() < 1e-6 and logs["origin"] < 1e-6 and logs["consistency"] < 1e-6
    wrong = _ircm(exact_teacher(lambda m: h(m) + 0.1), exact_teacher(), distill=distill)
    assert wrong.loss("generator", _batch(), 0)[1]["origin"] > 0.05


def _learn(obj, steps, lr=3e-3, batch_size=16):
    student = obj.nets["student"]
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)

    def err():
        with torch.no_grad():
            b = _batch(64, seed=123)
            z = torch.randn(b["shape"], generator=torch.Generator().manual_seed(5))
            return ((student(z, 1.0, b["cond"]) - b["x0"]) ** 2).mean().item()

    before = err()
    for step in range(steps):
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, _batch(batch_size, seed=1000 + step), step)
            opt.zero_grad()
            loss.backward()
            if phase == "generator":
                opt.step()
    return before, err()


def _sgd_step(net, lr):
    """One plain gradient step on the parameters that hold a gradient."""
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


@pytest.mark.parametrize("distill", [True, False])
def test_ircm_learns_one_step_restoration(distill):
    """A flipped sign of the consistency / origin-guided loss makes the error grow instead."""
    torch.manual_seed(0)
    tiny = make_tiny("restore", prediction="v_prediction")
    student = Denoiser(tiny.backbone, _vp(), tiny.denoiser.conditioner)
    obj = _ircm(student, exact_teacher(), distill=distill, decouple_steps=10)
    before, after = _learn(obj, 60)
    assert after < 0.5 * before, (before, after)


def test_ircm_consistency_step_moves_toward_its_target(monkeypatch):
    """A small gradient step on the consistency loss alone (origin weight 0, coupled from the
    start) brings the student's prediction at t_(n+1) closer to the stop-gradient target it had
    before the step: the loss's sign. A flipped sign moves it away."""
    import fewstep.objectives._maths as maths

    torch.manual_seed(0)
    tiny = make_tiny("restore", prediction="v_prediction")
    student = Denoiser(tiny.backbone, _vp(), tiny.denoiser.conditioner)
    obj = _ircm(student, exact_teacher(), distill=True, origin_weight=0.0)
    seen = []
    real = maths.pseudo_huber
    monkeypatch.setattr(maths, "pseudo_huber", lambda a, b, c: seen.append((a, b.detach(), c)) or real(a, b, c))
    batch = _batch(16, seed=4)
    loss, _ = obj.loss("generator", batch, 5)
    pred, target, c = seen[1]  # the origin-guided term first, then the consistency term
    before = float(real(pred.detach(), target, c).mean())
    loss.backward()
    _sgd_step(student, 1e-2)
    seen.clear()
    obj.loss("generator", batch, 5)  # the same step and batch: the same draws
    after = float(real(seen[1][0].detach(), target, c).mean())
    print(f"LEARN ircm consistency against the pre-step target {before:.4g} -> {after:.4g}")
    assert after < 0.99 * before, (before, after)


@pytest.mark.parametrize("renoise", ["fresh", "ddim"])
def test_ircm_refine_option_trains_the_second_step_on_its_own_input(renoise):
    """`refine_weight` (a named option, off by default): the exact solution has zero refine loss;
    the term evaluates the student at the 2-step grid's intermediate time on a state re-noised from
    its own 1-step estimate, and a small gradient step on it lowers it at the same draws (a flipped
    sign raises it)."""
    exact = _ircm(exact_teacher(), exact_teacher(), refine_weight=1.0, renoise=renoise)
    assert exact.loss("generator", _batch(), 0)[1]["refine"] < 1e-6
    assert "refine" not in _ircm(exact_teacher(), exact_teacher()).loss("generator", _batch(), 0)[1]
    torch.manual_seed(0)
    tiny = make_tiny("restore", prediction="v_prediction")
    student = Denoiser(tiny.backbone, _vp(), tiny.denoiser.conditioner)
    obj = _ircm(student, exact_teacher(), refine_weight=1.0, renoise=renoise)
    seen_t = []
    real_forward = student.forward
    student.forward = lambda x, t, cond: (
        seen_t.append(torch.as_tensor(t).reshape(-1)[0].item()) or real_forward(x, t, cond)
    )
    b = _batch(16, seed=4)
    x0, mu = b["x0"], b["cond"]["image"]

    def refine():
        draws = GlobalBatchDraws({"global_batch_size": 16}, seed=0, step=0, rows=16)
        draws.generator = torch.Generator().manual_seed(9)  # the same draws at every call
        return obj.refine_loss(x0, mu, b["cond"], draws)

    before = refine()
    assert seen_t[-1] == pytest.approx(obj.sampling["times_by_steps"][2][1])
    before.backward()
    _sgd_step(student, 5e-2)
    after = refine()
    print(f"LEARN ircm refine term {before.item():.4g} -> {after.item():.4g}")
    assert after.item() < 0.97 * before.item(), (before.item(), after.item())
    # the term's weight is its own: with the origin-guided weight at 0 the loss is consistency + 2 x refine
    apart = _ircm(student, exact_teacher(), refine_weight=2.0, renoise=renoise, origin_weight=0.0)
    loss, logs = apart.loss("generator", _batch(16, seed=5), 3)
    assert loss.item() == pytest.approx(logs["consistency"] + 2.0 * logs["refine"], rel=1e-5)


def test_ircm_through_the_registry_refuses_data_free_runs():
    from fewstep.objectives.registry import build_objective

    tiny = make_tiny("restore", prediction="v_prediction")
    with pytest.raises(ValueError, match="data.real_data=true"):
        build_objective(
            "ircm", {}, tiny.denoiser, BuildContext(latent_shape=(1, 8, 8), has_real_data=False, family="restore")
        )
    obj = build_objective(
        "ircm",
        {"num_steps": 2},
        tiny.denoiser,
        BuildContext(latent_shape=(1, 8, 8), has_real_data=True, family="restore"),
    )
    assert obj.sampling["times"] == [1.0, 0.5, 0.0] and obj.sampling["renoise"] == "fresh"
    assert obj.sampling["times_by_steps"] == {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0]}


# ---- TAD-SR ----------------------------------------------------------------------------------------
def _tadsr(gan: bool, **kw):
    from fewstep.objectives.registry import build_objective

    torch.manual_seed(0)
    tiny = make_tiny("restore", prediction="v_prediction")
    teacher = Denoiser(tiny.backbone, _vp(), tiny.denoiser.conditioner).requires_grad_(False)
    ctx = BuildContext(
        latent_shape=(1, 8, 8),
        has_real_data=True,
        family="restore",
        make_student=lambda t: Denoiser(make_tiny("restore", seed=1).backbone, _vp(), t.conditioner),
    )
    obj = build_objective("tadsr", {"gan": gan, "gan_width": 8, "teacher_steps": 4, **kw}, teacher, ctx)
    return obj


@pytest.mark.parametrize(
    "terms",
    [
        {},  # the paper's: regression + score distillation with the teacher's output as reference
        {"sd_weight": 0.0},  # the regression alone
        {"regression_weight": 0.0},  # the reference score distillation alone
        {"regression_weight": 0.0, "sd_form": "sds"},  # the plain score distillation variant
    ],
)
def test_tadsr_learns_from_the_teacher(terms):
    """Each term pulls the one-step output toward the teacher: its multi-step output (the
    regression), the reference-corrected score distillation and plain score distillation; with
    the exact teacher all point at h(mu). A flipped sign of any term pushes away."""
    obj = _tadsr(gan=False, **terms)
    obj.nets["teacher"] = exact_teacher()
    before, after = _learn(obj, 60)
    assert after < 0.5 * before, (terms, before, after)


def test_tadsr_reference_score_distillation_vanishes_at_the_teacher_output():
    """With the student's output equal to the teacher's multi-step output, the reference form's
    gradient is zero (the bias of plain score distillation is gone), while the plain form's is
    not, for a teacher whose denoiser does not return its input."""
    seen = {}
    for form in ("reference", "sds"):
        obj = _tadsr(gan=False, sd_form=form, regression_weight=0.0)
        teacher = obj.nets["teacher"]
        obj.nets["student"] = _ReplayTeacher(teacher, 4)
        loss, logs = obj.loss("generator", _batch(8), 0)
        seen[form] = logs["sd_grad"]
    assert seen["reference"] < 1e-5 and seen["sds"] > 1e-3, seen


class _ReplayTeacher(torch.nn.Module):
    """A 'student' whose one step returns the teacher's deterministic multi-step output."""

    def __init__(self, teacher, steps):
        super().__init__()
        self.teacher, self.steps = teacher, steps
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond):
        from fewstep.samplers import sample

        return sample(self.teacher, z, cond, self.teacher.path.sampling_times(self.steps), start=z) + 0 * self.w


def test_tadsr_discriminator_reads_the_teacher_features_at_time_t():
    obj = _tadsr(gan=True)
    assert obj.phases(0) == ["disc", "generator"]
    teacher_params = [p for p in obj.nets["teacher"].parameters()]
    loss_d, logs = obj.loss("disc", _batch(), 0)
    loss_d.backward()
    assert all(p.grad is None for p in teacher_params)  # the teacher is frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.nets["disc"].parameters())
    assert all(p.grad is None for p in obj.nets["student"].parameters())
    for p in obj.nets["disc"].parameters():
        p.grad = None
    loss_g, logs = obj.loss("generator", _batch(), 0)
    loss_g.backward()
    assert math.isfinite(logs["gan_g"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.nets["student"].parameters())
    # time-aware: the same features at another t give another logit
    feats = torch.randn(2, 16, 4, 4)
    head = obj.nets["disc"]
    assert not torch.allclose(head(feats, torch.tensor([0.1, 0.1])), head(feats, torch.tensor([0.9, 0.9])))


def test_image_conditioned_unet_runs_through_the_adapter():
    """The restore family: the image goes in on the channels, no guidance, and a wrong image
    shape is refused naming the expected shape."""
    from fewstep.families import family_of

    for prediction in ("epsilon", "v_prediction"):
        tiny = make_tiny("restore", prediction=prediction)
        assert family_of(tiny.backbone).name == "restore" and family_of(make_tiny("unet").backbone).name == "unet"
        d = tiny.denoiser
        x, cond, t = torch.randn(2, 1, 8, 8), tiny.cond(2), torch.tensor([0.9, 0.3])
        x0, eps = d(x, t, cond, output="x0_eps")
        assert torch.allclose(d.path.add_noise(x0, eps, t), x, atol=1e-4)
        other = d(x, t, {"image": cond["image"] + 1.0})
        assert not torch.allclose(x0, other)  # the image conditions the output
    with pytest.raises(ValueError, match="no unconditional input"):
        d(x, t, cond, guidance=3.0)
    with pytest.raises(ValueError, match=r"cond\['image'\] must have shape \(2, 1, 8, 8\)"):
        d(x, t, {"image": torch.zeros(2, 1, 4, 4)})


def test_restoration_objectives_refuse_a_teacher_without_the_image():
    from fewstep.objectives.registry import build_objective

    tiny = make_tiny("dit")
    for name in ("ircm", "tadsr"):
        with pytest.raises(ValueError, match="teacher.source must be an image-conditioned teacher"):
            build_objective(
                name, {}, tiny.denoiser, BuildContext(latent_shape=(4, 8, 8), has_real_data=True, family="dit")
            )


# ---- the restoration protocol's intervals and verdicts --------------------------------------------
def _noisy_pairs(stds, seed=0):
    """Targets in [-1, 1] and outputs with per-image noise of the given standard deviations."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(len(stds), 1, 32, 32, generator=g) * 2 - 1
    s = torch.tensor(stds).reshape(-1, 1, 1, 1)
    return (t + s * torch.randn(t.shape, generator=g)).clamp(-1, 1), t


def test_restoration_psnr_interval_is_the_bootstrap_of_the_unchanged_mean():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from fewstep.evaluation.restoration import _unit, restoration_scores

    # images that disagree: noise from 0.01 to 0.3 (per-image PSNR ~ 16 to 44 dB)
    o, t = _noisy_pairs(torch.logspace(-2, math.log10(0.3), 60).tolist())
    s = restoration_scores(o, t, torch.zeros(60), ("psnr",))
    # the reported figure is the one the protocol reported before the interval existed
    old = float(peak_signal_noise_ratio(_unit(o), _unit(t), data_range=1.0, dim=(1, 2, 3)))
    assert s["psnr"] == old
    lo, hi = s["psnr_ci"]
    assert lo < s["psnr"] < hi
    # an interval of the mean over images: about 2 x 1.96 standard errors wide
    per_image = peak_signal_noise_ratio(_unit(o), _unit(t), data_range=1.0, dim=(1, 2, 3), reduction="none")
    se = float(per_image.std()) / math.sqrt(60)
    assert 0.7 * 3.92 * se < hi - lo < 1.3 * 3.92 * se, (lo, hi, se)
    # images that agree (one noise level for all): a much narrower interval
    o2, t2 = _noisy_pairs([0.05] * 60)
    lo2, hi2 = restoration_scores(o2, t2, torch.zeros(60), ("psnr",))["psnr_ci"]
    assert hi2 - lo2 < 0.2 * (hi - lo)
    # seeded: the same seed gives the same interval, another seed another one; 0 resamples none
    assert restoration_scores(o, t, torch.zeros(60), ("psnr",))["psnr_ci"] == [lo, hi]
    assert restoration_scores(o, t, torch.zeros(60), ("psnr",), seed=1)["psnr_ci"] != [lo, hi]
    assert "psnr_ci" not in restoration_scores(o, t, torch.zeros(60), ("psnr",), bootstrap=0)
    # an output equal to its target (infinite PSNR) still gives an ordered interval, no nan
    o[0] = t[0]
    lo3, hi3 = restoration_scores(o, t, torch.zeros(60), ("psnr",))["psnr_ci"]
    assert lo3 <= hi3 and not math.isnan(lo3) and not math.isnan(hi3)


def _member(name, fid, half, acc=0.9):
    return {"name": name, "fid": fid, "fid_ci": [fid - half, fid + half], "class_acc_ci": [acc - 0.01, acc + 0.01]}


def _panel(*members, bootstrap=200):
    """A `panel_scores`-shaped result: what `compare` and the table read."""
    fids = [m["fid"] for m in members]
    summary = {"fid_median": float(torch.tensor(fids).median()), "fid_range": [min(fids), max(fids)]}
    return {"n": 100, "bootstrap": bootstrap, "members": list(members), "panel": summary}


def _row(what, steps, psnr, half, kind="noise", panel=None, **extra):
    row = {
        "degradation": kind,
        "what": what,
        "steps": steps,
        "n": 100,
        "psnr": psnr,
        "psnr_ci": [psnr - half, psnr + half],
    }
    if panel is not None:
        row["panel"] = panel
    return {**row, **extra}


def test_restoration_verdicts_follow_the_intervals():
    from fewstep.evaluation.restoration import _markdown, restoration_verdicts

    teacher_panel = _panel(_member("a", 10.0, 1.0), _member("b", 20.0, 1.0))
    rows = [
        {"degradation": "-", "what": "clean targets (floor)", "n": 100, "fid": 1.0},
        {"degradation": "noise", "what": "degraded input", "n": 100, "psnr": 15.0, "psnr_ci": [14.0, 16.0]},
        _row("teacher", 10, 18.0, 0.5),  # below the 50-step teacher: trails
        _row("teacher", 50, 20.0, 0.5, panel=teacher_panel),
        # wholly above; every member's FID lower with separated intervals
        _row("student", 1, 22.0, 0.5, panel=_panel(_member("a", 5.0, 1.0), _member("b", 12.0, 1.0)), model="p1"),
        # overlapping PSNR intervals; one member's FID interval overlaps the teacher's
        _row("student", 2, 20.3, 0.5, panel=_panel(_member("a", 5.0, 1.0), _member("b", 19.5, 1.0)), model="p2"),
        # every member's FID higher, separated
        _row("student", 4, 19.0, 0.2, panel=_panel(_member("a", 15.0, 1.0), _member("b", 30.0, 1.0))),
        _row("student", 1, 30.0, 0.5, kind="blur"),  # no teacher on blur: no verdict
    ]
    got = {(v["model"], v["steps"]): v for v in restoration_verdicts(rows)}
    assert set(got) == {("teacher", 10), ("p1", 1), ("p2", 2), ("student", 4)}
    assert all(v["teacher_steps"] == 50 and v["degradation"] == "noise" for v in got.values())
    assert got[("teacher", 10)]["psnr"] == "trails" and "fid" not in got[("teacher", 10)]
    assert got[("p1", 1)]["psnr"] == "beats" and got[("p1", 1)]["psnr_diff_db"] == pytest.approx(2.0)
    assert got[("p2", 2)]["psnr"] == "within noise" and got[("p2", 2)]["psnr_diff_db"] == pytest.approx(0.3)
    assert got[("student", 4)]["psnr"] == "trails" and got[("student", 4)]["psnr_diff_db"] == pytest.approx(-1.0)
    # FID by the claims rule: lower is better, every member must agree
    assert got[("p1", 1)]["fid"] == "beats"
    assert got[("p1", 1)]["fid_ratio_median"] == pytest.approx((0.5 + 0.6) / 2)
    assert got[("p1", 1)]["fid_ratio_range"] == pytest.approx([0.5, 0.6])
    assert got[("p2", 2)]["fid"] == "within noise"
    assert got[("student", 4)]["fid"] == "trails"
    assert got[("p1", 1)]["class_acc"] == "within noise"
    # a panel scored without resamples has no intervals: no FID verdict rather than an error
    rows[4] = {**rows[4], "panel": _panel(_member("a", 5.0, 1.0), bootstrap=0)}
    assert "fid" not in restoration_verdicts(rows)[1]
    # the table and the verdicts that results.md shows
    md = _markdown({"source": "x", "rows": rows, "verdicts": restoration_verdicts(rows)})
    assert "| PSNR 95% CI |" in md and "| 19.50-20.50 |" in md
    assert "| panel FID median [range] |" in md and "| 10.00 [10.00, 20.00] |" in md
    assert "- noise: teacher at 10 steps against the teacher at 50: PSNR trails (-2.00 dB)" in md
    assert "- noise: student at 4 steps against the teacher at 50: PSNR trails (-1.00 dB); FID trails" in md


def test_restoration_panel_metric_scores_the_outputs_with_their_labels(tmp_path, monkeypatch):
    import json

    from fewstep.digits.data import load_digits_tensors, split_indices
    from fewstep.digits.judge import JUDGE_NAME
    from fewstep.evaluation.restoration import RESTORATION_METRICS, restoration_scores, restoration_verdicts

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    assert "panel" not in RESTORATION_METRICS  # asked for by name only
    x, y = load_digits_tensors()
    _, held = split_indices(x.shape[0])
    t, labels = x[held[:100]], y[held[:100]]
    g = torch.Generator().manual_seed(0)
    kw = {"bootstrap": 20, "panel_members": [JUDGE_NAME]}
    good = restoration_scores(t, t, labels, ("psnr", "panel"), **kw)
    bad = restoration_scores((t + 0.8 * torch.randn(t.shape, generator=g)).clamp(-1, 1), t, labels, ("panel",), **kw)
    pan = good["panel"]
    assert pan["n"] == 100 and [m["name"] for m in pan["members"]] == [JUDGE_NAME]
    assert pan["members"][0]["class_acc"] > 0.9  # the source labels, not zeros
    assert bad["panel"]["panel"]["fid_median"] > 1.5 * pan["panel"]["fid_median"]
    text = json.dumps(good)  # results.json takes it as it is, without the bootstrap samples
    assert "_boot" not in text
    rows = [
        {"degradation": "noise", "what": "teacher", "steps": 50, **good},
        {"degradation": "noise", "what": "student", "steps": 1, **bad},
    ]
    assert restoration_verdicts(rows)[0]["fid"] == "trails"


def test_restoration_refuses_bad_metric_requests(tmp_path):
    from fewstep.evaluation import EvalSpec, InputError, evaluate
    from fewstep.evaluation.restoration import restoration_scores

    t = torch.zeros(3, 1, 32, 32)
    with pytest.raises(InputError, match="metric 'panel' needs at least 4 images per row.*got 3"):
        restoration_scores(t, t, torch.zeros(3), ("psnr", "panel"))
    with pytest.raises(InputError, match=r"\['lpips'\] are unknown.*'panel'"):
        restoration_scores(t, t, torch.zeros(3), ("lpips",))
    with pytest.raises(InputError, match="bootstrap must be >= 0"):
        restoration_scores(t, t, torch.zeros(3), ("psnr",), bootstrap=-1)
    # the protocol says so before it loads or restores anything
    spec = EvalSpec(pipeline="digits-restore", protocol="restoration", metrics=["panel"], num_samples=3, steps=[1])
    with pytest.raises(InputError, match="--metrics panel needs --num-samples >= 4"):
        evaluate(EvalSpec(**{**spec.__dict__, "out": str(tmp_path / "o")}))
