"""NCT: a control adapter on a frozen one-step generator, trained without real images."""

from __future__ import annotations

import pytest
import torch

from fewstep.controls import CONTROLS, AdaptedGenerator, ControlAdapter, layer_name
from fewstep.denoiser import Denoiser
from fewstep.objectives.gan import feature_layer
from fewstep.objectives.nct import NCT, NCTConfig
from fewstep.paths import VPPath
from tests.tiny import make_tiny


def _generator(sample_zero: bool = False, family: str = "dit"):
    """The tiny DiT read as a one-step generator at t0 = 0.5, predicting the sample (its output
    is the image). With `sample_zero` its output layer is zero, so every output is 0: a generator
    that satisfies any control computed from its own outputs."""
    torch.manual_seed(0)
    tiny = make_tiny(family)
    den = tiny.denoiser
    if sample_zero:
        with torch.no_grad():
            for p in den.backbone.proj_out_2.parameters():
                p.zero_()
    den = Denoiser(den.backbone, VPPath(den.path.alphas_cumprod, "sample"), den.conditioner)
    den.requires_grad_(False)
    return den, tiny


def _nct(den, tiny, control="downsample", **kw):
    layer, width = feature_layer(den.backbone)
    adapter = ControlAdapter(tiny.latent_shape[0], width, width=16)
    adapted = AdaptedGenerator(den, layer_name(den.backbone, layer), adapter)
    params = NCTConfig(control=control, **kw)
    return NCT(adapted, den, params, 0.5, lambda x: x, {"times": [0.5, 0.0], "renoise": "fresh"})


def _batch(tiny, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "cond": tiny.cond(b, g),
        "shape": (b, *tiny.latent_shape),
        "index": torch.arange(b),
        "global_batch_size": b,
    }


@pytest.mark.parametrize("consistency", ["output", "residual"])
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_nct_loss_is_zero_when_the_adapter_ignores_a_satisfied_control(control, consistency):
    den, tiny = _generator(sample_zero=True)
    obj = _nct(den, tiny, control, consistency=consistency)
    loss, logs = obj.loss("generator", _batch(tiny), 0)
    assert loss.item() == 0.0 and logs["noise_consistency"] == 0.0 and logs["boundary"] == 0.0


@pytest.mark.parametrize("consistency", ["output", "residual"])
def test_nct_terms_react_to_an_unsatisfied_control_and_to_an_acting_adapter(consistency):
    den, tiny = _generator(family="unet")  # a conv net: outputs depend on the noise, so free noise misses c
    obj = _nct(den, tiny, consistency=consistency)
    loss, logs = obj.loss("generator", _batch(tiny), 0)
    assert logs["boundary"] == 0.0 and logs["control"] > 1e-4
    if consistency == "output":
        # the paper's form: the untouched generator's outputs differ between the pair's noises
        # (G(z_s) against G(z_s')), which the adapter must remove
        assert logs["noise_consistency"] > 1e-4
    else:
        assert logs["noise_consistency"] == 0.0  # the adapter changes nothing yet
    with torch.no_grad():
        obj.nets["student"].adapter.proj.bias.fill_(0.3)
    logs = obj.loss("generator", _batch(tiny), 0)[1]
    assert logs["boundary"] > 1e-4  # it changes outputs whose noise already fits the control


def test_nct_refuses_real_data():
    den, tiny = _generator()
    obj = _nct(den, tiny)
    b = _batch(tiny)
    b["x0"] = torch.zeros(b["shape"])
    with pytest.raises(ValueError, match="data-free"):
        obj.loss("generator", b, 0)
    from fewstep.objectives.nct import build
    from fewstep.objectives.registry import BuildContext

    with pytest.raises(ValueError, match="data-free"):
        build({"generator": "runs/x"}, den, BuildContext(latent_shape=(4, 8, 8), has_real_data=True))


