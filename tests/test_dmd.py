"""DMD / DMD2 / Decoupled DMD: which weights each phase moves, the maths at its fixed points,
start-up errors, teacher-sample caches, the shared-base adapter switching (also under DDP), and
a short run on the exact Gaussian-mixture teacher."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.conditioning import Conditioner
from fewstep.denoiser import Denoiser, copy_denoiser
from fewstep.objectives.base import Objective, trainable_parameters
from fewstep.objectives.ddmd import ca_gradient
from fewstep.objectives.dmd import DMDObjective, DMDParams, build, context, params_from_dict
from fewstep.objectives.regression import channel_gaussian_kl, channel_stats
from fewstep.paths import FlowPath, VPPath
from fewstep.randomness import SampleDraws
from fewstep.samplers import sample
from fewstep.testing import gmm_denoiser
from fewstep.training.shared_base import RoleView
from tests.tiny import make_tiny


# ---- helpers --------------------------------------------------------------------------------
def _tiny(family: str, prediction: str = "epsilon"):
    kw = {"guidance_embeds": False} if family == "flux" else {}
    return make_tiny(family, prediction=prediction, seed=0, **kw)


def _batch(tiny, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "cond": tiny.cond(b, g),
        "x0": torch.randn((b, *tiny.latent_shape), generator=g),
        "shape": (b, *tiny.latent_shape),
    }


def _optimizers(obj, lr: float = 1e-3):
    return {g: torch.optim.AdamW(trainable_parameters(obj, g), lr=lr) for g in obj.groups}


def _step(obj, opts, phase, batch, step):
    """One update in the entry point's order: loss, backward, clip, step, zero all grads."""
    loss, logs = obj.loss(phase, batch, step)
    assert torch.isfinite(loss), (phase, logs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable_parameters(obj, phase), 10.0)
    opts[phase].step()
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    if hasattr(obj, "after_step"):
        obj.after_step(phase, step)
    return logs


def _snapshot(obj):
    return {r: [p.detach().clone() for p in n.parameters()] for r, n in obj.nets.items()}


def _changed(before, obj, role) -> bool:
    return any(not torch.equal(a, p.detach()) for a, p in zip(before[role], obj.nets[role].parameters()))


def _teacher_state(teacher: Denoiser):
    # (peft moves an adapted layer's weights under `base_layer`)
    return {
        k.replace(".base_layer", ""): v.clone() for k, v in teacher.backbone.state_dict().items() if "lora_" not in k
    }


# ---- one step of each variant on several backbone families ------------------------------------
LORA = SimpleNamespace(rank=2, alpha=2.0, target_modules=None, dropout=0.0)
CASES = [
    ("dit", "epsilon", "dmd2", dict()),
    ("sdxl", "v_prediction", "dmd2", dict(gan=True)),
    ("sd3", "flow", "dmd2", dict(gan=True, num_steps=2, student_times=[1.0, 0.5])),
    ("unet", "epsilon", "ddmd", dict()),
    ("pixart", "epsilon", "ddmd", dict(dm_kind="meanvar", meanvar_samples=4, meanvar_steps=2)),
    ("sd15", "epsilon", "dmd2", dict(num_steps=4, student_times=[1.0, 0.75, 0.5, 0.25])),
    ("dit", "v_prediction", "dmd", dict(regression_pairs=4, regression_steps=2)),
    ("sdxl", "epsilon", "dmd2", dict(shared_base=True, gan=True)),
    ("flux", "flow", "ddmd", dict(shared_base=True)),
    ("dit", "epsilon", "dmd2", dict(shared_base=True, num_steps=2, student_times=[1.0, 0.5], gan=True)),
]


