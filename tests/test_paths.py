"""Noise paths against diffusers' schedulers and closed forms: schedule tables, prediction-type
conversions, same-SNR moves between paths, flow sampling times, and the forward transition."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.paths import FlowPath, TrigFlowPath, VPPath, convert, path_from_scheduler_config

SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _paths():
    return [VPPath.from_config({**SD, "prediction_type": p}) for p in ("epsilon", "v_prediction", "sample")] + [
        FlowPath(1000, shift=3.0),
        TrigFlowPath(sigma_d=0.5),
    ]


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.prediction_type)
def test_native_output_roundtrip(path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = path.add_noise(x0, eps, t)
    out = path.from_x0_eps(x0, eps, t)
    x0_hat, eps_hat = path.to_x0_eps(x_t, out, t)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    # and the other way: an arbitrary output survives to (x0, eps) and back
    out2 = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(path.from_x0_eps(*path.to_x0_eps(x_t, out2, t), t), out2, atol=1e-8)


def test_prediction_types_follow_their_definitions():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    vp = VPPath.from_config({**SD, "prediction_type": "v_prediction"})
    a, s = vp.alpha_sigma(t)
    assert torch.allclose(vp.from_x0_eps(x0, eps, t), a[:, None] * eps - s[:, None] * x0)  # v = a eps - s x0
    fl = FlowPath(1000)
    assert torch.allclose(fl.add_noise(x0, eps, t), (1 - t[:, None]) * x0 + t[:, None] * eps)
    assert torch.allclose(fl.from_x0_eps(x0, eps, t), eps - x0)
    tr = TrigFlowPath(sigma_d=0.5)
    th = t * math.pi / 2
    xt = torch.cos(th)[:, None] * x0 + 0.5 * torch.sin(th)[:, None] * eps
    F = tr.from_x0_eps(x0, eps, t)  # sCM eq. 7: x0 = cos x_t - sin sigma_d F
    assert torch.allclose(torch.cos(th)[:, None] * xt - torch.sin(th)[:, None] * 0.5 * F, x0)


@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    ],
    ids=["linear", "scaled_linear", "cosine", "zero_snr"],
)
def test_vp_alphas_equal_diffusers_alphas_cumprod(config):
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = {"num_train_timesteps": 1000, **config}
    path = VPPath.from_config(cfg)
    ref = DDPMScheduler(**cfg).alphas_cumprod.double()
    assert torch.allclose(DDIMScheduler(**cfg).alphas_cumprod.double(), ref)
    idx = torch.tensor([0, 1, 10, 249, 499, 500, 749, 998, 999])
    t = (idx.double() + 1) / 1000
    a, s = path.alpha_sigma(t)
    assert torch.allclose(a**2, ref[idx], rtol=1e-6, atol=1e-9)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    assert torch.equal(path.timestep(t).round().long(), idx)  # index i sits at t = (i + 1) / N
    # continuous in between: sigma/alpha increases strictly with t
    tt = torch.linspace(0, 1, 4001, dtype=torch.float64)[1:]
    r = path.snr_ratio(tt)
    assert bool((r[1:] > r[:-1]).all())
    if config.get("rescale_betas_zero_snr"):
        assert a[-1].item() < 1e-6  # zero terminal SNR: t = 1 is pure noise


def test_trailing_ddim_timesteps_are_the_vp_sampling_times():
    from diffusers import DDIMScheduler

    path = VPPath.from_config(SD)
    for n in (1, 2, 4, 8, 50):
        s = DDIMScheduler(**SD, timestep_spacing="trailing")
        s.set_timesteps(n)
        ours = path.timestep(path.sampling_times(n)[:-1].float()).round().long()
        assert torch.equal(ours, s.timesteps), n
    assert path.sampling_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_sampling_times_match_flowmatch_euler(shift, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(n)
    ours = FlowPath(1000, shift=shift).sampling_times(n)
    assert ours.shape == s.sigmas.shape
    assert torch.allclose(ours.float(), s.sigmas.float(), atol=1e-6)


def test_same_snr_conversions():
    vp = VPPath.from_config(SD)
    fl = FlowPath(1000)
    tr1 = TrigFlowPath(sigma_d=1.0)
    tr5 = TrigFlowPath(sigma_d=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)  # DDPM 999, 749, 499, 249
    a, s = vp.alpha_sigma(t)
    for dst in (fl, tr1, tr5):
        x2, t2 = convert(x, t, vp, dst)
        a2, s2 = dst.alpha_sigma(t2)
        assert torch.allclose(s2 / a2, s / a, rtol=1e-6)  # same signal-to-noise ratio
        back, t_back = convert(x2, t2, dst, vp)
        assert torch.allclose(t_back, t, atol=1e-6) and torch.allclose(back, x, atol=1e-6)
    # closed forms: flow s = sigma / (alpha + sigma), x_FM = x_VP / (alpha + sigma)
    xf, tf = convert(x, t, vp, fl)
    assert torch.allclose(tf, s / (a + s), atol=1e-9)
    assert torch.allclose(xf, x / (a + s).view(-1, 1, 1, 1), atol=1e-9)
    # TrigFlow (sigma_d = 1): angle = atan2(sigma, alpha), x unchanged; SD's 999, 749, 499, 249
    xt, tt = convert(x, t, vp, tr1)
    angles = TrigFlowPath.angle(tt)
    assert torch.allclose(angles, torch.tensor([1.502, 1.331, 1.016, 0.606], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(xt, x, atol=1e-6)
    # flow <-> TrigFlow directly
    xft, tft = convert(xf, tf, fl, tr1)
    assert torch.allclose(tft, tt, atol=1e-6) and torch.allclose(xft, xt, atol=1e-6)


def test_forward_diffuse_has_the_path_marginal():
    """x0 ~ N(m, s0^2); x_t1 = add_noise; forward_diffuse to t2 must give N(a2 m, a2^2 s0^2 + sigma2^2)."""
    g = torch.Generator().manual_seed(0)
    n, m, s0 = 200_000, 1.5, 0.3
    for path in (VPPath.from_config(SD), FlowPath(1000), TrigFlowPath(0.5)):
        x0 = m + s0 * torch.randn(n, generator=g, dtype=torch.float64)
        t1, t2 = 0.3, 0.8
        x1 = path.add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), t1)
        x2 = path.forward_diffuse(x1, t1, t2, torch.randn(n, generator=g, dtype=torch.float64))
        a2, s2 = path.alpha_sigma(torch.tensor([t2], dtype=torch.float64))
        assert abs(x2.mean().item() - a2.item() * m) < 0.01, type(path).__name__
        assert abs(x2.var().item() - (a2.item() ** 2 * s0**2 + s2.item() ** 2)) < 0.01, type(path).__name__
        # and the transition keeps the pairing: x2 - (a2/a1) x1 is independent of x1
        a1, _ = path.alpha_sigma(torch.tensor([t1], dtype=torch.float64))
        resid = x2 - (a2 / a1).item() * x1
        assert abs(torch.corrcoef(torch.stack([resid, x1]))[0, 1].item()) < 0.01


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.prediction_type)
def test_bad_t_raises(path):
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        path.alpha_sigma(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]"):
        path.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), -0.1)


def test_path_from_scheduler_config():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    def config(s):  # as saved in a pipeline folder: with its class name
        return {**s.config, "_class_name": type(s).__name__}

    p = path_from_scheduler_config(config(DDIMScheduler(**SD, prediction_type="v_prediction")))
    assert isinstance(p, VPPath) and p.prediction_type == "v_prediction"
    assert isinstance(path_from_scheduler_config(config(LCMScheduler(**SD))), VPPath)
    f = path_from_scheduler_config(config(FlowMatchEulerDiscreteScheduler(shift=3.0)))
    assert isinstance(f, FlowPath) and f.shift == 3.0
    # a dynamic-shifting config uses the shift resolved for its resolution (pipeline_teacher.py fills it in)
    dyn = {**config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), "resolved_shift": 3.16}
    assert path_from_scheduler_config(dyn).shift == 3.16
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        path_from_scheduler_config({**SD, "prediction_type": "x0"})
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
        path_from_scheduler_config({**SD, "beta_schedule": "sigmoid"})
