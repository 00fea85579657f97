"""DMD2's GAN head at its true cost: a features-only pass ends after the tapped layer and gives
the features (and losses, and gradients) of the complete pass; the generator's GAN term reaches
the student only; `gan_features: teacher` trains the head only."""

from __future__ import annotations

import pytest
import torch

from fewstep.objectives._maths import dm_gradient
from fewstep.objectives.dmd import DMDParams, build, context
from fewstep.objectives.gan import feature_layer, generator_gan_loss
from tests.tiny import make_tiny


def _setup(family: str = "unet", seed: int = 0, **kw):
    tiny = make_tiny(family, seed=seed)
    params = DMDParams(gan=True, guidance=kw.pop("guidance", 2.0), fake_updates_per_generator=1, **kw)
    obj = build(params, tiny.denoiser, context(latent_shape=tiny.latent_shape, has_real_data=True))
    with torch.no_grad():  # a head and fake score that are not at their initial values
        for p in [*obj.nets["disc"].parameters(), *obj.nets["fake"].parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    b = 3
    batch = {
        "cond": tiny.cond(b, g),
        "x0": torch.randn((b, *tiny.latent_shape), generator=g),
        "shape": (b, *tiny.latent_shape),
    }
    return tiny, obj, batch


def _grads(obj, loss) -> dict[str, list[torch.Tensor | None]]:
    for net in obj.nets.values():
        net.zero_grad(set_to_none=True)
    loss.backward()
    out = {r: [None if p.grad is None else p.grad.clone() for p in n.parameters()] for r, n in obj.nets.items()}
    for net in obj.nets.values():
        net.zero_grad(set_to_none=True)
    return out


def _assert_same_grads(a, b):
    for role in a:
        for ga, gb in zip(a[role], b[role]):
            assert (ga is None) == (gb is None), role
            if ga is not None:
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=role)


# ---- the early exit ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["unet", "sdxl", "dit"])
def test_early_exit_gives_the_full_pass_features_and_skips_the_layers_after_the_tap(family):
    tiny, obj, batch = _setup(family)
    bb = obj.nets["fake"].backbone
    ran: list[str] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: ran.append(n)) for n, m in bb.named_modules() if n]
    seen = []  # the tapped layer's output, read by a hook of its own (run before the tap's)
    layer, _ = feature_layer(bb)
    hooks.append(layer.register_forward_hook(lambda m, a, o: seen.append(o), prepend=True))
    x, t = torch.randn(3, *tiny.latent_shape), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        obj.nets["fake"](x, t, batch["cond"], output="native")  # the complete pass
        full, full_ran = seen[-1], list(ran)
        full = full[-1] if isinstance(full, tuple) else full
        ran.clear()
        early, early_ran = obj._features(x, t, batch["cond"], trains=False), list(ran)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    # the early pass ran exactly the full pass's layers up to the tap, then stopped
    assert early_ran == full_ran[: len(early_ran)] and len(early_ran) < len(full_ran)
    assert full_ran[-1] not in early_ran  # the output layer never ran
    obj.tap.early_exit = False  # the switch sharded runs use: the same features from a whole pass
    with torch.no_grad():
        torch.testing.assert_close(obj._features(x, t, batch["cond"], trains=False), full, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # defaults: the DSM pass gives the fake samples' features
        dict(gan_t_min=0.1, gan_t_max=0.9),  # the GAN's own draws: a features-only pass for both
        dict(gan_t_min=0.02, gan_t_max=0.98),  # the generator's GAN term on the DM pass
        dict(gan_features="teacher"),
        dict(gan_features="teacher", guidance=1.0, gan_t_min=0.02, gan_t_max=0.98),
    ],
    ids=["defaults", "own-draws", "on-dm-pass", "teacher", "teacher-on-dm-pass"],
)
def test_early_exit_leaves_losses_and_gradients_unchanged(kw):
    """Both phases, with the early exit on and off at the same random draws: the same losses and
    the same gradients on every network."""
    _, obj, batch = _setup("unet", **kw)
    for phase in ("fake_score", "generator"):
        res = {}
        for early in (True, False):
            obj.tap.early_exit = early
            torch.manual_seed(7)
            loss, logs = obj.loss(phase, batch, 0)
            res[early] = (loss.detach(), logs, _grads(obj, loss))
        torch.testing.assert_close(res[True][0], res[False][0], rtol=1e-5, atol=1e-7)
        key = "gan_d" if phase == "fake_score" else "gan_g"
        assert res[True][1][key] == pytest.approx(res[False][1][key], rel=1e-5)
        _assert_same_grads(res[True][2], res[False][2])