@pytest.mark.parametrize(
    "family,prediction,variant,kw",
    CASES,
    ids=[f"{c[0]}-{c[2]}-{'-'.join(k for k in c[3] if k != 'student_times')}" for c in CASES],
)
def test_one_step_updates_only_its_networks(family, prediction, variant, kw, tmp_path):
    tiny = _tiny(family, prediction)
    teacher = tiny.denoiser
    ref_state = _teacher_state(teacher)
    x_probe = torch.randn(2, *tiny.latent_shape)
    cond_probe = tiny.cond(2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_out = teacher(x_probe, 0.6, cond_probe)
    params = DMDParams(variant=variant, guidance=3.0, cache_dir=str(tmp_path), **kw)
    obj = build(params, teacher, context(latent_shape=tiny.latent_shape, has_real_data=True, lora=LORA))
    assert isinstance(obj, Objective)
    opts = _optimizers(obj)
    if variant == "ddmd" and kw.get("dm_kind") == "meanvar":  # no DM term: no fake score, one group
        assert "fake" not in obj.nets and obj.groups == {"generator": ["student"]}
        assert all(obj.phases(s) == ["generator"] for s in range(10))
        before = _snapshot(obj)
        _step(obj, opts, "generator", _batch(tiny), 0)
        assert _changed(before, obj, "student")
        return
    step = params.fake_updates_per_generator - 1  # the first step with a generator update
    assert obj.phases(step) == ["generator", "fake_score"]

    before = _snapshot(obj)
    logs = _step(obj, opts, "generator", _batch(tiny), 0)
    assert _changed(before, obj, "student"), "the generator phase must update the student"
    for role in obj.groups["fake_score"]:
        assert not _changed(before, obj, role), f"the generator phase changed {role}"
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())

    mid = _snapshot(obj)
    _step(obj, opts, "fake_score", _batch(tiny, seed=1), 0)
    assert not _changed(mid, obj, "student"), "the fake_score phase changed the student"
    for role in obj.groups["fake_score"]:
        assert _changed(mid, obj, role), f"the fake_score phase must update {role}"

    # the teacher is bit-identical, as weights and as a function
    after_state = _teacher_state(teacher)
    assert ref_state.keys() == after_state.keys()
    assert all(torch.equal(ref_state[k], after_state[k]) for k in ref_state)
    assert not any(p.requires_grad for n, p in teacher.backbone.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        assert torch.equal(obj.nets["teacher"](x_probe, 0.6, cond_probe), ref_out)
    # the student's sampler is its training grid then 0, with fresh noise
    assert obj.sampling == {"times": params.times + [0.0], "renoise": "fresh"}


def test_two_time_scale_schedule_and_backward_simulation_depth():
    tiny = _tiny("dit")
    p = DMDParams(num_steps=4, student_times=[1.0, 0.75, 0.5, 0.25], fake_updates_per_generator=5)
    obj = build(p, tiny.denoiser, context(latent_shape=tiny.latent_shape, seed=3))
    gen_steps = [s for s in range(20) if "generator" in obj.phases(s)]
    assert gen_steps == [4, 9, 14, 19]
    assert all("fake_score" in obj.phases(s) for s in range(20))
    ks = [obj.sim_steps(s) for s in range(200)]
    assert set(ks) == {0, 1, 2, 3}
    again = build(p, _tiny("dit").denoiser, context(latent_shape=tiny.latent_shape, seed=3))
    assert ks == [again.sim_steps(s) for s in range(200)]  # the same on every process


# ---- the maths at its fixed points -------------------------------------------------------------
def test_dm_gradient_is_zero_when_fake_equals_real():
    tiny = _tiny("dit")
    for w, zero in ((1.0, True), (3.0, False)):
        obj = build(DMDParams(guidance=w), tiny.denoiser, context(latent_shape=tiny.latent_shape))
        batch = _batch(tiny)
        loss, logs = obj.loss("generator", batch, 0)
        loss.backward()
        grads = [p.grad for p in obj.nets["student"].parameters() if p.grad is not None]
        total = sum(g.abs().sum().item() for g in grads)
        if zero:  # the fake score is a copy of the teacher and the real score is unguided
            assert logs["dm_grad_norm"] == 0.0 and total == 0.0
        else:
            assert logs["dm_grad_norm"] > 0 and total > 0


def _two_class_gmm(path, learnable=False):
    """Two classes at +-(2, 2) (std 0.3), null class 2 = the whole mixture."""
    means = torch.tensor([[2.0, 2.0], [-2.0, -2.0]]).view(2, 2, 1, 1)
    return gmm_denoiser(path, means, std=0.3, classes=torch.arange(2), null_class=2, learnable=learnable), means


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_ca_term_moves_a_sample_toward_its_class(kind):
    """The CFG-augmentation term is the update -(w - 1)(x0_c - x0_u) scaled: a gradient step on the
    student's sample (x <- x - g) moves it toward its own class's mean, for every sample and label,
    and the term vanishes at w = 1 without calling the teacher."""
    path = FlowPath(1000) if kind == "flow" else vp_path_sample()
    teacher, means = _two_class_gmm(path)
    obj = build(
        DMDParams(variant="ddmd", guidance=4.0, ca_t_min=0.3, ca_t_max=0.7), teacher, context(latent_shape=(2, 1, 1))
    )
    torch.manual_seed(0)
    x_hat = 0.7 * torch.randn(64, 2, 1, 1)
    labels = torch.arange(64) % 2
    drawn = obj._draw(x_hat, 0.3, 0.7, SampleDraws(range(64), 0, 0, "test"))  # tau ~ U[ca_t_min, ca_t_max], eps
    g = ca_gradient(obj, x_hat, {"class_labels": labels}, drawn)
    # exact mixture: x0_c - x0_u = r_other (1 - gain alpha)(mu_c - mu_other), a non-negative multiple of the
    # class direction (zero where the other class's responsibility underflows)
    toward = ((-g) * (means[labels] - x_hat)).flatten(1).sum(1)
    assert bool((toward >= -1e-6).all()), f"CA moves {int((toward < -1e-6).sum())} of 64 samples away from their class"
    assert float((toward > 1e-6).float().mean()) > 0.75 and float(toward.mean()) > 0.1, toward
    calls = []
    obj1 = build(DMDParams(variant="ddmd", guidance=1.0), teacher, context(latent_shape=(2, 1, 1)))
    obj1.nets["teacher"] = _Recorder(teacher, calls)
    assert ca_gradient(obj1, x_hat, {"class_labels": labels}, drawn).abs().max() == 0 and not calls


class _Recorder(nn.Module):
    """Forwards to a Denoiser and records (t, output kind) of each call."""

    def __init__(self, net, calls):
        super().__init__()
        self.net, self.calls, self.path = net, calls, net.path

    def forward(self, x, t, cond=None, guidance=1.0, output="x0"):
        self.calls.append((torch.as_tensor(t).detach().clone(), output))
        return self.net(x, t, cond, guidance, output=output)


def vp_path_sample():
    return VPPath.from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    )


