"""Samplers against the stock DiTPipeline (DDIM and flow Euler), the analytic mixture, and their
own contracts (one step, seeded fresh noise, teacher-to-student hand-over)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from fewstep.denoiser import Denoiser
from fewstep.paths import FlowPath, VPPath
from fewstep.samplers import check_times, initial_noise, sample, sample_hybrid
from fewstep.testing import gmm_denoiser
from tests.tiny import ddim_scheduler, make_tiny, perturb_, tiny_vae, vp_path

diffusers.utils.logging.set_verbosity_error()


def _dit_1000(seed=0):
    """A tiny DiT with DiTPipeline's label table (1000 classes + the null class 1000, which the
    pipeline hard-codes for guidance)."""
    torch.manual_seed(seed)
    bb = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        norm_num_groups=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return perturb_(bb, seed=seed).eval()


def _run_dit_pipeline(bb, scheduler, labels, steps, guidance, seed):
    """Run the stock DiTPipeline; return its decoded images and the latents it decoded (read at
    the VAE's post_quant_conv input, i.e. latents / scaling_factor)."""
    vae = tiny_vae()
    pipe = diffusers.DiTPipeline(transformer=bb, vae=vae, scheduler=scheduler)
    seen = []
    h = vae.post_quant_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    images = pipe(
        class_labels=labels,
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    h.remove()
    return vae, torch.as_tensor(images), seen[0] * vae.config.scaling_factor


def _ours(vae, d, labels, times, guidance, seed):
    noise = initial_noise((len(labels), 4, 8, 8), torch.Generator().manual_seed(seed))
    lat = sample(d, noise, {"class_labels": torch.tensor(labels)}, times, guidance=guidance)
    with torch.no_grad():
        img = vae.decode(lat / vae.config.scaling_factor).sample
    return lat, (img / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("prediction,guidance", [("epsilon", 4.0), ("v_prediction", 1.0)])
def test_ddim_reproduces_dit_pipeline(prediction, guidance):
    bb = _dit_1000()
    labels = [3, 917, 1]
    vae, ref_img, ref_lat = _run_dit_pipeline(bb, ddim_scheduler(prediction), labels, 50, guidance, seed=7)
    d = Denoiser(bb, vp_path(prediction))
    lat, img = _ours(vae, d, labels, d.path.sampling_times(50), guidance, seed=7)
    scale = ref_lat.abs().max().item()
    assert scale > 0.5  # a real sample, not zeros
    # 1e-4 relative to the latents' range (a random eps-DiT under CFG 4 drifts to |x| ~ 70)
    assert (lat - ref_lat).abs().max() < 1e-4 * max(1.0, scale)
    assert (img - ref_img).abs().max() < 1e-4


def test_euler_reproduces_dit_pipeline_with_flow_match_scheduler():
    bb = _dit_1000(seed=1)
    shift = 3.0
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.scale_model_input = lambda sample, t: sample  # DiTPipeline calls it; flow schedulers have none
    labels = [5, 0]
    vae, ref_img, ref_lat = _run_dit_pipeline(bb, sched, labels, 20, 3.0, seed=2)
    d = Denoiser(bb, FlowPath(1000, shift=shift))
    lat, img = _ours(vae, d, labels, d.path.sampling_times(20), 3.0, seed=2)
    assert (lat - ref_lat).abs().max() < 1e-4
    assert (img - ref_img).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_one_step_sample_is_the_denoiser_at_t1(family):
    tiny = make_tiny(family)
    noise = torch.randn(2, *tiny.latent_shape)
    cond = tiny.cond(2)
    one = sample(tiny.denoiser, noise, cond, times=[1.0, 0.0], guidance=2.0)
    assert torch.equal(one, tiny.denoiser(noise, 1.0, cond, guidance=2.0))


def test_fresh_noise_sampling_is_seeded():
    tiny = make_tiny("dit")
    d, cond = tiny.denoiser, tiny.cond(2)
    noise = torch.randn(2, *tiny.latent_shape)
    times = [1.0, 0.75, 0.5, 0.25, 0.0]
    a = sample(d, noise, cond, times, renoise="fresh", generator=torch.Generator().manual_seed(5))
    b = sample(d, noise, cond, times, renoise="fresh", generator=torch.Generator().manual_seed(5))
    c = sample(d, noise, cond, times, renoise="fresh", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the same loop written out: x0 at t, fresh z from the generator, x_{t'} = alpha' x0 + sigma' z
    g = torch.Generator().manual_seed(5)
    x = noise
    with torch.no_grad():
        for t, t_next in zip(times, times[1:]):
            x0 = d(x, t, cond)
            if t_next == 0.0:
                break
            x = d.path.add_noise(x0, torch.randn(x.shape, generator=g), t_next)
    assert torch.allclose(a, x0, atol=1e-6)
    # deterministic DDIM differs from fresh noise after the first step
    assert not torch.allclose(a, sample(d, noise, cond, times))


@pytest.mark.parametrize(
    "path",
    [
        VPPath.from_config(
            {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        ),
        FlowPath(1000, shift=3.0),
    ],
    ids=["ddim-vp", "euler-flow"],
)
def test_100_step_teacher_sample_has_the_mixture_moments(path):
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]]).view(2, 2, 1, 1)
    std = 0.5
    d = gmm_denoiser(path, means, std=std)
    noise = initial_noise((4000, 2, 1, 1), torch.Generator().manual_seed(0))
    x = sample(d, noise, None, path.sampling_times(100)).view(-1, 2)
    mu = means.view(2, 2)
    mean = mu.mean(0)
    var = std**2 + mu.var(0, unbiased=False)  # within + between components
    assert torch.allclose(x.mean(0), mean, atol=0.1), x.mean(0)
    assert torch.allclose(x.var(0), var, rtol=0.1, atol=0.03), x.var(0)
    # both modes are hit about equally, each with the component's spread
    left = x[:, 0] < 0
    assert 0.4 < left.float().mean() < 0.6
    assert abs(x[left, 0].std().item() - std) < 0.1


def test_hybrid_hands_over_at_the_right_time():
    teacher, student = make_tiny("dit", seed=0), make_tiny("dit", seed=1)
    seen = {"teacher": [], "student": []}
    teacher.backbone.register_forward_pre_hook(
        lambda m, a, kw: seen["teacher"].append(kw["timestep"].unique().tolist()), with_kwargs=True
    )
    student.backbone.register_forward_pre_hook(
        lambda m, a, kw: seen["student"].append(kw["timestep"].unique().tolist()), with_kwargs=True
    )
    noise = torch.randn(2, 4, 8, 8)
    cond = teacher.cond(2)
    out = sample_hybrid(
        teacher.denoiser,
        student.denoiser,
        noise,
        cond,
        teacher_times=(1.0, 0.75),
        student_times=(0.75, 0.5, 0.0),
        guidance=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen["teacher"] == [[999.0]]  # one CFG pass (2B) at t = 1
    assert seen["student"] == [[749.0], [499.0]]
    # the same thing written out: teacher DDIM step 1 -> 0.75, then the student with fresh noise
    x = sample(teacher.denoiser, noise, cond, [1.0, 0.75], guidance=3.0)
    ref = sample(
        student.denoiser,
        noise,
        cond,
        [0.75, 0.5, 0.0],
        renoise="fresh",
        generator=torch.Generator().manual_seed(0),
        start=x,
    )
    assert torch.allclose(out, ref)
    with pytest.raises(ValueError, match="teacher_times must end where student_times begin"):
        sample_hybrid(teacher.denoiser, student.denoiser, noise, cond, (1.0, 0.75), (0.5, 0.0))


def test_bad_times_are_rejected():
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_times([1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="at least two"):
        check_times([1.0])
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        check_times([1.5, 0.0])
    with pytest.raises(ValueError, match="renoise"):
        tiny = make_tiny("dit")
        sample(tiny.denoiser, torch.randn(1, 4, 8, 8), tiny.cond(1), renoise="sde")
