"""Flash-DMD: the DM loss only at the high-noise student steps and the adversarial loss only at
the low-noise ones, the reward phase (reward rises with the distillation regulariser on; the
contrast run drops it), rewards that break (non-finite, wrong shape), start-up errors, and the
shipped digits reward (a separate network from the judge, differentiable through the decoder)."""

from __future__ import annotations

import pytest
import torch

from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.flash_dmd import FlashDMDParams, build
from fewstep.objectives.registry import BuildContext, build_objective
from fewstep.samplers import sample
from tests.tiny import make_tiny


def _ctx(tiny, **kw):
    return BuildContext(latent_shape=tiny.latent_shape, num_classes=10, has_real_data=True, **kw)


def _batch(tiny, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "cond": tiny.cond(b, g),
        "x0": torch.randn(b, *tiny.latent_shape, generator=g),
        "shape": (b, *tiny.latent_shape),
    }


def _calls(module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def _toy_reward(target: float = 1.0):
    def reward(x, cond):  # higher when the latents sit near `target`
        return -((x.float() - target) ** 2).flatten(1).mean(1)

    reward.input = "latents"
    reward.name = "toy_latent_target"
    return reward


def test_dm_loss_only_at_high_noise_steps_adversarial_only_at_low_noise_steps():
    tiny = make_tiny("dit")
    obj = build_objective(
        "flash_dmd",
        {"guidance": 3.0, "dm_steps": 2, "fake_updates_per_generator": 1, "gan_generator_weight": 1.0},
        tiny.denoiser,
        _ctx(tiny),
    )
    assert obj.sampling == {"times": [1.0, 0.75, 0.5, 0.25, 0.0], "renoise": "fresh"}
    teacher_calls, disc_calls = _calls(tiny.denoiser.backbone), _calls(obj.nets["disc"])
    student = [p for p in obj.nets["student"].parameters() if p.requires_grad]
    seen = set()
    for step in range(12):
        k = obj.dm.sim_steps(step)
        high = k < 2
        seen.add(high)
        teacher_calls.clear()
        disc_calls.clear()
        loss, logs = obj.loss("generator", _batch(tiny, seed=step), step)
        grads = torch.autograd.grad(loss, student, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"no student gradient at step {k}"
        if high:  # DM term only: the real and fake scores are queried, the discriminator never
            assert logs["dm_step"] == 1.0 and logs["dm_grad_norm"] > 0 and "gan_g" not in logs
            assert teacher_calls and not disc_calls
        else:  # adversarial term only: the discriminator, never the real score
            assert logs["dm_step"] == 0.0 and "gan_g" in logs and "dm_grad_norm" not in logs
            assert disc_calls and not teacher_calls
        assert logs["t_gen"] == [1.0, 0.75, 0.5, 0.25][k]
    assert seen == {True, False}
    # the fake_score phase trains the fake score and the head on every step's samples
    loss, logs = obj.loss("fake_score", _batch(tiny), 0)
    assert logs["loss_fake"] > 0 and logs["gan_d"] > 0


def _train(obj, tiny, steps, lr=3e-3, b=4):
    opts = {g: torch.optim.Adam(trainable_parameters(obj, g), lr=lr) for g in obj.groups}
    logs_all = []
    for step in range(steps):
        for phase in obj.phases(step):
            loss, logs = obj.loss(phase, _batch(tiny, b=b, seed=100 + step), step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            if phase == "generator":
                logs_all.append(logs)
    return logs_all


def _mean_reward(obj, tiny, reward, n=16) -> float:
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(n, *tiny.latent_shape, generator=g)
    cond = tiny.cond(n, torch.Generator().manual_seed(8))
    with torch.no_grad():
        x = sample(
            obj.nets["student"],
            noise,
            cond,
            obj.sampling["times"],
            renoise="fresh",
            generator=torch.Generator().manual_seed(9),
        )
    return float(reward(x, cond).mean())


@pytest.mark.parametrize("keep", [True, False])
def test_reward_phase_raises_the_reward(keep):
    """With a toy reward on latents, the student's 4-step samples score higher after the reward
    phase, with the distillation regulariser on (logged side by side) and, for the contrast run,
    off (no distillation term, no fake-score updates)."""
    torch.manual_seed(0)
    tiny = make_tiny("dit")
    reward = _toy_reward()
    params = FlashDMDParams(
        guidance=2.0,
        fake_updates_per_generator=1,
        reward="toy",
        reward_start=2,
        reward_weight=1.0,
        reward_keep_distillation=keep,
    )
    obj = build(params, tiny.denoiser, _ctx(tiny), reward=reward)
    before = _mean_reward(obj, tiny, reward)
    assert obj.phases(1) == ["generator", "fake_score"]
    assert obj.phases(2) == (["generator", "fake_score"] if keep else ["generator"])
    logs = _train(obj, tiny, 14)
    after = _mean_reward(obj, tiny, reward)
    print(f"keep_distillation={keep}: toy reward of 4-step samples {before:.3f} -> {after:.3f}")
    assert after > before + 0.05 * abs(before)
    assert "reward" not in logs[0] and "reward" in logs[-1]
    assert all("loss_distill" in lg for lg in logs)
    if keep:
        assert any(lg["loss_distill"] != 0 for lg in logs[2:])
    else:
        assert all(lg["loss_distill"] == 0 and "dm_step" not in lg for lg in logs[2:])


def test_nonfinite_or_misshapen_reward_is_an_error_naming_it():
    tiny = make_tiny("dit")

    def nan_reward(x, cond):
        r = x.flatten(1).mean(1)
        return r * torch.tensor([float("nan")] + [1.0] * (r.shape[0] - 1))

    nan_reward.input = "latents"
    nan_reward.name = "my_broken_reward"
    # at start-up (a class-conditional teacher: the reward is probed) ...
    with pytest.raises(ValueError, match="objective.reward.*my_broken_reward.*non-finite"):
        build(FlashDMDParams(reward="x", reward_start=0), tiny.denoiser, _ctx(tiny), reward=nan_reward)
    # ... and during training, where a reward turns non-finite later
    calls = []

    def late_nan(x, cond):
        calls.append(1)
        return nan_reward(x, cond) if len(calls) > 1 else x.flatten(1).mean(1)

    late_nan.input = "latents"
    late_nan.name = "late_nan_reward"
    obj = build(FlashDMDParams(reward="x", reward_start=0), tiny.denoiser, _ctx(tiny), reward=late_nan)
    with pytest.raises(FloatingPointError, match="late_nan_reward.*non-finite"):
        obj.loss("generator", _batch(tiny), 0)

    def scalar_reward(x, cond):
        return x.mean()

    scalar_reward.input = "latents"
    with pytest.raises(ValueError, match="objective.reward.*scalar_reward.*one value per sample"):
        build(FlashDMDParams(reward="x", reward_start=0), tiny.denoiser, _ctx(tiny), reward=scalar_reward)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(dm_steps=4), "objective.dm_steps"),
        (dict(dm_steps=0), "objective.dm_steps"),
        (dict(num_steps=1, student_times=[1.0]), "objective.num_steps"),
        (dict(reward="digits_class"), "objective.reward_start"),
        (dict(reward_start=10), "objective.reward"),
        (dict(reward="nope", reward_start=0), "objective.reward"),
        (dict(student_times=[1.0, 0.5, 0.6, 0.2]), "objective.student_times"),
        (dict(fake_score_pull=1.0), "objective.fake_score_pull"),
        (dict(fake_score_pull=-0.1), "objective.fake_score_pull"),
        (dict(gan_features="sam"), "objective.gan_features"),
    ],
)
def test_bad_params_name_the_key(kw, key):
    tiny = make_tiny("dit")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(FlashDMDParams(**kw), tiny.denoiser, _ctx(tiny))