def test_ca_renoising_level_never_exceeds_the_generators_input_level():
    """Over many steps of a 3-step student (inputs 1.0, 0.6, 0.3), the CA term's re-noising time
    (the teacher's cond/uncond pass) never exceeds the generator's input time of that step, while
    the DM term's may (its range is [dm_t_min, dm_t_max])."""
    teacher, _ = _two_class_gmm(FlowPath(1000), learnable=True)
    obj = build(
        DMDParams(
            variant="ddmd", guidance=3.0, num_steps=3, student_times=[1.0, 0.6, 0.3], ca_t_min=0.02, ca_t_max=0.98
        ),
        teacher,
        context(latent_shape=(2, 1, 1)),
    )
    calls = []
    obj.nets["teacher"] = _Recorder(teacher, calls)
    seen = set()
    dm_above = False
    for step in range(40):
        calls.clear()
        _, logs = obj.loss("generator", {"cond": {"class_labels": torch.arange(8) % 2}, "shape": (8, 2, 1, 1)}, step)
        t_gen = logs["t_gen"]
        seen.add(t_gen)
        ca = [t for t, out in calls if out == "cond_uncond"]
        dm = [t for t, out in calls if out == "x0"]
        assert len(ca) == 1 and float(ca[0].max()) <= t_gen + 1e-7, (t_gen, float(ca[0].max()))
        dm_above |= float(dm[0].max()) > t_gen
    assert seen == {1.0, 0.6, 0.3} and dm_above


def test_coupled_schedule_renoises_ca_at_the_dm_terms_time():
    """ca_schedule="coupled" (the ablation's contrast): the CA term's teacher pass sees the DM term's
    tau, sample for sample, including taus above the generator's input time; "decoupled" does not;
    "uncapped" draws its own tau (not the DM term's), and above the input time too."""
    teacher, _ = _two_class_gmm(FlowPath(1000), learnable=True)
    for schedule in ("coupled", "decoupled", "uncapped"):
        obj = build(
            DMDParams(variant="ddmd", guidance=3.0, num_steps=2, student_times=[1.0, 0.3], ca_schedule=schedule),
            teacher,
            context(latent_shape=(2, 1, 1)),
        )
        calls = []
        obj.nets["teacher"] = _Recorder(teacher, calls)
        same, above = True, False
        for step in range(20):
            calls.clear()
            _, logs = obj.loss(
                "generator", {"cond": {"class_labels": torch.arange(8) % 2}, "shape": (8, 2, 1, 1)}, step
            )
            (ca,) = [t for t, out in calls if out == "cond_uncond"]
            (dm,) = [t for t, out in calls if out == "x0"]
            same &= torch.equal(ca, dm)
            above |= float(ca.max()) > logs["t_gen"]
        assert same == (schedule == "coupled") and above == (schedule != "decoupled"), schedule


