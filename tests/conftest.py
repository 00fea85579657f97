"""Test defaults: one CPU thread (the suite shares a small machine) and a fixed seed per test,
so every test is reproducible on its own and in any order."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_seed():
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    yield
