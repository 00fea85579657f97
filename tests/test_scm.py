"""Continuous-time consistency (sCM, TBCM): TrigFlow conversions, the JVP tangent against finite
differences in float64, the exact teacher trajectory, and one training step per family."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.denoiser import copy_denoiser
from fewstep.objectives import _trigflow as tf
from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.scm import SCMObjective, SCMParams, TBCMObjective, TBCMParams, scm_tangent, tbcm_route
from fewstep.paths import FlowPath, TrigFlowPath
from fewstep.randomness import SampleDraws
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser
from tests.tiny import make_tiny, vp_path

SD = 0.5


def _paths():
    return {"vp_eps": vp_path("epsilon"), "vp_v": vp_path("v_prediction"), "flow": FlowPath(1000, shift=3.0)}


@pytest.mark.parametrize("name", ["vp_eps", "flow"])
def test_trigflow_point_is_the_teachers_point(name):
    """The TrigFlow state sd (cos x0 + sin z) (a TrigFlowPath(sd) point of data sd x0) is the
    teacher's own point of the same (x0, z) at sigma / alpha = tan(theta), and F read off the
    teacher's x0 is TrigFlow's own prediction of sd x0."""
    path = _paths()[name]
    trig = TrigFlowPath(SD)
    theta = torch.tensor([0.01, 0.4, 1.0, 1.3, 1.5], dtype=torch.float64)
    theta = theta.clamp(max=tf.max_angle(path))
    x0 = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    z = torch.randn_like(x0)
    x_trig = trig.add_noise(SD * x0, z, trig.t_from_angle(theta))
    x_p, t_p = tf.to_path(x_trig, theta, path, SD)
    assert torch.allclose(x_p, path.add_noise(x0, z, t_p), atol=1e-10)
    a, s = path.alpha_sigma(t_p)
    assert torch.allclose(s / a, torch.tan(theta), rtol=1e-9)
    assert torch.allclose(tf.angle_of_t(path, t_p), theta, atol=1e-9)
    # F read off x0 is TrigFlow's own prediction: sd x0 = cos x - sin sd F
    F = tf.F_from_x0(x_trig, theta, x0, SD)
    assert torch.allclose(trig.to_x0_eps(x_trig, F, trig.t_from_angle(theta))[0], SD * x0, atol=1e-10)
    # a TrigFlowPath network of another sd_p sees its own state, sd_p / sd times this one
    x_t2, t_t2 = tf.to_path(x_trig, theta, TrigFlowPath(1.0), SD)
    assert torch.allclose(x_t2, x_trig / SD) and torch.allclose(t_t2, trig.t_from_angle(theta))


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_consistency_function_is_identity_at_theta_zero(family):
    """f = cos x - sin sd F (F read off the student's x0) is the identity as theta -> 0, whatever
    the network outputs: the boundary condition holds by construction."""
    tiny = make_tiny(family)
    x = torch.randn(2, *tiny.latent_shape)
    for th, tol in ((1e-4, 1e-3), (1e-6, 1e-5)):
        theta = torch.full((2,), th)
        F = tf.net_F(tiny.denoiser, x, theta, tiny.cond(2), SD, tiny.path)
        f = torch.cos(theta).view(-1, 1, 1, 1) * x - torch.sin(theta).view(-1, 1, 1, 1) * SD * F
        assert (f - x).abs().max() < tol
    # and far from it the network matters
    theta = torch.full((2,), 1.0)
    F = tf.net_F(tiny.denoiser, x, theta, tiny.cond(2), SD, tiny.path)
    f = torch.cos(theta).view(-1, 1, 1, 1) * x - torch.sin(theta).view(-1, 1, 1, 1) * SD * F
    assert (f - x).abs().max() > 0.1


def test_sampling_angles_map_to_path_times():
    vp, flow = _paths()["vp_eps"], _paths()["flow"]
    assert tf.max_angle(vp) < math.pi / 2 - 0.01  # SD-like schedules do not reach pure noise
    assert tf.max_angle(flow) == pytest.approx(math.pi / 2, abs=2e-4)
    for path in (vp, flow):
        t = tf.times_from_angles([math.pi / 2, 1.3, 0.0], path)
        assert t[0] == 1.0 and t[-1] == 0.0
        a, s = path.alpha_sigma(torch.tensor(t[1], dtype=torch.float64))
        assert float(s / a) == pytest.approx(math.tan(1.3), rel=1e-6)  # the published map, any sd
    tiny = make_tiny("dit")
    obj = SCMObjective(SCMParams(), tiny.denoiser, copy_denoiser(tiny.denoiser))
    assert obj.sampling["renoise"] == "fresh" and len(obj.sampling["times"]) == 3
    assert obj.sampling["angles"] == [math.pi / 2, 1.3, 0.0]
    assert [len(v) for v in obj.sampling["times_by_steps"].values()] == [2, 3, 5]
    noise = torch.randn(2, *tiny.latent_shape)
    for times in obj.sampling["times_by_steps"].values():
        x = sample(
            obj.nets["student"], noise, tiny.cond(2), times, renoise="fresh", generator=torch.Generator().manual_seed(0)
        )
        assert x.shape == noise.shape and torch.isfinite(x).all()


def test_max_angle_caps_training_and_sampler_start():
    tiny = make_tiny("dit")
    obj = SCMObjective(
        SCMParams(sigma_data=1.0, max_angle=1.5, p_mean=3.0), tiny.denoiser, copy_denoiser(tiny.denoiser)
    )
    assert obj.theta_max == 1.5
    assert obj.sample_angles(SampleDraws(range(4000), 0, 0, "test")).max() <= 1.5
    assert obj.sampling["angles"][0] == 1.5
    t0 = obj.sampling["times"][0]
    a, s = tiny.path.alpha_sigma(torch.tensor(t0, dtype=torch.float64))
    assert 0.9 < t0 < 1.0 and float(s / a) == pytest.approx(math.tan(1.5), rel=1e-6)
    tb = TBCMObjective(TBCMParams(sigma_data=1.0, max_angle=1.5), tiny.denoiser, copy_denoiser(tiny.denoiser))
    r = tb.route(0)
    assert r[0] == 1.5 and r.max() == 1.5
    with pytest.raises(ValueError, match="objective.intermediate_angle"):
        SCMObjective(SCMParams(max_angle=1.2, intermediate_angle=1.3), tiny.denoiser, copy_denoiser(tiny.denoiser))


def test_output_gain_of_each_prediction_type():
    """|dF/d output|, read off the paths generically: 1/cos for eps (ill-conditioned towards noise),
    bounded for v and flow; it is what `precondition` divides out."""
    th = torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    c, s = torch.cos(th), torch.sin(th)
    assert torch.allclose(tf.F_output_gain(vp_path("epsilon"), th, SD, x), 1 / c, rtol=1e-6)
    assert torch.allclose(tf.F_output_gain(vp_path("v_prediction"), th, SD, x), torch.ones_like(th), rtol=1e-6)
    assert torch.allclose(tf.F_output_gain(FlowPath(), th, SD, x), 1 / (c + s), rtol=1e-9)
    tiny = make_tiny("dit")
    batch = {"cond": tiny.cond(2), "x0": torch.randn(2, *tiny.latent_shape), "shape": (2, *tiny.latent_shape)}
    losses = []
    for pre in (False, True):
        torch.manual_seed(0)
        obj = SCMObjective(
            SCMParams(precondition=pre, adaptive_weighting=False), tiny.denoiser, copy_denoiser(tiny.denoiser)
        )
        losses.append(float(obj.loss("generator", batch, 10)[0]))
    assert losses[1] < losses[0]  # eps student: every point scaled by cos^2 < 1


def _fd_check(net, path, cond, theta, x, dxdt, h=1e-6, fourth_order=False):
    """JVP (F, JF) against a central difference of F along (cos sin dxdt, cos sin)."""
    F, JF = tf.student_F_jvp(net, x, theta, dxdt, cond, SD, path)
    cs = torch.cos(theta) * torch.sin(theta)

    def central(hh):
        fp = tf.net_F(net, x + hh * cs.view(-1, 1, 1, 1) * dxdt, theta + hh * cs, cond, SD, path)
        fm = tf.net_F(net, x - hh * cs.view(-1, 1, 1, 1) * dxdt, theta - hh * cs, cond, SD, path)
        return (fp - fm) / (2 * hh)

    with torch.no_grad():
        fd = (4 * central(h / 2) - central(h)) / 3 if fourth_order else central(h)
        F_direct = tf.net_F(net, x, theta, cond, SD, path)
    assert torch.allclose(F, F_direct, atol=1e-10)
    rel = float((JF - fd).norm() / fd.norm())
    assert rel < 1e-3, rel
    return F, JF


@pytest.mark.parametrize(
    "family,prediction", [("dit", "epsilon"), ("sd15", "v_prediction"), ("sd3", "epsilon"), ("flux", "epsilon")]
)
def test_jvp_tangent_matches_finite_difference_float64(family, prediction):
    tiny = make_tiny(family, prediction=prediction, dtype=torch.float64)
    theta = torch.tensor([0.3, 1.2], dtype=torch.float64)
    x = torch.randn(2, *tiny.latent_shape, dtype=torch.float64) * 0.7
    dxdt = torch.randn_like(x)
    # diffusers computes the sinusoidal timestep embedding in float32 whatever the model dtype,
    # so a tiny step drowns in rounding; a fourth-order difference at h = 1e-3 keeps both the
    # truncation and the rounding error far below the 1e-3 tolerance
    _fd_check(tiny.denoiser, tiny.path, tiny.cond(2), theta, x, dxdt, h=1e-3, fourth_order=True)


def test_jvp_and_tangent_on_exact_gmm_teacher():
    """With the exact Gaussian-mixture denoiser the raw tangent g (r = 1) is cos(theta) times the
    finite-difference derivative of the consistency function along the teacher's own ODE."""
    path = _paths()["vp_eps"]
    means = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    teacher = gmm_denoiser(path, means, 0.2)
    theta = torch.tensor([0.5, 1.1], dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    dxdt = tf.teacher_velocity(teacher, x, theta, None, SD, path)
    F, JF = _fd_check(teacher, path, None, theta, x, dxdt)
    g = scm_tangent(F, JF, dxdt, x, theta, 1.0, SD, norm_c=None)

    def f(xx, th):  # consistency function: cos x - sin sd F = sd times the network's x0
        return SD * teacher(*tf.to_path(xx, th, path, SD), None)

    h = 1e-6
    with torch.no_grad():
        dfd = (f(x + h * dxdt, theta + h) - f(x - h * dxdt, theta - h)) / (2 * h)
    expected = torch.cos(theta).view(-1, 1, 1, 1) * dfd
    assert float((g - expected).norm() / expected.norm()) < 1e-3
    # the teacher is its own consistency function along its ODE only up to its curvature: the
    # total derivative is not zero, so the test above is not trivially satisfied
    assert float(expected.norm()) > 1e-3
    gn = scm_tangent(F, JF, dxdt, x, theta, 1.0, SD, norm_c=0.1)
    assert torch.allclose(gn.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1))


@pytest.mark.parametrize("path_name", ["vp_eps", "flow"])
def test_tbcm_trajectory_is_the_teachers_ddim_path(path_name):
    """TBCM's stored points are the teacher's exact DDIM trajectory: TrigFlow-DDIM steps equal the
    teacher path's own DDIM sampler on the route's equal-SNR times."""
    torch.manual_seed(0)  # the route is stratified at random: a fixed draw keeps the test deterministic
    path = _paths()[path_name]
    means = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    teacher = gmm_denoiser(path, means, 0.1)
    obj = TBCMObjective(TBCMParams(route_steps=6), teacher, copy_denoiser(teacher))
    route = obj.route(0).to(torch.float64)
    assert route[0] == obj.theta_max and torch.all(route[1:] < route[:-1])
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    xs, ths, vs, x_end = obj.trajectory(noise, None, route)
    assert xs.shape[0] == route.numel() - 1 >= 4 and torch.equal(ths, route[1:])
    times = [float(v) for v in tf.t_of_angle(path, route)] + [0.0]
    start = tf.to_path(noise * SD, route[:1].expand(3), path, SD)[0]
    points = []
    ref = sample(
        teacher, noise, None, times, renoise="ddim", start=start, callback=lambda i, t, x, x0: points.append(x)
    )
    assert torch.allclose(x_end, SD * ref, atol=1e-8)  # TrigFlow units: sd * latent
    for i in range(1, len(points)):
        x_p = tf.to_path(xs[i - 1], route[i].expand(3), path, SD)[0]
        # the eps teacher's x0 divides by alpha near the top angle, which amplifies float64
        # round-off to ~1e-6 on some draws
        assert torch.allclose(x_p, points[i], atol=1e-6)
    # the stored velocity is the teacher's dx/dtheta at the stored point
    v = tf.teacher_velocity(teacher, xs[2], route[3].expand(3), None, SD, path)
    assert torch.allclose(v, vs[2], atol=1e-10)


def test_tbcm_route_is_stratified_in_reference():
    ref = tbcm_route(16, 2.5)
    assert ref.numel() == 16 and ref[0] == pytest.approx(math.pi / 2) and torch.all(ref[1:] < ref[:-1])
    tiny = make_tiny("sd3")
    obj = TBCMObjective(TBCMParams(), tiny.denoiser, copy_denoiser(tiny.denoiser))
    r = obj.route(0)
    assert torch.all((r[1:] <= ref[:-1] + 1e-12) & (r[1:] >= ref[1:] - 1e-12))


def _count_calls(module):
    calls = []

    def hook(m, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        calls.append(x.shape[0])

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("method", ["scm", "tbcm"])
@pytest.mark.parametrize(
    "family,prediction", [("dit", "epsilon"), ("sdxl", "v_prediction"), ("pixart", "epsilon"), ("sd3", "epsilon")]
)
def test_one_step_changes_only_student(method, family, prediction):
    tiny = make_tiny(family, prediction=prediction)
    teacher = tiny.denoiser
    student = copy_denoiser(teacher)
    if method == "scm":
        obj = SCMObjective(SCMParams(guidance=2.0, tangent_warmup=10), teacher, student)
    else:
        obj = TBCMObjective(TBCMParams(guidance=2.0, route_steps=4, tangent_warmup=10), teacher, student)
    assert obj.groups == {"generator": ["student", "logvar"]}
    teacher0, student0, logvar0 = _state(teacher), _state(student), _state(obj.nets["logvar"])
    calls = _count_calls(teacher.backbone)
    b = 2
    g = torch.Generator().manual_seed(3)
    batch = {"cond": tiny.cond(b, g), "shape": (b, *tiny.latent_shape)}
    if method == "scm":
        batch["x0"] = torch.randn(b, *tiny.latent_shape, generator=g) * SD
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=0.01)
    loss, logs = obj.loss("generator", batch, 5)
    assert logs["r"] == 0.5 and torch.isfinite(loss)
    # CFG teacher: one 2B pass per point (sCM) or per route point (TBCM); the JVP reuses them
    assert calls == ([2 * b] if method == "scm" else [2 * b] * 4)
    if method == "tbcm":
        assert logs["points"] == 3 * b
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(v, teacher0[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student0[k]) for k, v in student.state_dict().items())
    assert any(not torch.equal(v, logvar0[k]) for k, v in obj.nets["logvar"].state_dict().items())


def test_registry_build_and_errors_name_the_key():
    from fewstep.objectives.registry import BuildContext, build_objective

    tiny = make_tiny("dit")
    ctx = BuildContext(latent_shape=tiny.latent_shape, num_classes=10, has_real_data=False)
    with pytest.raises(ValueError, match="tbcm"):
        build_objective("scm", {}, tiny.denoiser, ctx)
    obj = build_objective("tbcm", {"guidance": 2.0}, tiny.denoiser, ctx)
    assert isinstance(obj, TBCMObjective) and obj.sampling["angles"] == [math.pi / 2, 1.0, 0.0]
    ctx.has_real_data = True
    obj = build_objective("scm", {"adaptive_weighting": False}, tiny.denoiser, ctx)
    assert isinstance(obj, SCMObjective) and "logvar" not in obj.nets
    with pytest.raises(ValueError, match="objective.sampling_angles"):
        build_objective("tbcm", {"num_steps": 2, "sampling_angles": [1.5]}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.intermediate_angle"):
        build_objective("tbcm", {"intermediate_angle": 2.0}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.route_steps"):
        build_objective("tbcm", {"route_steps": 1}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="x0"):
        obj.loss("generator", {"cond": tiny.cond(2), "shape": (2, *tiny.latent_shape)}, 0)


def test_with_prediction_rereads_a_vp_path_only():
    from fewstep.paths import with_prediction

    eps = vp_path("epsilon")
    v = with_prediction(eps, "v_prediction")
    assert v.prediction_type == "v_prediction" and eps.prediction_type == "epsilon"
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(v.alpha_sigma(t), eps.alpha_sigma(t)))
    assert with_prediction(eps, None) is eps and with_prediction(eps, "epsilon") is eps
    with pytest.raises(ValueError, match="only a VP"):
        with_prediction(FlowPath(1000), "v_prediction")


@pytest.mark.parametrize("method", ["scm", "tbcm"])
def test_v_student_conversion_phase_fits_the_guided_teacher(method):
    """An eps VP teacher with a v-read student: the conversion phase regresses the student's F on
    the guided teacher's F (no extra teacher call), moves only the student, and lowers its error;
    the sCM loss takes over after it, with the tangent warm-up counted from there."""
    torch.manual_seed(0)
    tiny = make_tiny("dit", prediction="epsilon")
    teacher, student = tiny.denoiser, copy_denoiser(tiny.denoiser)
    # max_angle: a random eps network's x0 near pure noise is its error times 1/alpha (~156), which
    # would swamp the regression this test measures
    common = dict(
        guidance=2.0,
        tangent_warmup=10,
        student_prediction="v_prediction",
        convert_steps=40,
        max_angle=1.2,
        intermediate_angle=0.8,
    )
    if method == "scm":
        obj = SCMObjective(SCMParams(**common), teacher, student)
    else:
        obj = TBCMObjective(TBCMParams(route_steps=4, **common), teacher, student)
    assert student.path.prediction_type == "v_prediction" and teacher.path.prediction_type == "epsilon"
    assert obj.sampling["prediction_type"] == "v_prediction"
    teacher0 = _state(teacher)
    g = torch.Generator().manual_seed(1)
    b = 4
    batch = {
        "cond": tiny.cond(b, g),
        "shape": (b, *tiny.latent_shape),
        "x0": torch.randn(b, *tiny.latent_shape, generator=g) * SD,
    }
    opt = torch.optim.Adam(trainable_parameters(obj, "generator"), lr=1e-2)
    losses = []
    for step in range(40):
        torch.manual_seed(100 + step % 4)  # the same four draws of points, revisited
        loss, logs = obj.loss("generator", batch, step)
        assert logs.get("convert") == 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)
    assert all(torch.equal(v, teacher0[k]) for k, v in teacher.state_dict().items())
    loss, logs = obj.loss("generator", batch, 45)
    assert "convert" not in logs and logs["r"] == 0.5 and torch.isfinite(loss)


def test_student_prediction_errors_name_the_key():
    from fewstep.objectives.registry import BuildContext, build_objective

    tiny = make_tiny("dit")
    ctx = BuildContext(latent_shape=tiny.latent_shape, num_classes=10, has_real_data=False)
    with pytest.raises(ValueError, match="objective.convert_steps"):
        build_objective("tbcm", {"student_prediction": "v_prediction"}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.student_prediction"):
        build_objective("tbcm", {"student_prediction": "flow", "convert_steps": 5}, tiny.denoiser, ctx)
    flow = make_tiny("sd3")
    ctx_f = BuildContext(latent_shape=flow.latent_shape, num_classes=None, has_real_data=False)
    with pytest.raises(ValueError, match="VP"):
        build_objective("tbcm", {"student_prediction": "v_prediction", "convert_steps": 5}, flow.denoiser, ctx_f)


def test_secant_tangent_is_the_central_difference_and_tends_to_the_jvp():
    """tangent_delta: the central secant over [theta - d, theta + d] along x +- d dxdt (times
    cos sin), one-sided at the top angle, and it tends to the exact JVP as d shrinks."""
    tiny = make_tiny("dit", prediction="epsilon", dtype=torch.float64)
    d, path, cond = tiny.denoiser, tiny.path, tiny.cond(2)
    theta = torch.tensor([0.4, 1.1], dtype=torch.float64)
    x = torch.randn(2, *tiny.latent_shape, dtype=torch.float64) * 0.7
    dxdt = torch.randn_like(x)
    F, J = tf.student_F_jvp(d, x, theta, dxdt, cond, SD, path)
    errs = []
    for delta in (2e-3, 5e-4):  # a random tiny DiT varies over ~6 timestep indices (0.006 in t)
        F2, S = tf.student_F_jvp(d, x, theta, dxdt, cond, SD, path, delta=delta)
        assert torch.allclose(F2, F, atol=1e-10)
        errs.append(float((S - J).norm() / J.norm()))
    assert errs[1] < errs[0] / 8 and errs[1] < 0.02, errs  # second order in delta (16x for 4x smaller)
    # by hand at delta = 0.1, and one-sided where theta + delta passes theta_max
    delta, top = 0.1, 1.15
    _, S = tf.student_F_jvp(d, x, theta, dxdt, cond, SD, path, delta=delta, theta_max=top)
    up = torch.tensor([delta, top - 1.1], dtype=torch.float64)
    b = lambda v: v[:, None, None, None]  # noqa: E731
    f_up = tf.net_F(d, x + b(up) * dxdt, theta + up, cond, SD, path)
    f_dn = tf.net_F(d, x - delta * dxdt, theta - delta, cond, SD, path)
    want = b(torch.cos(theta) * torch.sin(theta) / (up + delta)) * (f_up - f_dn)
    assert torch.allclose(S, want, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# The published TrigFlow convention (SANA-Sprint / TBCM), written out independently of fewstep:
# the TrigFlow state is sigma_d times the teacher's latent, x = sd (cos(theta) x0 + sin(theta) z),
# so a flow teacher is queried at flow time s = sin / (sin + cos), for every sigma_d; the proposal
# draws tau ~ N(P_mean, P_std^2) and theta = atan(e^tau / sd); TBCM's route is the shifted flow
# sigma schedule mapped by atan(s / (1 - s)).


def _ref_flow_time(theta):
    return torch.sin(theta) / (torch.sin(theta) + torch.cos(theta))


def _ref_tbcm_sigmas(steps=16, shift=2.5, n=1000):
    """The shifted flow sigmas of TBCM's reference route (numpy, as the authors compute them)."""
    import numpy as np

    ts = np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n
    sig = shift * ts / (1 + (shift - 1) * ts)
    grid = np.linspace(sig[0] * n, sig[-1] * n, steps) / n
    return torch.from_numpy(shift * grid / (1 + (shift - 1) * grid)).double()


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_trigflow_convention_matches_sana_sprint_and_tbcm(sd):
    flow = FlowPath(1000, shift=3.0)
    vp = vp_path("epsilon")
    theta = torch.tensor([0.05, 0.4, 1.0, 1.3, 1.5], dtype=torch.float64)
    # angle -> teacher time: flow time sin / (sin + cos); a VP teacher at sigma / alpha = tan(theta)
    assert torch.allclose(tf.t_of_angle(flow, theta), _ref_flow_time(theta), atol=1e-12)
    assert torch.allclose(tf.angle_of_t(flow, _ref_flow_time(theta)), theta, atol=1e-9)
    t_vp = tf.t_of_angle(vp, theta.clamp(max=tf.max_angle(vp)))
    a, s = vp.alpha_sigma(t_vp)
    assert torch.allclose(s / a, torch.tan(theta.clamp(max=tf.max_angle(vp))), rtol=1e-6)
    # the state: x = sd (cos x0 + sin z) is the teacher's own point (1 - s) x0 + s z, up to scale
    x0, z = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    c, si = torch.cos(theta).view(-1, 1, 1, 1), torch.sin(theta).view(-1, 1, 1, 1)
    xp, tp = tf.to_path(sd * (c * x0 + si * z), theta, flow, sd)
    sref = _ref_flow_time(theta).view(-1, 1, 1, 1)
    assert torch.allclose(xp, (1 - sref) * x0 + sref * z, atol=1e-10)
    # ... and the TrigFlow x0 is sd times the teacher's: F = (cos x - sd x0) / (sd sin)
    F = tf.F_from_x0(sd * (c * x0 + si * z), theta, x0, sd)
    assert torch.allclose(F, (c * (c * x0 + si * z) - x0) / si, atol=1e-9)
    # TBCM's route: its angles land on the reference flow sigmas
    route = tbcm_route(16, 2.5)
    assert torch.allclose(tf.t_of_angle(flow, route[1:]), _ref_tbcm_sigmas()[1:], atol=1e-6)
    # the proposal: theta = atan(e^tau / sd) puts the teacher at s / (1 - s) = e^tau / sd
    teacher = gmm_denoiser(flow, torch.zeros(1, 2, 3, 3))
    obj = SCMObjective(SCMParams(sigma_data=sd, p_mean=-0.8, p_std=1.6), teacher, copy_denoiser(teacher))
    th = obj.sample_angles(SampleDraws(range(64), 3, 0, "test")).double()
    tau = (-0.8 + 1.6 * SampleDraws(range(64), 3, 0, "test").normal()).double()
    ratio = torch.exp(tau) / sd
    keep = th < obj.theta_max - 1e-6  # draws above the cap are clamped
    assert torch.allclose(tf.t_of_angle(flow, th)[keep], (ratio / (1 + ratio))[keep], rtol=1e-5)
    # the sampler: [pi/2, 1.3, 0] at the published flow times
    times = tf.times_from_angles([math.pi / 2, 1.3, 0.0], flow)
    assert times[1] == pytest.approx(float(_ref_flow_time(torch.tensor(1.3, dtype=torch.float64))), abs=1e-9)


def test_sd3_preset_samples_at_sana_sprint_times():
    """configs/sd3/scm_2step.yaml (sigma_d 0.5) on SD3's flow scheduler samples at SANA-Sprint's flow
    times for the same angles [pi/2, 1.3]: 1 and sin(1.3) / (sin(1.3) + cos(1.3)) = 0.783."""
    from pathlib import Path

    from fewstep.config import load_yaml
    from fewstep.objectives.registry import make_params
    from fewstep.paths import path_from_scheduler_config

    raw = load_yaml(Path(__file__).resolve().parents[1] / "configs/sd3/scm_2step.yaml")["objective"]
    params = make_params("scm", {k: v for k, v in raw.items() if k != "name"})
    path = path_from_scheduler_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    )
    teacher = gmm_denoiser(path, torch.zeros(1, 2, 3, 3))
    obj = SCMObjective(params, teacher, copy_denoiser(teacher))
    angles = torch.tensor(obj.sampling["angles"][:-1], dtype=torch.float64)
    want = [1.0] + _ref_flow_time(angles[1:]).tolist() + [0.0]
    assert params.sigma_data == 0.5
    assert obj.sampling["times"] == pytest.approx(want, abs=1e-7)
    assert obj.sampling["times"][1] == pytest.approx(0.7827, abs=1e-4)