@pytest.mark.parametrize("normaliser", ["own", "dm"])
def test_ddmd_switches_zero_exactly_the_other_term(normaliser):
    """CA only (dm_weight 0) and DM only (ca_weight 0), at the same random draws, give the student
    gradients whose sum is the full one: each switch removes exactly the other term (with either
    normaliser of the CA term)."""
    teacher, _ = _two_class_gmm(FlowPath(1000), learnable=True)
    batch = {"cond": {"class_labels": torch.arange(16) % 2}, "shape": (16, 2, 1, 1)}

    def grad(**kw):
        params = DMDParams(variant="ddmd", guidance=3.0, ca_normaliser=normaliser, **kw)
        obj = build(params, teacher, context(latent_shape=(2, 1, 1)))
        if "fake" in obj.nets:  # a fake score that differs from the teacher, so the DM term is not 0
            with torch.no_grad():
                obj.nets["fake"].backbone.means.add_(0.4)
        torch.manual_seed(11)
        loss, logs = obj.loss("generator", batch, 0)
        loss.backward()
        return obj.nets["student"].backbone.means.grad.clone(), obj

    full, _ = grad()
    ca_only, o_ca = grad(dm_weight=0.0)
    dm_only, _ = grad(ca_weight=0.0)
    assert "fake" not in o_ca.nets  # CA only needs no fake score
    assert ca_only.abs().max() > 1e-4 and dm_only.abs().max() > 1e-4
    assert torch.allclose(ca_only, full - dm_only, atol=1e-6), (ca_only, full - dm_only)
    assert torch.allclose(dm_only, full - ca_only, atol=1e-6)


def test_ddmd_shared_normaliser_rescales_only_the_ca_term():
    """ca_normaliser "dm" divides the CA term by the DM term's normaliser: on one sample, at the same
    draws, the CA-only gradient is the per-term one times a positive factor other than 1, and the
    DM-only gradient is unchanged."""
    teacher, _ = _two_class_gmm(FlowPath(1000), learnable=True)
    batch = {"cond": {"class_labels": torch.tensor([1])}, "shape": (1, 2, 1, 1)}

    def grad(normaliser, **kw):
        obj = build(
            DMDParams(variant="ddmd", guidance=3.0, ca_normaliser=normaliser, ca_t_min=0.6, **kw),  # c - u > 0
            teacher,
            context(latent_shape=(2, 1, 1)),
        )
        if "fake" in obj.nets:
            with torch.no_grad():
                obj.nets["fake"].backbone.means.add_(0.4)
        torch.manual_seed(5)
        obj.loss("generator", batch, 0)[0].backward()
        return obj.nets["student"].backbone.means.grad.flatten().clone()

    own, shared = grad("own", dm_weight=0.0), grad("dm", dm_weight=0.0)
    cos = torch.nn.functional.cosine_similarity(own, shared, dim=0)
    ratio = shared.norm() / own.norm()
    assert cos > 1 - 1e-5 and abs(ratio - 1) > 1e-3, (cos, ratio)
    assert torch.equal(grad("own", ca_weight=0.0), grad("dm", ca_weight=0.0))


def test_channel_kl_vanishes_on_matching_statistics():
    x = torch.randn(64, 4, 8, 8) * 1.5 + 0.3
    assert channel_gaussian_kl(x, *channel_stats(x)).item() < 1e-6
    assert channel_gaussian_kl(x + 1.0, *channel_stats(x)).item() > 0.1