def test_needs_real_data_and_a_decoder_for_image_rewards():
    tiny = make_tiny("dit")
    with pytest.raises(ValueError, match="data.real_data"):
        build(FlashDMDParams(), tiny.denoiser, BuildContext(latent_shape=tiny.latent_shape, has_real_data=False))
    with pytest.raises(ValueError, match="digits_class.*decoder"):
        build(FlashDMDParams(reward="digits_class", reward_start=0), tiny.denoiser, _ctx(tiny))


def test_digits_reward_is_not_the_judge_and_is_differentiable_through_the_decoder():
    from fewstep.digits.judge import JUDGE_WEIGHTS, load_judge
    from fewstep.objectives.rewards import DigitsClassReward, differentiable_decode

    r = DigitsClassReward()
    judge = load_judge()
    assert r.classifier.config() != judge.config()  # another network, not a copy of the judge
    with pytest.raises(ValueError, match="evaluation judge"):
        DigitsClassReward(JUDGE_WEIGHTS)
    from fewstep.digits import embedded_teachers as digits_teacher

    t = digits_teacher.load_digits_teacher("vp")
    dec = differentiable_decode(t.decode)
    z = torch.randn(4, *t.latent_shape, requires_grad=True)
    labels = torch.tensor([0, 3, 5, 9])
    out = r(dec(z), {"class_labels": labels})
    assert out.shape == (4,) and bool((out <= 0).all())  # log-probabilities
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # on real digits the reward classifier names the right class
    from fewstep.digits.data import load_digits_tensors

    x, y = load_digits_tensors()
    acc = (r.classifier.predict(x[:300]) == y[:300]).float().mean()
    assert acc > 0.95