def test_nct_learns_to_follow_the_control():
    """The control error of free noise (z independent of the control) falls; the generator's
    weights do not move. A flipped sign of the control term makes it rise instead."""
    den, tiny = _generator()
    obj = _nct(den, tiny, control="downsample", nc_weight=0.1, boundary_weight=0.1, control_weight=10.0)
    torch.manual_seed(0)
    adapted = obj.nets["student"]
    gen_before = [p.clone() for p in den.parameters()]
    g = torch.Generator().manual_seed(7)
    cond = tiny.cond(32, g)
    with torch.no_grad():
        want = CONTROLS["downsample"](adapted(torch.randn(32, *tiny.latent_shape, generator=g), 0.5, cond))
        z_free = torch.randn(32, *tiny.latent_shape, generator=g)

    def err():
        with torch.no_grad():
            out = adapted(z_free, 0.5, {**cond, "control": want})
            return ((CONTROLS["downsample"](out) - want) ** 2).mean().item()

    before = err()
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for step in range(100):
        loss, _ = obj.loss("generator", _batch(tiny, 16, seed=100 + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = err()
    assert after < 0.75 * before, (before, after)  # measured: 0.026 -> 0.017
    assert all(torch.equal(a, b) for a, b in zip(gen_before, den.parameters()))


@pytest.mark.parametrize("consistency", ["output", "residual"])
def test_nct_noise_consistency_step_moves_toward_its_target(monkeypatch, consistency):
    """A small gradient step on the noise-consistency term alone brings the adapted output at
    level s (or, for the residual form, the control's effect on it) closer to the (stop-gradient)
    target it had before the step: the term's sign. A flipped sign moves it away."""
    import fewstep.objectives.nct as nct

    den, tiny = _generator()
    obj = _nct(
        den, tiny, control="downsample", nc_weight=1.0, boundary_weight=0.0, control_weight=0.0, consistency=consistency
    )
    adapted = obj.nets["student"]
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that already acts (the zero-initialised one gives a zero term)
        for p in adapted.adapter.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    seen = []
    real_mse = nct._mse
    monkeypatch.setattr(nct, "_mse", lambda a, b: seen.append((a, b.detach())) or real_mse(a, b))
    batch = _batch(tiny, 16, seed=3)
    loss, _ = obj.loss("generator", batch, 7)
    effect, target = seen[0]  # the first term: (out_s, its target) or (out_s - base_s, r_s2)
    before = float(real_mse(effect.detach(), target))
    assert before > 0
    loss.backward()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.grad is not None:
                p.sub_(1.0 * p.grad)
    seen.clear()
    obj.loss("generator", batch, 7)  # the same step and batch: the same draws
    after = float(real_mse(seen[0][0].detach(), target))
    print(f"LEARN nct ({consistency}) noise consistency against the pre-step target {before:.4g} -> {after:.4g}")
    assert after < 0.998 * before, (before, after)


def test_adapter_on_every_block_starts_as_the_generator_and_reaches_each_block():
    """`adapter_layers: blocks`: one projection per block over a shared trunk (a UNet: its down
    blocks and mid block, of different widths). At zero initialisation the adapted generator is
    the generator; a bias on one block's slice of the projection enters at that block: the block
    before it is untouched, the blocks after it and the output change."""
    from fewstep.controls import adapter_layers

    den, tiny = _generator(family="unet")
    layers = adapter_layers(den.backbone, "blocks")
    names = [n for n, _ in layers]
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block"]
    adapter = ControlAdapter(tiny.latent_shape[0], [w for _, w in layers], width=8)
    adapted = AdaptedGenerator(den, names, adapter)
    g = torch.Generator().manual_seed(1)
    z, cond = torch.randn(4, *tiny.latent_shape, generator=g), tiny.cond(4, g)
    ccond = {**cond, "control": torch.randn(4, tiny.latent_shape[0], 8, 8, generator=g)}
    base = adapted(z, 0.5, cond)
    assert torch.equal(adapted(z, 0.5, ccond), base)

    def raw_outputs(c):  # each block's own output, before any residual is added to it
        seen = {}
        hooks = [
            den.backbone.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: seen.__setitem__(n, (out[0] if isinstance(out, tuple) else out).clone())
            )
            for n in names
        ]
        try:
            return adapted(z, 0.5, c), seen
        finally:
            for h in hooks:
                h.remove()

    _, before = raw_outputs(cond)
    lo = layers[0][1]
    with torch.no_grad():
        adapter.proj.bias[lo : lo + layers[1][1]].fill_(0.5)  # down_blocks.1's slice only
    out, after = raw_outputs(ccond)
    assert not torch.allclose(out, base)
    assert torch.equal(after["down_blocks.0"], before["down_blocks.0"])
    assert torch.equal(after["down_blocks.1"], before["down_blocks.1"])  # its residual is added after it
    assert not torch.allclose(after["mid_block"], before["mid_block"])
    with pytest.raises(ValueError, match="adapter_layers"):
        adapter_layers(den.backbone, "everything")


def test_folded_adapter_keeps_where_in_its_patch_a_control_lies():
    """With a token grid the trunk's features are folded onto it (space to depth), so two
    controls that differ only in where a mark sits inside one token's patch reach that token
    differently; the trunk comes out on the grid."""
    torch.manual_seed(0)
    adapter = ControlAdapter(1, 16, width=8, size=32, grid=4)
    a, b = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    a[..., 9, 9] = 1.0  # both marks inside the patch of token (1, 1): pixels 8-15
    b[..., 14, 14] = 1.0
    ha, hb = adapter.trunk(a), adapter.trunk(b)
    assert ha.shape == (1, 8, 4, 4)
    assert not torch.allclose(ha[..., 1, 1], hb[..., 1, 1])
    assert ControlAdapter(1, 16, width=8, grid=4).config["grid"] == 4
    assert "grid" not in ControlAdapter(1, 16, width=8).config  # the pooled adapter, as exported before


def test_noise_levels_uniform_and_by_coupling():
    """`levels: uniform` (the default) draws s uniformly, s' = s - delta; `levels: coupling` draws
    the coupling sqrt(1 - s^2) uniformly and couples s' by delta more, so nearly free noise
    (coupling < 0.3) is drawn about 30% of the time instead of 4.6%."""
    from fewstep.objectives.nct import NCTConfig, noise_levels

    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    s, s2 = noise_levels(u, "uniform", 0.2)
    torch.testing.assert_close(s, u)
    torch.testing.assert_close(s2, (u - 0.2).clamp_min(0))
    s, s2 = noise_levels(u, "coupling", 0.2)
    a, a2 = (1 - s * s).sqrt(), (1 - s2 * s2).sqrt()
    torch.testing.assert_close(a, u, atol=1e-3, rtol=0)
    torch.testing.assert_close(a2, (u + 0.2).clamp_max(1.0), atol=1e-3, rtol=0)
    assert bool((s2 <= s + 1e-6).all())  # s' is the more coupled (less noised) side
    weak = float((a < 0.3).float().mean())
    weak_uniform = float(((1 - u * u).sqrt() < 0.3).float().mean())
    assert 0.28 < weak < 0.32 and weak_uniform < 0.06, (weak, weak_uniform)
    with pytest.raises(ValueError, match="objective.levels"):
        NCTConfig(generator="x", levels="nope").validate()