# ---- start-up errors that name the key -------------------------------------------------------
@pytest.mark.parametrize(
    "kw,has_real,key",
    [
        (dict(gan=True), False, "objective.gan"),
        (dict(num_steps=4), False, "objective.student_times"),
        (dict(num_steps=2, student_times=[1.0, 0.6, 0.3]), False, "objective.student_times"),
        (dict(num_steps=2, student_times=[0.5, 0.9]), False, "objective.student_times"),
        (dict(variant="dmd", regression_weight=0.0), False, "objective.regression_weight"),
        (dict(variant="ddmd", dm_kind="meanvar", meanvar_target="real"), False, "objective.meanvar_target"),
        (dict(variant="ddmd", ca_t_min=0.6, num_steps=2, student_times=[1.0, 0.5]), False, "objective.ca_t_min"),
        (dict(variant="ddmd", ca_schedule="joint"), False, "objective.ca_schedule"),
        (dict(variant="ddmd", ca_schedule="coupled", dm_kind="meanvar"), False, "objective.ca_schedule"),
        (dict(variant="ddmd", ca_normaliser="joint"), False, "objective.ca_normaliser"),
        (dict(variant="ddmd", ca_normaliser="dm", dm_kind="meanvar"), False, "objective.ca_normaliser"),
        (dict(variant="dmdx"), False, "objective.variant"),
    ],
)
def test_bad_presets_fail_at_start_naming_the_key(kw, has_real, key):
    tiny = _tiny("dit")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(DMDParams(**kw), tiny.denoiser, context(latent_shape=tiny.latent_shape, has_real_data=has_real))


def test_unknown_yaml_key_is_named():
    with pytest.raises(ValueError, match="objective.fake_ratio"):
        params_from_dict({"fake_ratio": 5})
    p = params_from_dict({"name": "decoupled_dmd", "ca_weight": 2.0})
    assert p.ca_weight == 2.0 and p.variant == "ddmd"
    d = params_from_dict({"name": "dmd"})  # DMD's own defaults: regression on, 1:1 updates
    assert d.regression_weight == 0.25 and d.fake_updates_per_generator == 1


def test_registry_builds_each_name():
    from fewstep.objectives import registry

    tiny = _tiny("dit")
    for name, variant in (("dmd2", "dmd2"), ("dmd", "dmd"), ("decoupled_dmd", "ddmd")):
        ctx = registry.BuildContext(latent_shape=tiny.latent_shape, num_classes=10, seed=1)
        obj = registry.build_objective(
            name,
            {"guidance": 2.0, "num_steps": 2, "student_times": [1.0, 0.5]} if name != "dmd" else {"guidance": 2.0},
            tiny.denoiser,
            ctx,
        )
        assert obj.variant == variant and obj.groups == {"generator": ["student"], "fake_score": ["fake"]}
    with pytest.raises(Exception, match="objective.num_steps"):
        registry.build_objective(
            "dmd2", {"num_steps": 3}, tiny.denoiser, registry.BuildContext(latent_shape=tiny.latent_shape)
        )


# ---- regression pairs: made once, cached, keyed by teacher and sampler settings ------------------
def test_regression_pairs_are_teacher_samples_cached_on_disk(tmp_path):
    tiny = _tiny("dit")
    kw = dict(
        variant="dmd",
        regression_weight=0.25,
        regression_pairs=6,
        regression_steps=3,
        guidance=2.0,
        cache_dir=str(tmp_path),
    )
    obj = build(DMDParams(**kw), tiny.denoiser, context(latent_shape=tiny.latent_shape))
    batch = _batch(tiny, b=3)
    _, logs = obj.loss("generator", batch, 0)
    assert logs["regression"] > 0
    files = sorted(tmp_path.glob("teacher_samples_*.safetensors"))
    assert len(files) == 1
    noise, y, cond = obj._pairs
    # the pairs are the teacher's deterministic 3-step CFG samples of that noise
    expect = sample(tiny.denoiser, noise, cond, tiny.path.sampling_times(3), guidance=2.0, renoise="ddim")
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(cond["class_labels"], batch["cond"]["class_labels"][torch.arange(6) % 3])
    # a second run reads the same file; another guidance makes another file
    stamp = files[0].stat().st_mtime_ns
    obj2 = build(DMDParams(**kw), tiny.denoiser, context(latent_shape=tiny.latent_shape))
    obj2.loss("generator", batch, 0)
    assert torch.equal(obj2._pairs[1], y) and files[0].stat().st_mtime_ns == stamp
    obj3 = build(
        DMDParams(**{**kw, "regression_guidance": 1.5}), tiny.denoiser, context(latent_shape=tiny.latent_shape)
    )
    obj3.loss("generator", batch, 0)
    assert len(list(tmp_path.glob("teacher_samples_*.safetensors"))) == 2


