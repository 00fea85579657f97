"""`precision.compile`: backbones compiled in place give the same outputs and gradients, keep their
state-dict keys, and a backbone that does not compile says so in one line and runs eagerly.
(The eager dynamo backend keeps these tests fast; inductor is what a run uses.)"""

from __future__ import annotations

import torch

from fewstep.training.compile import compile_backbones
from tests.tiny import make_tiny


def _io(tiny):
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, *tiny.latent_shape), generator=g), tiny.cond(2, g)


def _out_and_grads(den, x, cond):
    for p in den.parameters():
        p.grad = None
    out = den(x, 0.5, cond)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in den.parameters() if p.grad is not None]


def test_compiled_backbone_gives_the_same_outputs_and_gradients():
    tiny = make_tiny("dit", seed=0)
    den = tiny.denoiser
    den.requires_grad_(True)
    x, cond = _io(tiny)
    keys = list(den.state_dict())
    ref, ref_g = _out_and_grads(den, x, cond)
    said = []
    assert compile_backbones([den, den], say=said.append, backend="eager") == [den.backbone]  # once per backbone
    assert den.backbone._compiled_call_impl is not None and not said
    out, g = _out_and_grads(den, x, cond)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert len(g) == len(ref_g) > 0
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(den.state_dict()) == keys  # checkpoints stay interchangeable with eager runs
    assert den.backbone._compiled_call_impl is not None  # still compiled


def test_a_backbone_that_does_not_compile_runs_eagerly_with_one_line():
    def failing_backend(gm, example_inputs):
        raise RuntimeError("this backend compiles nothing\nsecond line")

    tiny = make_tiny("dit", seed=0)
    den = tiny.denoiser
    x, cond = _io(tiny)
    with torch.no_grad():
        ref = den(x, 0.5, cond)
    said = []
    compile_backbones([den], say=said.append, backend=failing_backend)
    with torch.no_grad():
        out = den(x, 0.5, cond)
        again = den(x, 0.5, cond)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("precision.compile: DiTTransformer2DModel does not compile")
    assert "this backend compiles nothing" in said[0] and "runs eagerly" in said[0]
    assert den.backbone._compiled_call_impl is None


def test_an_exception_the_model_raises_on_purpose_is_not_a_compile_failure():
    """E.g. the GAN tap stops the fake score's pass after its feature block by raising."""

    class Stop(Exception):
        pass

    def stop(module, args, output):
        raise Stop("features captured")

    tiny = make_tiny("dit", seed=0)
    den = tiny.denoiser
    x, cond = _io(tiny)
    said = []
    compile_backbones([den], say=said.append, backend="eager")
    handle = den.backbone.transformer_blocks[0].register_forward_hook(stop)
    with torch.no_grad():
        try:
            den(x, 0.5, cond)
            raise AssertionError("the hook's exception was swallowed")
        except Stop:
            pass
    handle.remove()
    assert not said and den.backbone._compiled_call_impl is not None  # still compiled, nothing printed
