"""The Denoiser adapter: exact x0 on an analytic teacher whatever its prediction type, CFG
algebra, every family at tiny size, and float32 out of low-precision backbones."""

from __future__ import annotations

import pytest
import torch

from fewstep.denoiser import apply_cfg, copy_denoiser
from fewstep.paths import FlowPath, TrigFlowPath, VPPath, convert
from fewstep.testing import gmm_denoiser
from tests.tiny import FAMILIES, FLOW_FAMILIES, VP_FAMILIES, make_tiny

SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=torch.float64).view(3, 2, 1, 1)
CLASSES = torch.tensor([0, 1, 1])
STD = 0.3


def posterior_mean(x_t: torch.Tensor, alpha: float, sigma: float, labels=None) -> torch.Tensor:
    """E[x0 | x_t] for the mixture of N(MEANS_k, STD^2 I), equal weights, written out here so the
    test does not rely on the teacher's own code: Bayes over components, then the Gaussian
    posterior mean within each."""
    d = x_t.reshape(x_t.shape[0], -1)
    mu = MEANS.reshape(3, -1)
    var = alpha**2 * STD**2 + sigma**2
    comp = torch.distributions.Normal(alpha * mu[None], var**0.5)  # (1, K, D)
    logp = comp.log_prob(d[:, None]).sum(-1)  # (B, K)
    if labels is not None:
        logp = logp.masked_fill(CLASSES[None] != labels[:, None], float("-inf"))
    r = logp.softmax(1)
    x0_k = mu[None] + (alpha * STD**2 / var) * (d[:, None] - alpha * mu[None])
    return (r[..., None] * x0_k).sum(1).view_as(x_t)


def _gmm(path):
    return gmm_denoiser(path, MEANS, std=STD, classes=CLASSES)