# ---- shared base: one backbone, adapters switched per role --------------------------------------
def test_shared_base_switches_roles_in_forward_and_backward():
    tiny = _tiny("sdxl")
    import copy

    original = copy.deepcopy(tiny.denoiser)
    obj = build(DMDParams(shared_base=True), tiny.denoiser, context(latent_shape=tiny.latent_shape, lora=LORA))
    teacher, student, fake = (obj.nets[r] for r in ("teacher", "student", "fake"))
    assert all(isinstance(n, RoleView) for n in (teacher, student, fake))
    # one backbone: every role view calls the same module
    assert teacher.backbone is student.backbone is fake.backbone is tiny.denoiser.backbone
    x, cond = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        ref = original(x, 0.5, cond)
        # adapters start at zero (LoRA B = 0): every role is the teacher
        for net in (teacher, student, fake):
            assert torch.equal(net(x, 0.5, cond), ref)
        for p in fake.parameters():  # move the fake adapter only
            p.add_(0.05 * torch.randn_like(p))
        assert torch.equal(teacher(x, 0.5, cond), ref) and torch.equal(student(x, 0.5, cond), ref)
        assert not torch.allclose(fake(x, 0.5, cond), ref)
        assert torch.equal(tiny.denoiser(x, 0.5, cond), ref)  # outside role calls: the teacher
    # backward reaches only the adapter that was active in the forward pass
    out = student(x, 0.5, cond)
    fake(x, 0.5, cond)  # another role runs in between; the recorded graph is unaffected
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # each trainable weight belongs to one role; the standalone student is a plain Denoiser
    ids = [{id(p) for p in obj.nets[r].parameters()} for r in ("teacher", "student", "fake")]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    with torch.no_grad():
        solo = student.standalone()
        torch.testing.assert_close(solo(x, 0.5, cond), student(x, 0.5, cond), rtol=1e-5, atol=1e-6)
        assert not any("lora_" in n for n, _ in solo.backbone.named_parameters())


def test_shared_base_holds_fewer_parameter_bytes():
    def held(obj):
        seen, total = set(), 0
        for net in obj.nets.values():
            mods = [net, getattr(net, "backbone", None)]
            for m in mods:
                for p in m.parameters() if m is not None else []:
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel() * p.element_size()
        return total

    full = held(build(DMDParams(), _tiny("sdxl").denoiser, context(latent_shape=(4, 8, 8))))
    lora1 = SimpleNamespace(rank=1, alpha=1.0, target_modules=None, dropout=0.0)
    shared = held(
        build(DMDParams(shared_base=True), _tiny("sdxl").denoiser, context(latent_shape=(4, 8, 8), lora=lora1))
    )
    one = sum(p.numel() * p.element_size() for p in _tiny("sdxl").denoiser.parameters())
    assert full == 3 * one
    assert shared < 0.6 * full


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different data and noise per process
        tiny = _tiny("dit")
        obj = build(
            DMDParams(shared_base=True, gan=True, guidance=3.0, fake_updates_per_generator=1),
            tiny.denoiser,
            context(latent_shape=tiny.latent_shape, has_real_data=True, seed=7, lora=LORA),
        )
        for role in ("student", "fake", "disc"):
            obj.nets[role] = DDP(obj.nets[role])
        opts = _optimizers(obj, lr=1e-2)
        for step in range(2):
            for phase in obj.phases(step):
                _step(obj, opts, phase, _batch(tiny, seed=10 * rank + step), step)
        flat = torch.cat([p.detach().flatten() for r in ("student", "fake", "disc") for p in obj.nets[r].parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save({"params": gathered}, out_file)
    finally:
        dist.destroy_process_group()


def test_shared_base_under_ddp_keeps_processes_in_sync(tmp_path):
    import multiprocessing as mp

    import peft  # noqa: F401  (imported once here, inherited by the children)

    _tiny("dit")
    out = tmp_path / "ddp.pt"
    ctx = mp.get_context("fork")  # the children inherit the imported modules: seconds, not tens
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = torch.load(out, weights_only=True)["params"]
    assert torch.equal(got[0], got[1]), "DDP processes diverged: gradients were not averaged over roles"
    assert got[0].abs().sum() > 0


# ---- a short run on the exact Gaussian-mixture teacher -----------------------------------------
class _Out:
    def __init__(self, sample):
        self.sample = sample


class _MLPGenerator(nn.Module):
    """A 1-step generator x0 = f(noise) in its path's native output."""

    def __init__(self, d: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )

    def forward(self, x, timestep, class_labels=None):
        return _Out(self.net(x.flatten(1)).view_as(x))


class _ResidualFake(nn.Module):
    """The fake score: the teacher's exact output plus a zero-initialised MLP correction of (x, t),
    so it starts as a copy of the teacher and can learn the generator's distribution."""

    def __init__(self, base, d: int, width: int = 64):
        super().__init__()
        self.base = base
        self.net = nn.Sequential(
            nn.Linear(d + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, timestep, class_labels=None):
        t = self.base.t_of(timestep).float().view(-1, 1)
        return _Out(self.base(x, timestep).sample + self.net(torch.cat([x.flatten(1), t], 1)).view_as(x))


class _Plain(Conditioner):
    def call(self, backbone, x, timestep, cond):
        return backbone(x, timestep).sample

    def null(self, cond, batch):
        return cond


def _sliced_w2(a, b, n_proj=64, seed=3) -> float:
    g = torch.Generator().manual_seed(seed)
    a, b = a.flatten(1), b.flatten(1)
    th = torch.randn(a.shape[1], n_proj, generator=g)
    th = th / th.norm(dim=0)
    pa, pb = (a @ th).sort(0).values, (b @ th).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_dmd2_moves_one_step_generator_toward_the_mixture(kind):
    path = (
        FlowPath(1000)
        if kind == "flow"
        else VPPath.from_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "sample"}
        )
    )
    means = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0]]).view(3, 2, 1, 1)
    teacher = gmm_denoiser(path, means, std=0.3)
    fake = Denoiser(_ResidualFake(copy_denoiser(teacher, trainable=False).backbone, 2), path, _Plain())
    student = Denoiser(_MLPGenerator(2), path, _Plain())
    obj = DMDObjective(
        DMDParams(guidance=1.0, fake_updates_per_generator=2), teacher, student, fake, latent_shape=(2, 1, 1)
    )
    opts = {
        "generator": torch.optim.Adam(trainable_parameters(obj, "generator"), lr=1e-3),
        "fake_score": torch.optim.Adam(trainable_parameters(obj, "fake_score"), lr=1e-2),
    }
    exact = teacher.backbone.sample_data(2000, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(2))

    def distance():
        with torch.no_grad():
            return _sliced_w2(student(z, 1.0), exact)

    before = distance()
    for step in range(300):
        for phase in obj.phases(step):
            _step(obj, opts, phase, {"cond": None, "shape": (256, 2, 1, 1)}, step)
    after = distance()
    print(f"{kind}: sliced W2 to exact mixture samples {before:.3f} -> {after:.3f}")
    assert after < 0.75 * before


