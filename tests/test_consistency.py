"""LCM-style consistency distillation: boundary condition, LCMScheduler agreement, the LoRA
variant, and one training step on tiny models of several families."""

from __future__ import annotations

import pytest
import torch

from fewstep.denoiser import copy_denoiser
from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.consistency import (
    LCMObjective,
    LCMParams,
    adapters_disabled,
    add_guidance_embedding,
    boundary_scalings,
    guidance_scale_embedding,
    has_adapters,
    lcm_timesteps,
)
from fewstep.samplers import sample
from tests.tiny import make_tiny


def _objective(tiny, **kw):
    p = LCMParams(**{"guidance_min": 1.5, "guidance_max": 4.0, **kw})
    student = copy_denoiser(tiny.denoiser)
    return LCMObjective(p, tiny.denoiser, student, copy_denoiser(tiny.denoiser, trainable=False))


def _batch(tiny, b=3, real=True):
    g = torch.Generator().manual_seed(1)
    batch = {"cond": tiny.cond(b, g), "shape": (b, *tiny.latent_shape)}
    if real:
        batch["x0"] = torch.randn(b, *tiny.latent_shape, generator=g) * 0.5
    return batch


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_lcm_timesteps_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    for n, expected in ((1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259])):
        sch.set_timesteps(n)
        assert sch.timesteps.tolist() == expected == lcm_timesteps(n)


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_student_is_identity_at_boundary(family):
    tiny = make_tiny(family)
    obj = _objective(tiny)
    x = torch.randn(2, *tiny.latent_shape)
    t0 = torch.zeros(2)
    f = obj.consistency_fn(obj.nets["student"], x, t0, tiny.cond(2))
    assert torch.equal(f, x)
    # away from the boundary the network's x0 is used (c_out ~ 1)
    f1 = obj.consistency_fn(obj.nets["student"], x, torch.full((2,), 0.5), tiny.cond(2))
    assert (f1 - x).abs().max() > 1e-2


def test_boundary_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    tiny = make_tiny("dit")
    sch = LCMScheduler()
    for idx in (0, 19, 259, 999):
        t = torch.tensor([(idx + 1) / 1000.0])
        c_skip, c_out = boundary_scalings(tiny.path, t)
        ref_skip, ref_out = sch.get_scalings_for_boundary_condition_discrete(idx)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-5)
        assert float(c_out) == pytest.approx(ref_out, rel=1e-5)


def test_generic_sampler_reproduces_lcm_scheduler():
    """The student sampled by `sample(..., renoise='fresh')` on the objective's times equals an
    LCMScheduler loop on its native output with the same noise (what an exported pipeline does)."""
    from diffusers import LCMScheduler

    tiny = make_tiny("dit", prediction="v_prediction")
    obj = _objective(tiny)
    student = obj.nets["student"]
    assert obj.sampling["renoise"] == "fresh"
    assert obj.sampling["times"] == [1.0, 0.76, 0.5, 0.26, 0.0]
    cond = tiny.cond(2)
    noise = torch.randn(2, *tiny.latent_shape)
    ours = sample(
        student, noise, cond, obj.sampling["times"], renoise="fresh", generator=torch.Generator().manual_seed(5)
    )

    sch = LCMScheduler(
        prediction_type="v_prediction",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
    )
    sch.set_timesteps(4)
    gen = torch.Generator().manual_seed(5)
    x = noise.clone()
    with torch.no_grad():
        for ts in sch.timesteps:
            out = student(x, (ts.item() + 1) / 1000.0, cond, output="native")
            x, denoised = sch.step(out, ts, x, generator=gen, return_dict=False)
    assert torch.allclose(ours, denoised, atol=2e-4), (ours - denoised).abs().max()


