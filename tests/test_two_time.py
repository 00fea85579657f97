"""The second time input of BOOT and TwinFlow on every backbone family: zero at start, zero where
its mode says, and folded back into the stock time embedding for export (same class, same keys,
same output at the sampling setting)."""

from __future__ import annotations

import pytest
import torch

from fewstep.denoiser import copy_denoiser
from fewstep.objectives._two_time import TwoTimeDenoiser
from tests.tiny import FAMILIES, make_tiny


@pytest.mark.parametrize("mode", ["trajectory", "gap"])
@pytest.mark.parametrize("family", FAMILIES)
def test_second_time_starts_at_zero_and_folds_for_export(family, mode):
    tiny = make_tiny(family, seed=0)
    d = copy_denoiser(tiny.denoiser)
    s = TwoTimeDenoiser(d.backbone, d.path, d.conditioner, mode)
    x, c = torch.randn(2, *tiny.latent_shape), tiny.cond(2)
    t = 0.7
    with torch.no_grad():
        ref = tiny.denoiser(x, t, c)
        torch.testing.assert_close(s(x, t, c), ref, rtol=1e-5, atol=1e-5)  # W = 0: the teacher
        extra = [m.extra.weight for m in s.backbone.modules() if hasattr(m, "extra")]
        assert extra
        for w in extra:
            w.normal_(0, 0.05)
        moved = s(x, t, c)
        assert not torch.allclose(moved, ref, atol=1e-4)
        # the term vanishes at s = 1 (trajectory) or r = t (gap)
        torch.testing.assert_close(s(x, t, c, target=1.0 if mode == "trajectory" else t), ref, rtol=1e-5, atol=1e-5)
        solo = s.standalone()
        assert type(solo.backbone) is type(tiny.backbone)
        assert solo.backbone.state_dict().keys() == tiny.backbone.state_dict().keys()
        torch.testing.assert_close(solo(x, t, c), moved, rtol=1e-4, atol=1e-4)