# ---- through the training entry point ----------------------------------------------------------
def test_entry_point_trains_shared_base_dmd2_with_gan_and_saves_the_merged_student(tmp_path):
    from fewstep.config import config_from_dict
    from fewstep.training import loop as training
    from tests.dist.bundles import real_data_bundle

    tiny = _tiny("dit")
    bundle = real_data_bundle(tiny, 40)
    cfg = config_from_dict(
        {
            "name": "dmd-test",
            "output_dir": str(tmp_path / "run"),
            "steps": 2,
            "objective": {
                "name": "dmd2",
                "guidance": 2.0,
                "gan": True,
                "shared_base": True,
                "num_steps": 2,
                "student_times": [1.0, 0.5],
                "fake_updates_per_generator": 2,
            },
            "data": {"batch_size": 4, "real_data": True},
            "lora": {"rank": 2, "alpha": 2.0},
            "optim": {"generator": {"lr": 1e-2}, "fake_score": {"lr": 1e-2}},
            "log": {"every": 2, "sample_every": 0, "sample_count": 4, "trackers": [], "progress": False},
            "checkpoint": {"every": 0},
        }
    )
    res = training.run(cfg, teacher=bundle)
    assert res.steps == 2 and res.skipped == 0  # step 1 updates the generator
    assert res.logs["generator/dm_grad_norm"] > 0 and "fake_score/gan_d" in res.logs
    card = __import__("json").loads((tmp_path / "run" / "run_card.json").read_text())
    assert card["sampling"] == {"times": [1.0, 0.5, 0.0], "renoise": "fresh"}
    # the saved student is the base with the student adapter merged: it differs from the teacher
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "final" / "student" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora_" in k for k in saved)
    base = _teacher_state(tiny.denoiser)
    assert saved.keys() == base.keys()
    assert any(not torch.equal(saved[k], base[k]) for k in saved)