def test_guidance_embedding_matches_pipeline_and_reaches_unet():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.5, 7.5])
    ours = guidance_scale_embedding(w, 16)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=16)
    assert torch.allclose(ours, ref, atol=1e-6)

    tiny = make_tiny("sd15")
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        add_guidance_embedding(copy_denoiser(make_tiny("dit").denoiser), 8)
    obj = LCMObjective(
        LCMParams(guidance_min=2.0, guidance_max=8.0),
        tiny.denoiser,
        add_guidance_embedding(copy_denoiser(tiny.denoiser), 8),
        add_guidance_embedding(copy_denoiser(tiny.denoiser, False), 8),
    )
    assert obj.w_dim == 8 and obj.sampling["guidance_embedding"]["dim"] == 8
    student = obj.nets["student"]
    x, cond = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    base = student(x, 0.5, cond)
    assert torch.equal(base, tiny.denoiser(x, 0.5, cond))  # zero-initialised: starts as the teacher
    # after a training step the w-embedding changes the student's output with w
    loss, _ = obj.loss("generator", _batch(tiny), 1)
    loss.backward()
    assert student.backbone.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        student.backbone.time_embedding.cond_proj.weight.add_(0.1)
    a = student(x, 0.5, obj.student_cond(cond, torch.full((2,), 2.0)))
    b = student(x, 0.5, obj.student_cond(cond, torch.full((2,), 8.0)))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize(
    "family,prediction,real",
    [
        ("dit", "epsilon", True),
        ("sdxl", "v_prediction", True),
        ("pixart", "epsilon", False),
        ("sd3", "flow", True),
        ("flux", "flow", False),
    ],
)
def test_one_step_changes_only_student_and_ema_target(family, prediction, real):
    tiny = make_tiny(family, prediction=prediction if prediction != "flow" else "epsilon")
    obj = _objective(tiny)
    teacher0, target0 = _state(obj.nets["teacher"]), _state(obj.nets["target"])
    student0 = _state(obj.nets["student"])
    assert obj.groups == {"generator": ["student"]} and obj.phases(0) == ["generator"]
    params = trainable_parameters(obj, "generator")
    opt = torch.optim.SGD(params, lr=0.1)
    batch = _batch(tiny, real=real)
    if not real:
        obj.data_source = "teacher"
    loss, logs = obj.loss("generator", batch, 3)
    assert torch.isfinite(loss) and loss.item() > 0 and "loss" in logs
    loss.backward()
    assert all(p.grad is None for p in obj.nets["teacher"].parameters())
    assert all(p.grad is None for p in obj.nets["target"].parameters())
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(v, teacher0[k]) for k, v in obj.nets["teacher"].state_dict().items())
    assert all(torch.equal(v, target0[k]) for k, v in obj.nets["target"].state_dict().items())
    student1 = _state(obj.nets["student"])
    assert any(not torch.equal(student1[k], student0[k]) for k in student0)
    obj.after_step("generator", 3)
    mu = obj.p.ema_decay
    for k, v in obj.nets["target"].state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, mu * target0[k] + (1 - mu) * student1[k], atol=1e-7), k
    assert all(torch.equal(v, teacher0[k]) for k, v in obj.nets["teacher"].state_dict().items())


def test_lora_variant_teacher_is_student_with_adapters_off():
    from peft import LoraConfig

    tiny = make_tiny("sd15")
    student = copy_denoiser(tiny.denoiser, trainable=False)
    student.backbone.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():  # LoRA B starts at zero; give the adapters an effect to detect
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert has_adapters(student)
    obj = LCMObjective(LCMParams(guidance_min=2.0, guidance_max=4.0), tiny.denoiser, student)
    assert obj.lora and "target" not in obj.nets
    x, cond = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        with adapters_disabled(student):
            off = student(x, 0.6, cond, 3.0)
        on = student(x, 0.6, cond, 3.0)
    assert torch.allclose(off, tiny.denoiser(x, 0.6, cond, 3.0), atol=1e-6)
    assert (on - off).abs().max() > 1e-5  # the adapters do act when enabled
    lora = [n for n, p in student.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    base0 = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_" not in n}
    teacher0 = _state(tiny.denoiser)
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=0.1)
    loss, _ = obj.loss("generator", _batch(tiny), 1)
    loss.backward()
    opt.step()
    # the adapters-off teacher call left the adapters trainable and the base frozen
    assert [n for n, p in student.named_parameters() if p.requires_grad] == lora
    assert all(torch.equal(p, base0[n]) for n, p in student.named_parameters() if "lora_" not in n)
    assert all(torch.equal(v, teacher0[k]) for k, v in tiny.denoiser.state_dict().items())