def test_clip_reward_without_a_local_model_is_a_clear_error(tmp_path):
    from fewstep.objectives.rewards import make_reward

    with pytest.raises(ValueError, match="objective.reward_model"):
        make_reward("clip", None)
    with pytest.raises(Exception, match="CLIP model folder"):
        make_reward("clip", str(tmp_path / "no_clip_here"))


def test_dm_steps_move_the_students_samples_against_the_dm_gradient():
    """At a high-noise step, one SGD step on the generator loss moves the student's x_hat along -g,
    g = (x0_fake - x0_real) / mean|x_hat - x0_real| (DMD eq. 8). A sign error in the DM term fails here."""
    tiny = make_tiny("dit")
    obj = build(FlashDMDParams(guidance=3.0, fake_updates_per_generator=1), tiny.denoiser, _ctx(tiny))
    step = next(s for s in range(50) if obj.is_dm_step(s))
    batch = _batch(tiny, b=4)

    def sample_and_grad():
        rng = obj.dm.draws(batch, step, "generator")  # the generator loss's own draws
        with torch.no_grad():
            x_hat, _ = obj.dm.generate(batch, step, grad=False, rng=rng)
            return x_hat, obj.dm._dm_grad(x_hat, batch["cond"], 3.0, rng)

    x_before, g = sample_and_grad()
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=1e-3)
    torch.manual_seed(5)
    loss, logs = obj.loss("generator", batch, step)
    assert logs["dm_step"] == 1.0
    loss.backward()
    opt.step()
    x_after, _ = sample_and_grad()
    move = (x_after - x_before).flatten()
    cos = float(torch.dot(move, g.flatten()) / (move.norm() * g.norm()))
    assert cos < -0.1, cos


def test_adversarial_steps_move_the_students_samples_up_the_discriminator():
    """At a low-noise step, one SGD step on the generator loss raises the discriminator's logit of
    the student's (re-noised) samples: the non-saturating generator loss softplus(-D). A sign error
    in the adversarial term fails here."""
    tiny = make_tiny("dit")
    obj = build(
        FlashDMDParams(guidance=3.0, fake_updates_per_generator=1, gan_generator_weight=1.0), tiny.denoiser, _ctx(tiny)
    )
    step = next(s for s in range(50) if not obj.is_dm_step(s))
    batch = _batch(tiny, b=8)

    def mean_logit():
        rng = obj.dm.draws(batch, step, "generator")  # the generator loss's own draws
        with torch.no_grad():
            x_hat, _ = obj.dm.generate(batch, step, grad=False, rng=rng)
            x_n, tau = obj.dm._noised(x_hat, obj.p.gan_t_min, obj.p.gan_t_max, rng)
            return float(obj.dm._disc_logits(x_n, tau, batch["cond"])[1].mean())

    before = mean_logit()
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=1e-2)
    torch.manual_seed(5)
    loss, logs = obj.loss("generator", batch, step)
    assert logs["dm_step"] == 0.0
    loss.backward()
    opt.step()
    assert mean_logit() > before


