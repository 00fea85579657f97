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


@pytest.fixture(scope="session")
def equivalence_runs(tmp_path_factory):
    """The equivalence cases (tests/dist/equivalence.py) trained in this process with the whole
    global batch at once, each once per session: `get(name)` -> (RunResult, trained tensors).
    `.latents` is the real-latents file the cases read."""
    from tests.dist import equivalence as eq

    root = tmp_path_factory.mktemp("equivalence")
    latents = eq.real_latents(root / "latents.safetensors")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            from fewstep.training import run

            res = run(eq.case_config(name, root / name, latents), teacher=eq.teacher(name))
            cache[name] = (res, eq.trained_state(res.objective))
        return cache[name]

    get.latents = latents
    return get