def test_data_free_points_follow_teacher_trajectory():
    """Data-free training points are the teacher's own DDIM trajectory from noise."""
    tiny = make_tiny("dit")
    obj = _objective(tiny, data_source="teacher", trajectory_steps=4)
    noise = torch.randn(2, *tiny.latent_shape)
    cond = tiny.cond(2)
    t_end = torch.tensor([0.5, 0.5])
    g = torch.full((2,), 2.0)
    x = obj._teacher_trajectory(noise, t_end, cond, g)
    ref = sample(tiny.denoiser, noise, cond, [1.0, 0.875, 0.75, 0.625, 0.5], guidance=2.0, renoise="ddim")
    assert torch.allclose(x, ref, atol=1e-5)


def test_registry_build_and_param_errors_name_the_key():
    from fewstep.config import ConfigError
    from fewstep.objectives.registry import BuildContext, build_objective

    tiny = make_tiny("dit")
    ctx = BuildContext(latent_shape=tiny.latent_shape, num_classes=10, has_real_data=False)
    obj = build_objective("lcm", {"guidance_min": 2.0, "guidance_max": 3.0}, tiny.denoiser, ctx)
    assert isinstance(obj, LCMObjective) and obj.data_source == "teacher" and "target" in obj.nets
    assert obj.nets["target"] is not obj.nets["student"]
    assert all(not p.requires_grad for p in obj.nets["target"].parameters())
    with pytest.raises(ValueError, match="objective.sampling_timesteps"):
        build_objective("lcm", {"num_steps": 4, "sampling_timesteps": [999, 499]}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.loss_type"):
        build_objective("lcm", {"loss_type": "l1"}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.data_source"):
        build_objective("lcm", {"data_source": "real"}, tiny.denoiser, ctx)
    with pytest.raises(ValueError, match="objective.guidance_min"):
        build_objective("lcm", {"guidance_min": 5.0, "guidance_max": 2.0}, tiny.denoiser, ctx)
    with pytest.raises(ConfigError, match="objective.ema_rate"):
        build_objective("lcm", {"ema_rate": 0.9}, tiny.denoiser, ctx)


def test_registry_lora_student_selects_the_lora_variant():
    """With the entry point's LoRA factories (lora.student=true) the builder takes the LoRA
    variant: no EMA target, the teacher pass is the student with its adapters off, and a training
    step moves only adapter weights (the shared base stays the teacher's, bit for bit)."""
    from fewstep.config import LoraConfig
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.training.lora import make_factories

    tiny = make_tiny("dit")
    make_student, make_copy = make_factories(LoraConfig(student=True, rank=4, alpha=4.0), family="dit")
    ctx = BuildContext(
        latent_shape=tiny.latent_shape,
        num_classes=10,
        has_real_data=True,
        make_student=make_student,
        make_copy=make_copy,
    )
    obj = build_objective("lcm", {"guidance_min": 2.0, "guidance_max": 3.0}, tiny.denoiser, ctx)
    assert obj.lora and set(obj.nets) == {"student", "teacher"}
    teacher0 = _state(tiny.denoiser)
    params = trainable_parameters(obj, "generator")
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(2):  # the second step sees non-zero LoRA B, so the adapters act
        loss, _ = obj.loss("generator", _batch(tiny), step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    x, cond = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        with adapters_disabled(obj.nets["student"]):
            off = obj.nets["student"](x, 0.6, cond, 2.0)
        on = obj.nets["student"](x, 0.6, cond, 2.0)
    assert torch.equal(off, tiny.denoiser(x, 0.6, cond, 2.0))
    assert (on - off).abs().max() > 0
    assert all(torch.equal(v, teacher0[k]) for k, v in tiny.denoiser.state_dict().items())