class _TimeMLP(torch.nn.Module):
    """A multi-step generator x0 = f(x_t, t) in its path's native output (prediction 'sample')."""

    def __init__(self, d: int, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, d),
        )

    def forward(self, x, timestep, class_labels=None):
        t = (timestep.float() / 1000.0).view(-1, 1)
        return _Out(self.net(torch.cat([x.flatten(1), t], 1)).view_as(x))


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _FakeWithBottleneck(torch.nn.Module):
    """The fake score: the exact teacher plus a zero-initialised MLP correction of (x, t), so it
    starts as the teacher; its "mid block" (an MLP on (x, t), feeding the correction) is where the
    GAN head reads features."""

    def __init__(self, base, d: int, width: int = 8):
        super().__init__()
        self.base = base
        # (B, width, 4, 4) features: the head's GroupNorm needs spatial extent to see anything
        self.mid_block = torch.nn.Sequential(
            torch.nn.Linear(d + 1, width * 16), torch.nn.SiLU(), torch.nn.Unflatten(1, (width, 4, 4))
        )
        self.out = torch.nn.Linear(width * 16, d)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)
        self.config = {"block_out_channels": [width]}

    def forward(self, x, timestep, class_labels=None):
        t = self.base.t_of(timestep).float().view(-1, 1)
        h = self.mid_block(torch.cat([x.flatten(1), t], 1))
        return _Out(self.base(x, timestep).sample + self.out(h.flatten(1)).view_as(x))


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_flash_dmd_learns_the_mixture(kind):
    """Exact teacher: a three-component Gaussian mixture in 2-d. A 4-step MLP student trained with
    DM at its two high-noise steps and the adversarial loss (against exact mixture samples) at the
    two low-noise ones: its 4-step samples move toward the mixture (sliced W2 to exact samples)."""
    from fewstep.conditioning import Conditioner
    from fewstep.denoiser import Denoiser, copy_denoiser
    from fewstep.objectives.dmd import DMDObjective
    from fewstep.objectives.flash_dmd import FlashDMDObjective
    from fewstep.objectives.gan import DiscriminatorHead, FeatureTap
    from fewstep.paths import FlowPath, VPPath
    from fewstep.testing import gmm_denoiser
    from tests.test_dmd import _sliced_w2

    class _Plain(Conditioner):
        def call(self, backbone, x, timestep, cond):
            return backbone(x, timestep).sample

        def null(self, cond, batch):
            return cond

    torch.manual_seed(0)
    path = (
        FlowPath(1000)
        if kind == "flow"
        else VPPath.from_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "sample"}
        )
    )
    means = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0]]).view(3, 2, 1, 1)
    teacher = gmm_denoiser(path, means, std=0.3)
    fake_bb = _FakeWithBottleneck(copy_denoiser(teacher, trainable=False).backbone, 2)
    fake = Denoiser(fake_bb, path, _Plain())
    student = Denoiser(_TimeMLP(2), path, _Plain())
    params = FlashDMDParams(guidance=1.0, fake_updates_per_generator=2, gan_generator_weight=0.1)
    tap = FeatureTap(fake_bb.mid_block)
    head = DiscriminatorHead(8, (4, 4), 128)  # the default width (a width-16 head is constant: its last
    #   GroupNorm has one value per group at 1x1)
    dmd = DMDObjective(params.dmd_params(), teacher, student, fake, latent_shape=(2, 1, 1), disc=head, tap=tap)
    obj = FlashDMDObjective(params, dmd)
    opts = {
        "generator": torch.optim.Adam(trainable_parameters(obj, "generator"), lr=2e-3),
        "fake_score": torch.optim.Adam(trainable_parameters(obj, "fake_score"), lr=1e-2),
    }
    exact = teacher.backbone.sample_data(2000, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(2))

    def distance():
        with torch.no_grad():
            x = sample(
                student, z, None, obj.sampling["times"], renoise="fresh", generator=torch.Generator().manual_seed(3)
            )
        return _sliced_w2(x, exact)

    before = distance()
    for step in range(250):
        x0 = teacher.backbone.sample_data(128, generator=torch.Generator().manual_seed(10 + step))
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, {"cond": None, "x0": x0, "shape": (128, 2, 1, 1)}, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    after = distance()
    print(f"{kind}: sliced W2 of 4-step samples to exact mixture samples {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before


def test_fake_score_pull_moves_the_fake_score_toward_the_student_after_generator_updates_only():
    tiny = make_tiny("dit")
    lam = 0.75
    obj = build(FlashDMDParams(fake_score_pull=lam, fake_updates_per_generator=1), tiny.denoiser, _ctx(tiny))
    fake, student = obj.nets["fake"], obj.nets["student"]
    with torch.no_grad():  # make the two differ, then check the exact mix
        for q in student.parameters():
            if q.requires_grad:
                q.add_(0.1)
    f0 = {n: q.detach().clone() for n, q in fake.named_parameters()}
    s0 = {n: q.detach().clone() for n, q in student.named_parameters()}
    trained = {n for n, q in student.named_parameters() if q.requires_grad}
    obj.after_step("fake_score", 0)  # a fake-score update: nothing moves
    assert all(torch.equal(q, f0[n]) for n, q in fake.named_parameters())
    obj.after_step("generator", 0)
    moved = 0
    for n, q in fake.named_parameters():
        want = lam * f0[n] + (1 - lam) * s0[n] if n in trained else f0[n]
        assert torch.allclose(q, want, atol=1e-6), n
        moved += int(not torch.equal(q, f0[n]))
    assert moved > 0
    assert all(torch.equal(q, s0[n]) for n, q in student.named_parameters())  # the student is untouched
    # off by default: a generator update leaves the fake score alone
    off = build(FlashDMDParams(fake_updates_per_generator=1), tiny.denoiser, _ctx(tiny))
    before = {n: q.detach().clone() for n, q in off.nets["fake"].named_parameters()}
    off.after_step("generator", 0)
    assert all(torch.equal(q, before[n]) for n, q in off.nets["fake"].named_parameters())


def _fake_and_head_grads(tiny, features, disc_weight):
    torch.manual_seed(0)
    obj = build(
        FlashDMDParams(gan_features=features, gan_disc_weight=disc_weight, fake_updates_per_generator=1),
        tiny.denoiser,
        _ctx(tiny),
    )
    loss, logs = obj.loss("fake_score", _batch(tiny), 0)
    fake = [q for q in obj.nets["fake"].parameters() if q.requires_grad]
    head = [q for q in obj.nets["disc"].parameters() if q.requires_grad]
    grads = torch.autograd.grad(loss, fake + head, allow_unused=True)
    flat = lambda gs: torch.cat([(torch.zeros(1) if g is None else g.flatten()) for g in gs])  # noqa: E731
    return flat(grads[: len(fake)]), flat(grads[len(fake) :]), logs


@pytest.mark.parametrize("features", ["teacher", "fake_score"])
def test_teacher_feature_head_is_a_discriminator_apart_from_the_fake_score(features):
    """With gan_features=teacher the fake score learns its denoising loss only: the discriminator
    loss's weight changes the head's gradient but not the fake score's. With DMD2's head on the
    fake score (the default) it changes both."""
    tiny = make_tiny("dit")
    f1, h1, logs = _fake_and_head_grads(tiny, features, 0.05)
    f2, h2, _ = _fake_and_head_grads(tiny, features, 5.0)
    assert logs["gan_d"] > 0 and h1.abs().sum() > 0
    assert not torch.allclose(h1, h2)
    if features == "teacher":
        assert torch.allclose(f1, f2, atol=1e-7)
    else:
        assert not torch.allclose(f1, f2, atol=1e-7)


# ---- the pixel discriminator (gan_space: pixel) ------------------------------------------------
def _pixel_obj(tiny, **kw):
    from fewstep.training.bundle import vae_decoder
    from tests.tiny import tiny_vae

    vae = tiny_vae(channels=1, latent_channels=tiny.latent_shape[0]).requires_grad_(False)
    params = {"guidance": 3.0, "fake_updates_per_generator": 1, "gan_generator_weight": 1.0, "gan_space": "pixel"}
    params.update(kw)
    return build_objective("flash_dmd", params, tiny.denoiser, _ctx(tiny, decode=vae_decoder(vae), vae=vae)), vae


def test_pixel_discriminator_reads_decoded_images_and_trains_apart_from_the_student():
    """gan_space pixel: at a low-noise step the adversarial term goes through the decoder and the
    frozen VAE-encoder backbone to the student only (no gradient reaches the heads, the VAE or the
    latent GAN head, which is not built); the fake-score phase trains the heads on decoded student
    and real samples, and never the VAE."""
    tiny = make_tiny("dit")
    obj, vae = _pixel_obj(tiny)
    assert "disc" not in obj.nets and "pixel_disc" in obj.groups["fake_score"]
    enc_calls, dec_calls, teacher_calls = (
        _calls(vae.encoder.mid_block),
        _calls(vae.decoder),
        _calls(tiny.denoiser.backbone),
    )
    step = next(s for s in range(50) if not obj.is_dm_step(s))
    loss, logs = obj.loss("generator", _batch(tiny, b=4), step)
    assert logs["dm_step"] == 0.0 and "gan_g" in logs
    assert enc_calls and dec_calls and not teacher_calls  # images judged; the real score never asked
    loss.backward()
    student = [p for p in obj.nets["student"].parameters() if p.requires_grad]
    assert sum(float(p.grad.abs().sum()) for p in student if p.grad is not None) > 0
    assert all(p.grad is None for p in obj.nets["pixel_disc"].parameters())
    assert all(p.grad is None for p in vae.parameters())
    obj.nets["student"].zero_grad(set_to_none=True)
    loss, logs = obj.loss("fake_score", _batch(tiny, b=4), step)
    loss.backward()
    assert logs["loss_fake"] > 0 and logs["gan_d"] > 0
    assert all(p.grad is not None for p in obj.nets["pixel_disc"].parameters())
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is None for p in student)