def test_shared_base_merge_record_reproduces_the_student():
    """The adapter record left on the shared backbone is what the entry point's final save merges."""
    from fewstep.training.lora import lora_meta, merge_lora_state_dict

    tiny = _tiny("dit")
    obj = build(DMDParams(shared_base=True), tiny.denoiser, context(latent_shape=tiny.latent_shape, lora=LORA))
    student = obj.nets["student"]
    with torch.no_grad():
        for p in obj.nets["student"].parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in obj.nets["fake"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    meta = lora_meta(student.backbone)
    merged = merge_lora_state_dict(student.backbone.state_dict(), meta["alpha"] / meta["rank"], meta["adapter"])
    fresh = _tiny("dit")
    fresh.backbone.load_state_dict(merged)
    x, cond = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoiser(x, 0.7, cond), student(x, 0.7, cond), rtol=1e-4, atol=1e-5)


# ---- the GAN feature hook on a backbone of no known family ---------------------------------------
class _PlainConvNet(nn.Module):
    """A plain nn.Module backbone (no diffusers class, no `mid_block` or `transformer_blocks`)."""

    def __init__(self, channels: int = 4, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.ModuleDict(
            {"mid": nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(4, width), nn.SiLU())}
        )
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, timestep):
        h = self.inp(x) + (timestep.float() / 1000).view(-1, 1, 1, 1)
        return _Out(self.out(self.body["mid"](h)))


def test_gan_head_taps_a_plain_backbone_at_the_named_layer():
    from fewstep.objectives.gan import DiscriminatorHead
    from tests.tiny import vp_path

    teacher = Denoiser(_PlainConvNet(), vp_path(), _Plain()).requires_grad_(False)
    ctx = context(latent_shape=(4, 8, 8), has_real_data=True)
    with pytest.raises(ValueError, match="objective.gan_feature_layer"):
        build(DMDParams(gan=True, guidance=1.0), teacher, ctx)
    with pytest.raises(ValueError, match="objective.gan_feature_layer='body.nope'"):
        build(DMDParams(gan=True, guidance=1.0, gan_feature_layer="body.nope"), teacher, ctx)
    obj = build(
        DMDParams(gan=True, guidance=1.0, fake_updates_per_generator=1, gan_feature_layer="body.mid"), teacher, ctx
    )
    assert obj.nets["disc"].in_channels == 16  # the GroupNorm's width inside the named layer
    with pytest.raises(ValueError, match="16 channels .* head expects 8: objective.gan_feature_layer"):
        DiscriminatorHead(8, (8, 8))(torch.randn(2, 16, 8, 8))
    opts = _optimizers(obj)
    g = torch.Generator().manual_seed(0)
    batch = {"cond": None, "x0": torch.randn((2, 4, 8, 8), generator=g), "shape": (2, 4, 8, 8)}
    before = _snapshot(obj)
    logs = _step(obj, opts, "generator", batch, 0)
    assert "gan_g" in logs and _changed(before, obj, "student")
    mid = _snapshot(obj)
    logs = _step(obj, opts, obj.phases(0)[-1], batch, 0)
    assert "gan_d" in logs and _changed(mid, obj, "disc") and not _changed(mid, obj, "student")


def test_ddmd_ablation_variants_are_valid_presets_that_switch_one_thing():
    """eval/ddmd_ablation.py's four variants of the VP preset load and validate, share the
    generator updates, and differ from the method only in the switch each names."""
    import importlib.util
    from pathlib import Path

    from fewstep.config import load_config

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ddmd_ablation", root / "eval" / "ddmd_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    preset = root / "configs" / "digits" / "ddmd_4step_vp.yaml"

    def params(variant):
        ov = mod.variant_overrides(variant, 100, gan=False)
        cfg = load_config(preset, [f"{k}={'null' if v is None else v}" for k, v in ov.items()])
        assert cfg.generator_steps == 100 and cfg.objective.name == "decoupled_dmd"
        p = params_from_dict({"name": cfg.objective.name, **cfg.objective.params})
        p.validate()
        return p

    base = params("decoupled")
    assert not base.gan and base.ca_weight > 0 and base.dm_weight > 0 and base.ca_schedule == "decoupled"
    changed = {
        v: {f.name for f in dataclasses.fields(base) if getattr(params(v), f.name) != getattr(base, f.name)}
        for v in ("ca_only", "dm_only", "coupled")
    }
    assert changed == {"ca_only": {"dm_weight"}, "dm_only": {"ca_weight"}, "coupled": {"ca_schedule"}}
    assert params("ca_only").dm_weight == 0 and params("dm_only").ca_weight == 0