# ---- the generator's GAN term ----------------------------------------------------------------------
@pytest.mark.parametrize("features", ["fake_score", "teacher"])
def test_generator_gan_term_reaches_the_student_only_with_the_plain_gradient(features):
    """The generator's loss leaves no gradient on the fake score, the head or the teacher, and its
    GAN term gives the student exactly the gradient of softplus(-D) backpropagated through the
    complete, unfrozen networks (a sign or scale error in the input-gradient stand-in fails)."""
    _, obj, batch = _setup("unet", gan_features=features)
    torch.manual_seed(3)
    loss, _ = obj.loss("generator", batch, 0)
    grads = _grads(obj, loss)
    for role in ("fake", "disc", "teacher"):
        assert all(g is None for g in grads[role]), f"the generator phase computed gradients for {role}"
    assert any(g is not None and g.abs().sum() > 0 for g in grads["student"])

    student = list(obj.nets["student"].parameters())
    rng = obj.draws(batch, 0, "generator")
    x_hat, _ = obj.generate(batch, 0, True, rng)
    drawn = obj._draw(x_hat, obj.p.gan_t_min, obj.p.gan_t_max, rng)
    term, adv = obj._gan_generator(x_hat, batch["cond"], None, drawn)
    got = torch.autograd.grad(term, student, retain_graph=True)
    x_n = obj.path.add_noise(x_hat, drawn[1], drawn[0])
    adv_ref = generator_gan_loss(obj._disc_logits(x_n, drawn[0], batch["cond"])[1])
    ref = torch.autograd.grad(adv_ref, student)
    assert float(term.detach()) == pytest.approx(float(adv_ref), rel=1e-5) and float(adv) == pytest.approx(
        float(adv_ref), rel=1e-5
    )
    assert sum(r.abs().sum() for r in ref) > 0
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("features", ["fake_score", "teacher"])
def test_gan_term_on_the_dm_pass_equals_the_two_terms_apart(features):
    """When the GAN draws like the DM term, one pass gives both: the same DM gradient and the same
    GAN term (value and student gradient) as the two computed apart at the same draws."""
    _, obj, batch = _setup("unet", gan_features=features, guidance=1.0, gan_t_min=0.02, gan_t_max=0.98)
    assert obj._gan_on_dm_pass(1.0) and (features == "fake_score") == obj._gan_on_dm_pass(2.0)
    student = list(obj.nets["student"].parameters())
    rng = obj.draws(batch, 0, "generator")
    x_hat, _ = obj.generate(batch, 0, True, rng)
    drawn = obj._draw(x_hat, obj.p.dm_t_min, obj.p.dm_t_max, rng)
    x0_real, x0_fake, term, adv = obj._dm_x0_and_gan(x_hat, batch["cond"], 1.0, None, drawn)
    g = dm_gradient(x_hat, x0_real, x0_fake)
    g_ref = obj._dm_grad(x_hat, batch["cond"], 1.0, None, drawn)
    term_ref, adv_ref = obj._gan_generator(x_hat, batch["cond"], None, drawn)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert float(adv) == pytest.approx(float(adv_ref), rel=1e-5)
    for a, r in zip(torch.autograd.grad(term, student, retain_graph=True), torch.autograd.grad(term_ref, student)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)


# ---- the teacher-feature head ------------------------------------------------------------------------
def test_teacher_features_train_the_head_only():
    """gan_features: teacher: the head reads the frozen teacher's tapped features; in the fake-score
    update the head's loss moves the head and nothing else (the fake score's gradient is its DSM
    loss's alone), and the teacher gets no gradient in either phase."""
    tiny, obj, batch = _setup("unet", gan_features="teacher")
    teacher_bb, fake_bb = obj.nets["teacher"].backbone, obj.nets["fake"].backbone
    x, t = torch.randn(3, *tiny.latent_shape), torch.tensor([0.3, 0.6, 0.8])
    seen = {}
    h = teacher_bb.mid_block.register_forward_hook(lambda m, a, o: seen.setdefault("f", o), prepend=True)
    with torch.no_grad():
        feats = obj._features(x, t, batch["cond"], trains=False)
    h.remove()
    torch.testing.assert_close(feats, seen["f"], rtol=0, atol=0)
    with obj.tap.capture(), torch.no_grad():  # the fake score's passes do not feed the head
        obj.nets["fake"](x, t, batch["cond"])
    assert obj.tap.features is None and fake_bb is not teacher_bb

    grads = {}
    for w in (obj.p.gan_disc_weight, 0.0):
        obj.p.gan_disc_weight = w
        torch.manual_seed(9)
        loss, logs = obj.loss("fake_score", batch, 0)
        grads[w] = _grads(obj, loss)
        assert logs["gan_d"] > 0
    w = max(grads)
    assert all(g is None for g in grads[w]["teacher"])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[w]["disc"])
    for a, b in zip(grads[w]["fake"], grads[0.0]["fake"]):  # the head's loss adds nothing to the fake score
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gan_features_key_is_checked():
    with pytest.raises(ValueError, match="objective.gan_features='student'"):
        DMDParams(gan=True, gan_features="student").validate()