def test_pixel_adversarial_step_raises_the_discriminators_logit_of_the_students_images():
    """One SGD step on the generator loss at a low-noise step raises the pixel discriminator's mean
    logit of the student's decoded samples (non-saturating softplus(-D)); a sign error fails here."""
    tiny = make_tiny("dit")
    obj, _ = _pixel_obj(tiny)
    step = next(s for s in range(50) if not obj.is_dm_step(s))
    batch = _batch(tiny, b=8)

    def mean_logit():
        rng = obj.dm.draws(batch, step, "generator")
        with torch.no_grad():
            x_hat, _ = obj.dm.generate(batch, step, grad=False, rng=rng)
            return float(obj._pixel_logits(x_hat, obj.nets["pixel_disc"]).mean())

    before = mean_logit()
    opt = torch.optim.SGD(trainable_parameters(obj, "generator"), lr=1e-2)
    loss, logs = obj.loss("generator", batch, step)
    loss.backward()
    opt.step()
    assert mean_logit() > before


def test_pixel_discriminator_learns_to_tell_real_from_student_images():
    """The heads' loss falls over fake-score updates with the student held fixed, and real images
    end with the higher logit: the discriminator separates decoded real latents from the student's
    decoded samples the right way round (swapped labels fail the last check)."""
    tiny = make_tiny("dit")
    obj, _ = _pixel_obj(tiny)
    opt = torch.optim.Adam(obj.nets["pixel_disc"].parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(16, *tiny.latent_shape, generator=g) * 0.3 + 1.0  # a distinct "data" distribution
    batch = {"cond": tiny.cond(16, g), "x0": real, "shape": (16, *tiny.latent_shape)}
    d = []
    for step in range(40):
        rng = obj.dm.draws(batch, step, "fake_score")
        with torch.no_grad():
            x_hat, _ = obj.dm.generate(batch, step, grad=False, rng=rng)
        loss, logs = obj._pixel_disc_loss(x_hat, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d.append(logs["gan_d"])
    with torch.no_grad():
        lf = float(obj._pixel_logits(x_hat, obj.nets["pixel_disc"]).mean())
        lr = float(obj._pixel_logits(real, obj.nets["pixel_disc"]).mean())
    print(
        f"pixel discriminator loss: {sum(d[:5]) / 5:.4f} -> {sum(d[-5:]) / 5:.4f}; logit real {lr:.3f}, student {lf:.3f}"
    )
    assert sum(d[-5:]) / 5 < 0.7 * sum(d[:5]) / 5
    assert lr > lf + 1.0  # real images get the higher logit (the labels the loss gives them)


@pytest.mark.parametrize(
    "kw, ctx_vae, key",
    [
        ({"gan_space": "pixels"}, True, "objective.gan_space"),
        ({"gan_space": "pixel", "pixel_backbone": "sam"}, True, "objective.pixel_backbone"),
        ({"gan_space": "pixel", "pixel_backbone": "no_such_module:f"}, True, "objective.pixel_backbone"),
        ({"gan_space": "pixel"}, False, "objective.pixel_backbone"),
        ({"gan_space": "pixel", "pixel_head_width": 0}, True, "objective.pixel_head_width"),
        ({"disc_lr_scale": 0.0}, True, "objective.disc_lr_scale"),
    ],
)
def test_bad_pixel_settings_name_the_key(kw, ctx_vae, key):
    from tests.tiny import tiny_vae

    tiny = make_tiny("dit")
    vae = tiny_vae(channels=1, latent_channels=tiny.latent_shape[0]) if ctx_vae else None
    with pytest.raises(ValueError, match=key):
        build_objective("flash_dmd", {"guidance": 3.0, **kw}, tiny.denoiser, _ctx(tiny, vae=vae))


def test_pixel_discriminator_runs_through_the_entry_point_and_its_heads_are_checkpointed(tmp_path):
    """A Flash-DMD run with gan_space pixel on a teacher with a VAE: the heads train in the
    fake-score group, are saved with the checkpoint (the VAE backbone is not), and the run resumes."""
    from safetensors.torch import load_file

    from fewstep.config import config_from_dict
    from fewstep.training.bundle import vae_decoder
    from fewstep.training.loop import run
    from tests.dist.bundles import real_data_bundle
    from tests.tiny import tiny_vae

    tiny = make_tiny("dit", seed=0)
    vae = tiny_vae(channels=1, latent_channels=tiny.latent_shape[0]).requires_grad_(False)
    bundle = real_data_bundle(tiny, 20, decode=vae_decoder(vae), vae=vae)
    vae_before = {k: v.clone() for k, v in vae.state_dict().items()}

    def cfg(steps, **kw):
        return config_from_dict(
            {
                **kw,
                "name": "flash-pixel",
                "output_dir": str(tmp_path / "run"),
                "steps": steps,
                "objective": {
                    "name": "flash_dmd",
                    "guidance": 2.0,
                    "fake_updates_per_generator": 2,
                    "gan_space": "pixel",
                },
                "data": {"batch_size": 2, "real_data": True},
                "log": {"sample_every": 0, "trackers": [], "progress": False},
                "checkpoint": {"every": 2},
            }
        )

    res = run(cfg(3), teacher=bundle)
    assert res.steps == 3 and res.skipped == 0
    ckpts = sorted((tmp_path / "run").rglob("*.safetensors"))
    saved = {}
    for f in ckpts:
        saved.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    assert any("pixel_disc" in k for k in saved), sorted(saved)[:20]
    assert not any("encoder.conv_in" in k or "mid_block.resnets" in k for k in saved)  # the VAE backbone is not saved
    res = run(cfg(5, resume="latest"), teacher=bundle)  # resumes from the checkpoint at step 2
    assert res.steps == 5 and res.skipped == 0
    assert all(torch.equal(vae_before[k], v) for k, v in vae.state_dict().items())


def test_disc_lr_scale_gives_the_heads_their_own_learning_rate():
    """objective.disc_lr_scale puts the discriminator heads in their own parameter group of the
    fake-score optimizer at that multiple of its learning rate; the fake score keeps the group's.
    One AdamW step then moves the heads about that many times further than at scale 1."""
    from fewstep.training.build import _param_groups

    tiny = make_tiny("dit")

    def step_sizes(scale):
        obj, _ = _pixel_obj(tiny, disc_lr_scale=scale)
        named = [(f"{r}.{n}", p) for r in obj.groups["fake_score"] for n, p in obj.nets[r].named_parameters()]
        named = [(n, p) for n, p in named if p.requires_grad]
        groups = _param_groups([p for _, p in named], [n for n, _ in named], obj.lr_scales, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
        heads = [p.detach().clone() for p in obj.nets["pixel_disc"].parameters()]
        loss, _ = obj.loss("fake_score", _batch(tiny, b=4), 0)
        loss.backward()
        opt.step()
        moved = sum(float((p - q).abs().sum()) for p, q in zip(obj.nets["pixel_disc"].parameters(), heads))
        return obj, opt, moved

    obj1, opt1, moved1 = step_sizes(1.0)
    assert obj1.lr_scales == {} and len(opt1.param_groups) == 1
    obj10, opt10, moved10 = step_sizes(10.0)
    assert obj10.lr_scales == {"pixel_disc": 10.0}
    assert [g["lr"] for g in opt10.param_groups] == [1e-3, pytest.approx(1e-2)]
    assert {id(p) for p in opt10.param_groups[1]["params"]} == {id(p) for p in obj10.nets["pixel_disc"].parameters()}
    assert 8.0 < moved10 / moved1 < 12.0
