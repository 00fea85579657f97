"""The replay check: a pipeline's own sequence of scheduler calls run around a smooth synthetic
network, to compare against `fewstep.samplers.sample` on the same noise."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ._common import ExportError
from .candidates import _Candidate
from .drives import Drive


def _toy_output(x: Tensor, timestep: Tensor | float) -> Tensor:
    """A smooth synthetic network output that depends on the sample and (strongly) on the
    timestep, so a wrong timestep, scale or noise shows up in the replay."""
    ts = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).float()
    if ts.numel() == 1:
        ts = ts.expand(x.shape[0])
    c = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1, 1)
    return 0.8 * torch.tanh(x.float()) + 0.3 * torch.sin(0.013 * ts.view(-1, 1, 1, 1) + c)


class _ToyDenoiser:
    """What `fewstep.samplers.sample` needs: a call returning x0, and `.path`."""

    def __init__(self, path):
        self.path = path

    def __call__(self, x_t, t, cond=None, guidance=1.0, output="x0"):
        from ..paths import _as_t

        tt = _as_t(t, x_t)
        out = _toy_output(x_t, self.path.timestep(tt))
        return self.path.to_x0_eps(x_t, out, tt)[0]


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def replay_pipeline(
    drive: Drive,
    scheduler,
    steps: int,
    call_kwargs: dict[str, Any],
    model: Callable,
    noise: Tensor,
    seed: int,
    patch: bool = False,
) -> tuple[Tensor, list[float]]:
    """Run a scheduler the way the pipeline class of `drive` does (timesteps, noise scale, model
    input scaling, step arguments, fresh-noise source) around `model(x, timestep)`. Returns the
    final sample and the timesteps the network was fed. Uses and restores torch's global RNG."""
    import numpy as np

    kw = dict(call_kwargs)
    if drive.flux_sigmas:
        sig = kw.pop("sigmas", None)
        sig = np.linspace(1.0, 1 / steps, steps) if sig is None else sig
        scheduler.set_timesteps(sigmas=sig, mu=0.0)
    elif "timesteps" in kw:
        scheduler.set_timesteps(timesteps=kw.pop("timesteps"))
    elif "sigmas" in kw:
        scheduler.set_timesteps(sigmas=kw.pop("sigmas"))
    else:
        scheduler.set_timesteps(steps)
    if kw:
        raise ExportError(f"replay: unknown call arguments {sorted(kw)}")
    if drive.begin_index and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    x = noise.float() * (scheduler.init_noise_sigma if drive.init_sigma else 1.0)
    step_kw: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(seed)
    if drive.step_generator and _accepts(scheduler.step, "generator"):
        step_kw["generator"] = gen
    if drive.step_generator and _accepts(scheduler.step, "eta"):
        step_kw["eta"] = 0.0
    fed = []
    n = len(scheduler.timesteps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for t in scheduler.timesteps:
            if drive.scale_input:
                if not hasattr(scheduler, "scale_model_input"):
                    if not patch:
                        raise AttributeError(f"{type(scheduler).__name__} has no scale_model_input")
                    xin = x
                else:
                    xin = scheduler.scale_model_input(x, t)
            else:
                xin = x
            fed.append(float(t))
            out = model(xin, t)
            res = scheduler.step(out, t, xin if drive.step_on_scaled else x, return_dict=False, **step_kw)
            x = res[drive.one_step_output if n == 1 else 0].float()
    return x, fed


def _probe(
    drive: Drive, cand: _Candidate, path, times: list[float], renoise: str, shape=(2, 3, 4, 4), seed: int = 1234
) -> tuple[float, list[float], dict[str, Any]]:
    """Max error, relative to the sample's range, of the replayed pipeline against fewstep's
    sampler for one schedule; also the fed timesteps and the call kwargs."""
    import diffusers

    from ..samplers import initial_noise, sample

    kwargs = cand.kwargs(times) if cand.kwargs is not None else {}
    if any(isinstance(v, str) for v in kwargs.values()):
        raise ExportError(next(v for v in kwargs.values() if isinstance(v, str)))
    sched = getattr(diffusers, cand.cls).from_config(cand.config)
    noise = initial_noise(shape, torch.Generator().manual_seed(seed))
    ref = sample(
        _ToyDenoiser(path), noise, None, times, renoise=renoise, generator=torch.Generator().manual_seed(seed + 1)
    )
    got, fed = replay_pipeline(
        drive, sched, len(times) - 1, kwargs, _toy_output, noise, seed + 1, patch=cand.patch is not None
    )
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf, fed, kwargs
    err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    return err, fed, kwargs


def _lcm_boundary(cand: _Candidate, timesteps: list[float]) -> dict[str, Any]:
    """LCMScheduler's c_skip / c_out at each timestep, with the configured and the default scaling."""

    def scal(s: float, ts: float) -> tuple[float, float]:
        u = ts * s
        return 0.25 / (u * u + 0.25), u / math.sqrt(u * u + 0.25)

    s = float(cand.config["timestep_scaling"])
    rows = []
    for t in timesteps:
        cs, co = scal(s, t)
        cs10, co10 = scal(10.0, t)
        rows.append(
            {"timestep": t, "c_skip": cs, "c_out": co, "c_skip_at_default_10": cs10, "c_out_at_default_10": co10}
        )
    return {
        "timestep_scaling": s,
        "steps": rows,
        "max_c_skip": max(r["c_skip"] for r in rows),
        "max_one_minus_c_out": max(1 - r["c_out"] for r in rows),
    }


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Probing runs schedules a route cannot represent: keep their warnings out of the log."""
    import warnings

    import numpy as np
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(level)