@pytest.mark.parametrize(
    "path",
    [
        VPPath.from_config({**SD, "prediction_type": "epsilon"}),
        VPPath.from_config({**SD, "prediction_type": "v_prediction"}),
        FlowPath(1000, shift=3.0),
        TrigFlowPath(0.5),
    ],
    ids=["epsilon", "v_prediction", "flow", "trigflow"],
)
def test_adapter_gives_the_exact_posterior_mean(path):
    d = _gmm(path)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 2, 1, 1, generator=g, dtype=torch.float64) * 1.5
    labels = torch.tensor([0, 1, 1, 0, 1])
    for t in (0.1, 0.4, 0.9):
        a, s = (v.item() for v in path.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        got = d(x_t, t, {"class_labels": labels})
        assert torch.allclose(got, posterior_mean(x_t, a, s, labels), atol=1e-8), (path.prediction_type, t)
        # and eps is the one implied by x0
        x0, eps = d(x_t, t, {"class_labels": labels}, output="x0_eps")
        assert torch.allclose(a * x0 + s * eps, x_t, atol=1e-8)


def test_same_point_on_different_paths_gives_the_same_x0():
    vp_eps, vp_v = VPPath.from_config(SD), VPPath.from_config({**SD, "prediction_type": "v_prediction"})
    fl = FlowPath(1000)
    x = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
    cond = {"class_labels": torch.tensor([0, 1, 0, 1])}
    ref = _gmm(vp_eps)(x, t, cond)
    assert torch.allclose(_gmm(vp_v)(x, t, cond), ref, atol=1e-8)
    x_f, t_f = convert(x, t, vp_eps, fl)
    assert torch.allclose(_gmm(fl)(x_f, t_f, cond), ref, atol=1e-6)


def test_cfg_algebra():
    d = _gmm(FlowPath(1000))
    x = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    cond = {"class_labels": torch.tensor([0, 1, 1])}
    null = {"class_labels": torch.full((3,), -1)}
    c = d(x, 0.6, cond, output="native")
    u = d(x, 0.6, null, output="native")
    # scale 1 (float or tensor) is the conditional output
    assert torch.equal(d(x, 0.6, cond, guidance=1.0, output="native"), c)
    assert torch.allclose(d(x, 0.6, cond, guidance=torch.ones(3), output="native"), c, atol=1e-12)
    # Imagen form u + w (c - u), and the x0 of the guided output
    w = 4.0
    guided = d(x, 0.6, cond, guidance=w, output="native")
    assert torch.allclose(guided, u + w * (c - u), atol=1e-10)
    assert torch.allclose(d(x, 0.6, cond, guidance=w), d.path.to_x0_eps(x, guided, 0.6)[0], atol=1e-10)
    # a per-sample scale equals per-sample scalar calls
    ws = torch.tensor([1.0, 2.5, 7.0], dtype=torch.float64)
    batched = d(x, 0.6, cond, guidance=ws)
    for i in range(3):
        one = d(x[i : i + 1], 0.6, {"class_labels": cond["class_labels"][i : i + 1]}, guidance=float(ws[i]))
        assert torch.allclose(batched[i : i + 1], one, atol=1e-10)
    # cond_uncond: both x0 from one pass
    xc, xu = d(x, 0.6, cond, output="cond_uncond")
    assert torch.allclose(xc, d(x, 0.6, cond), atol=1e-12) and torch.allclose(xu, d(x, 0.6, null), atol=1e-12)
    assert torch.allclose(apply_cfg(c, u, 0.0), u)
    with pytest.raises(ValueError, match="output must be"):
        d(x, 0.6, cond, output="eps")


def test_cfg_runs_cond_and_uncond_in_one_forward():
    tiny = make_tiny("sd15")
    calls = []
    tiny.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    tiny.denoiser(torch.randn(3, 4, 8, 8), 0.5, tiny.cond(3), guidance=5.0)
    assert calls == [6]


CASES = [(f, p) for f in VP_FAMILIES for p in ("epsilon", "v_prediction")] + [(f, "flow") for f in FLOW_FAMILIES]


@pytest.mark.parametrize("family,prediction", CASES)
def test_every_family_runs_through_the_adapter(family, prediction):
    tiny = make_tiny(family, prediction=prediction)
    d = tiny.denoiser
    x = torch.randn(2, *tiny.latent_shape)
    cond = tiny.cond(2)
    t = torch.tensor([0.9, 0.3])
    plain = d(x, t, cond)
    guided = d(x, t, cond, guidance=4.0)
    for out in (plain, guided):
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(plain, guided)  # guidance changes the output
    x0, eps = d(x, t, cond, output="x0_eps")
    assert torch.allclose(x0, plain) and torch.allclose(d.path.add_noise(x0, eps, t), x, atol=1e-4)
    if family != "flux":
        xc, xu = d(x, t, cond, output="cond_uncond")
        assert torch.allclose(xc, plain, atol=1e-4) and not torch.allclose(xc, xu)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_trainable_weight(family):
    """What objective tests rely on: a loss on x0 gives a non-zero gradient to every weight of the
    tiny backbone (the zero-initialised output layers were perturbed)."""
    tiny = make_tiny(family)
    student = copy_denoiser(tiny.denoiser, trainable=True)
    x = torch.randn(2, *tiny.latent_shape)
    student(x, 0.7, tiny.cond(2)).square().mean().backward()
    dead = [n for n, p in student.backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if family == "sd3":  # the last joint block discards its text stream, so its text query is unused
        dead = [n for n in dead if "add_q_proj" not in n]
    assert dead == []
    assert all(p.grad is None for p in tiny.backbone.parameters())  # the teacher is untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["dit", "sdxl", "flux"])
def test_low_precision_backbones_return_float32(family, dtype):
    ref = make_tiny(family)
    low = make_tiny(family, dtype=dtype)
    assert low.denoiser.dtype == dtype
    x = torch.randn(2, *ref.latent_shape)
    cond = ref.cond(2)
    g = 1.0 if family == "flux" else 3.0
    out = low.denoiser(x, 0.5, cond, guidance=g)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    exact = ref.denoiser(x, 0.5, cond, guidance=g)
    assert (out - exact).abs().max() < 0.05 * exact.abs().max() + 0.05
