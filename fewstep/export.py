"""`fewstep export`: a trained student as a stock diffusers pipeline folder that loads and samples
with no fewstep code.

    fewstep export --checkpoint runs/digits-dmd2 --out exports/digits-dmd2
    export_student("runs/digits-dmd2", "exports/digits-dmd2")          # the same from Python

    pipe = DiTPipeline.from_pretrained("exports/digits-dmd2")         # later, anywhere
    torch.manual_seed(0)                                              # fresh noise between steps
    images = pipe([3, 7], num_inference_steps=4, guidance_scale=1.0).images

The folder is the teacher's pipeline class with the teacher's other components (VAE, text
encoders, tokenizers) copied from its folder, the student's backbone weights, and a stock
scheduler configured so that the pipeline runs the student's own sampler: the times the student
was trained for and its re-noising rule (the run card's `sampling` entry).

How the scheduler is chosen. Every route is checked, not assumed: for each candidate
configuration the pipeline's own sequence of scheduler calls (`set_timesteps`, the initial noise
scale, `scale_model_input`, `step` with or without a generator, PixArt's one-step
`pred_original_sample`) is replayed against `fewstep.samplers.sample` on a smooth synthetic
network and the same noise; a step count is "supported" when the two agree to 1e-5 relative.
The candidates are
    VP path, fresh noise      LCMScheduler: default spacing (`original_inference_steps`) that
                              gives exactly the trained DDPM indices; `timestep_scaling` 1e4 makes
                              its boundary scalings exact (c_skip <= 2.5e-9 at index >= 1), except
                              for LCM students, which keep their own (the deviation is recorded)
    VP path, deterministic    DDIMScheduler, "trailing" spacing, final alpha 1
    flow path, fresh noise    FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), shift 1
                              and `shift_terminal` = the last time: linspace(1, t_last, n)
    flow path, deterministic  the same without stochastic sampling, the teacher's own scheduler
                              (same-schedule students), FlowMapEulerDiscreteScheduler
and, for pipelines whose __call__ takes them, the same schedulers with `timesteps=` / `sigmas=`
passed at call time (recorded in the card). Grids whose first time is not the last DDPM index
are reached by setting the scheduler's `num_train_timesteps` to that index + 1 and giving the
teacher's noise table as `trained_betas` (so e.g. TDM's [899, 674, 449, 224] is DDIM "trailing"
spacing over 900 steps). A schedule no route reproduces is refused with the reason. Known limits:
VP times between integer DDPM indices (e.g. sCM / TBCM angles mapped to a VP teacher) have no
stock scheduler; DiTPipeline cannot pass custom timesteps or sigmas, and calls
`scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks (the card gives the one-line
fix); SCMScheduler expects a TrigFlow F output and TrigFlow inputs, which VP / flow students do
not produce.

Writing is atomic: everything goes to a temporary folder beside `out`, renamed into place at the
end; a non-empty `out` is replaced only with `overwrite=True`, and never when it holds the run or
the teacher.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import UserError, one_line
from .weights_check import check_weights_folder

__all__ = ["ExportError", "ExportResult", "SchedulerPlan", "export_student", "plan_scheduler", "DRIVES",
           "CARD_NAME", "add_arguments", "run"]

CARD_NAME = "fewstep_card.json"
CARD_FORMAT = "fewstep-export/1"
RUN_CARD_NAMES = ("run_card.json", "card.json", "run.json")
PROBE_RTOL = 1e-5            # replayed pipeline vs fewstep sampler, relative to the sample's range
EXACT_TIMESTEP_SCALING = 1e4  # LCMScheduler boundary scalings: c_skip <= 0.25 / 1e8 at index >= 1
LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"


class ExportError(UserError):
    """A checkpoint, teacher or schedule that cannot be exported (the message says why)."""


# ---------------------------------------------------------------------------------------------
# how each pipeline class drives its scheduler (read from diffusers' __call__ of each class)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Drive:
    backbone: str                  # the component that holds the network ("transformer" / "unet")
    init_sigma: bool               # latents *= scheduler.init_noise_sigma
    scale_input: bool              # calls scheduler.scale_model_input
    step_generator: bool           # passes its `generator` (and eta=0) to scheduler.step when accepted
    call_kwargs: tuple[str, ...]   # schedule arguments its __call__ forwards to set_timesteps
    flux_sigmas: bool = False      # FluxPipeline: sigmas default to linspace(1, 1/n, n), mu always passed
    one_step_output: int = 0       # PixArt-alpha takes step(...)[1] (pred_original_sample) at one step
    begin_index: bool = False      # calls scheduler.set_begin_index(0) before the loop
    step_on_scaled: bool = False   # DiTPipeline passes the scale_model_input output to step as the sample
    conditioning: str = "text"     # "labels" or "text"
    lora: str | None = None        # the keyword of `save_lora_weights` for its backbone, if it loads LoRA


DRIVES: dict[str, Drive] = {
    "DiTPipeline": Drive("transformer", False, True, False, (), conditioning="labels", step_on_scaled=True),
    "StableDiffusionPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"), lora="unet_lora_layers"),
    "StableDiffusionXLPipeline": Drive("unet", True, True, True, ("timesteps", "sigmas"), begin_index=True,
                                       lora="unet_lora_layers"),
    "PixArtAlphaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas"), one_step_output=1,
                                 begin_index=True),
    "PixArtSigmaPipeline": Drive("transformer", True, True, True, ("timesteps", "sigmas")),
    "StableDiffusion3Pipeline": Drive("transformer", False, False, False, ("sigmas",),
                                      lora="transformer_lora_layers"),
    "FluxPipeline": Drive("transformer", False, False, False, ("sigmas",), flux_sigmas=True, begin_index=True,
                          lora="transformer_lora_layers"),
}

METHODS = {
    "dmd": "DMD (distribution matching distillation with a regression loss)",
    "dmd2": "DMD2 (distribution matching distillation, two time-scale update)",
    "decoupled_dmd": "Decoupled DMD (CFG augmentation + distribution matching)",
    "lcm": "LCM (latent consistency distillation)",
    "scm": "sCM (continuous-time consistency distillation, TrigFlow)",
    "tbcm": "TBCM (trajectory-backward consistency distillation, data-free sCM)",
    "tdm": "TDM (trajectory distribution matching)",
    "boot": "BOOT (data-free bootstrapping along the teacher's trajectory)",
    "twinflow": "TwinFlow (self-adversarial any-step flow, no frozen teacher)",
    "dsm": "DSM fine-tuning (denoising score matching on the teacher's own sampler)",
}


# ---------------------------------------------------------------------------------------------
# scheduler planning: candidates, the replay check, the choice
# ---------------------------------------------------------------------------------------------
@dataclass
class SchedulerPlan:
    """A stock scheduler configuration and what it reproduces.

    supported: {num_inference_steps: {"times", "timesteps", "call_kwargs", "max_rel_error"}} for
    every step count with known student times that this configuration reproduces.
    """

    scheduler_class: str
    config: dict[str, Any]
    supported: dict[int, dict[str, Any]]
    route: str                             # one line: what was chosen and why it is exact
    needs_patch: str | None = None         # a one-line fix the pipeline class needs, or None
    notes: list[str] = field(default_factory=list)
    boundary: dict[str, Any] | None = None  # LCMScheduler: c_skip / c_out per step

    def scheduler(self):
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_config(self.config)


@dataclass
class _Candidate:
    cls: str
    config: dict[str, Any]
    kwargs: Callable[[list[float]], dict[str, Any]] | None = None  # times -> call kwargs (custom routes)
    route: str = ""
    patch: str | None = None


def _vp_index(path, t: float) -> float:
    return t * path.num_train_timesteps - 1


def _vp_indices(path, times: Sequence[float]) -> list[int] | str:
    """The integer DDPM indices of times[:-1], or the reason they are not integers."""
    out = []
    for t in times[:-1]:
        i = _vp_index(path, t)
        if i < -1e-6 or abs(i - round(i)) > 1e-6:
            return (f"t={t:g} is DDPM index {i:.4f}, between integer timesteps (stock VP schedulers feed the "
                    "network integer timesteps and index their noise table with them)")
        out.append(int(round(i)))
    return out


def _vp_table_config(teacher_cfg: dict[str, Any], num_train: int) -> dict[str, Any]:
    """The teacher's noise table as scheduler keys; with `num_train` != its length, as
    `trained_betas` (the table a stock scheduler of the teacher's class computes)."""
    n = int(teacher_cfg.get("num_train_timesteps", 1000))
    keys = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr")
    if num_train == n:
        cfg = {k: teacher_cfg[k] for k in keys if k in teacher_cfg}
        cfg["num_train_timesteps"] = n
        return cfg
    return {"num_train_timesteps": int(num_train), "trained_betas": _teacher_betas(teacher_cfg),
            "rescale_betas_zero_snr": False}


def _teacher_betas(cfg: dict[str, Any]) -> list[float]:
    import diffusers

    cls = getattr(diffusers, str(cfg.get("_class_name", "")), None)
    betas = None
    if cls is not None:
        try:
            betas = getattr(cls.from_config(cfg), "betas", None)
        except Exception:  # noqa: BLE001 - fall back to fewstep's own table below
            betas = None
    if betas is None:
        from .paths import betas_for_schedule

        n = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        else:
            betas = betas_for_schedule(cfg.get("beta_schedule", "linear"), float(cfg.get("beta_start", 1e-4)),
                                       float(cfg.get("beta_end", 0.02)), n)
        if cfg.get("rescale_betas_zero_snr", False):
            from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

            betas = rescale_zero_terminal_snr(betas.float())
    return [float(b) for b in torch.as_tensor(betas).float().tolist()]


def _lcm_candidates(path, teacher_cfg, idx: list[int], scaling: float, pred: str) -> list[_Candidate]:
    """LCMScheduler configs whose default spacing may give `idx`: grid top = idx[0], skipping
    step k = (idx[0] + 1) / o for each divisor o."""
    top = idx[0] + 1
    out = []
    for o in range(1, top + 1):
        if top % o:
            continue
        cfg = {**_vp_table_config(teacher_cfg, top), "original_inference_steps": o, "timestep_scaling": scaling,
               "prediction_type": pred, "set_alpha_to_one": True, "clip_sample": False, "thresholding": False,
               "timestep_spacing": "leading", "steps_offset": 0}
        out.append(_Candidate("LCMScheduler", cfg, route=f"LCMScheduler default spacing (original_inference_steps={o}"
                              + (f", num_train_timesteps={top}" if top != path.num_train_timesteps else "") + ")"))
    return out


def _candidates(drive: Drive, path, teacher_cfg: dict[str, Any], times: list[float], renoise: str,
                objective: str | None, objective_params: dict[str, Any]) -> tuple[list[_Candidate], list[str]]:
    """Scheduler configurations that might reproduce `times` / `renoise`, best first, and the
    reasons routes were ruled out before trying."""
    from .paths import FlowPath, VPPath

    why: list[str] = []
    out: list[_Candidate] = []
    one_step = len(times) == 2
    kinds = {"fresh", "ddim"} if one_step else {renoise}   # one step never re-noises
    if isinstance(path, VPPath):
        idx = _vp_indices(path, times)
        if isinstance(idx, str):
            return [], [idx]
        pred = path.prediction_type
        if objective == "lcm":
            scaling = float(objective_params.get("timestep_scaling", 10.0))
        else:
            scaling = EXACT_TIMESTEP_SCALING
        top = idx[0] + 1
        ddim = _Candidate("DDIMScheduler", {**_vp_table_config(teacher_cfg, top), "prediction_type": pred,
                                            "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                            "clip_sample": False, "thresholding": False, "steps_offset": 0},
                          route=f"DDIMScheduler, trailing spacing over {top} steps, final alpha 1, eta 0")
        # the scheduler of the student's own re-noising rule first (a one-step student takes either)
        if renoise == "fresh":
            out += _lcm_candidates(path, teacher_cfg, idx, scaling, pred) + ([ddim] if "ddim" in kinds else [])
        else:
            out += [ddim] + (_lcm_candidates(path, teacher_cfg, idx, scaling, pred) if "fresh" in kinds else [])
        if "timesteps" in drive.call_kwargs:
            base = {**_vp_table_config(teacher_cfg, path.num_train_timesteps), "prediction_type": pred}
            if "fresh" in kinds:
                cfg = {**base, "original_inference_steps": path.num_train_timesteps, "timestep_scaling": scaling,
                       "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}
                out.append(_Candidate("LCMScheduler", cfg, kwargs=lambda ts: {"timesteps": _vp_indices(path, ts)},
                                      route="LCMScheduler with the timesteps passed at call time"))
            if "ddim" in kinds:
                cfg = {**base, "algorithm_type": "dpmsolver++", "solver_order": 1, "final_sigmas_type": "zero",
                       "lower_order_final": True, "thresholding": False, "use_karras_sigmas": False}
                out.append(_Candidate("DPMSolverMultistepScheduler", cfg,
                                      kwargs=lambda ts: {"timesteps": _vp_indices(path, ts)},
                                      route="first-order DPM-Solver++ (exactly DDIM) with the timesteps passed at "
                                            "call time"))
        return out, why
    if isinstance(path, FlowPath):
        if abs(path.timestep_scale - path.num_train_timesteps) > 1e-9:
            return [], [f"flow path feeds timestep = {path.timestep_scale:g} t, not num_train_timesteps t"]
        n_train = path.num_train_timesteps
        patch = None
        if drive.scale_input:
            patch = ("this pipeline calls scheduler.scale_model_input, which FlowMatchEulerDiscreteScheduler does not "
                     "define; after loading set `pipe.scheduler.scale_model_input = lambda sample, timestep: sample` "
                     "(the identity, what a flow scheduler's scaling is)")
        base = {"num_train_timesteps": n_train, "shift": 1.0, "use_dynamic_shifting": False,
                "invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False}
        last = float(times[-2])
        if abs(times[0] - 1.0) > 1e-12 and "sigmas" not in drive.call_kwargs:
            why.append(f"the schedule starts at t={times[0]:g}, and this pipeline passes no custom sigmas, so the "
                       "stock flow schedulers start at sigma 1")
        for kind in sorted(kinds, key=lambda k: k != renoise):
            stoch = kind == "fresh"
            if kind == "ddim" and abs(times[0] - 1.0) < 1e-12:
                out.append(_Candidate("FlowMapEulerDiscreteScheduler", {"num_train_timesteps": n_train, "shift": 1.0},
                                      route="FlowMapEulerDiscreteScheduler (Euler), sigmas linspace(1, 0, n + 1)"))
            if kind == "ddim" and "FlowMatch" in str(teacher_cfg.get("_class_name", "")) and \
                    not teacher_cfg.get("use_dynamic_shifting", False):
                cfg = {k: v for k, v in teacher_cfg.items() if not k.startswith("_")}
                cfg["stochastic_sampling"] = False
                out.append(_Candidate("FlowMatchEulerDiscreteScheduler", cfg, route="the teacher's own Euler "
                                      "scheduler (the student samples on the teacher's schedule)", patch=patch))
            if abs(times[0] - 1.0) < 1e-12:
                cfg = {**base, "stochastic_sampling": stoch, "shift_terminal": last if len(times) > 2 else None}
                name = ("stochastic " if stoch else "") + "FlowMatchEulerDiscreteScheduler, shift 1"
                out.append(_Candidate("FlowMatchEulerDiscreteScheduler", cfg, patch=patch,
                                      route=name + (f", shift_terminal {last:g} (sigmas linspace(1, {last:g}, n))"
                                                    if len(times) > 2 else "")))
            if "sigmas" in drive.call_kwargs:
                cfg = {**base, "stochastic_sampling": stoch, "shift_terminal": None}
                name = ("stochastic " if stoch else "") + "FlowMatchEulerDiscreteScheduler, shift 1"
                out.append(_Candidate("FlowMatchEulerDiscreteScheduler", cfg, patch=patch,
                                      kwargs=lambda ts: {"sigmas": [float(t) for t in ts[:-1]]},
                                      route=name + ", with the sigmas passed at call time"))
        return out, why
    return [], [f"{type(path).__name__} teachers have no stock scheduler route here"]


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
        from .paths import _as_t

        tt = _as_t(t, x_t)
        out = _toy_output(x_t, self.path.timestep(tt))
        return self.path.to_x0_eps(x_t, out, tt)[0]


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def replay_pipeline(drive: Drive, scheduler, steps: int, call_kwargs: dict[str, Any], model: Callable,
                    noise: Tensor, seed: int, patch: bool = False) -> tuple[Tensor, list[float]]:
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


def _probe(drive: Drive, cand: _Candidate, path, times: list[float], renoise: str,
           shape=(2, 3, 4, 4), seed: int = 1234) -> tuple[float, list[float], dict[str, Any]]:
    """Max error, relative to the sample's range, of the replayed pipeline against fewstep's
    sampler for one schedule; also the fed timesteps and the call kwargs."""
    import diffusers

    from .samplers import initial_noise, sample

    kwargs = cand.kwargs(times) if cand.kwargs is not None else {}
    if any(isinstance(v, str) for v in kwargs.values()):
        raise ExportError(next(v for v in kwargs.values() if isinstance(v, str)))
    sched = getattr(diffusers, cand.cls).from_config(cand.config)
    noise = initial_noise(shape, torch.Generator().manual_seed(seed))
    ref = sample(_ToyDenoiser(path), noise, None, times, renoise=renoise,
                 generator=torch.Generator().manual_seed(seed + 1))
    got, fed = replay_pipeline(drive, sched, len(times) - 1, kwargs, _toy_output, noise, seed + 1,
                               patch=cand.patch is not None)
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
        rows.append({"timestep": t, "c_skip": cs, "c_out": co, "c_skip_at_default_10": cs10,
                     "c_out_at_default_10": co10})
    return {"timestep_scaling": s, "steps": rows,
            "max_c_skip": max(r["c_skip"] for r in rows), "max_one_minus_c_out": max(1 - r["c_out"] for r in rows)}


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


def _custom_kwargs(drive: Drive, path, times: list[float]) -> dict[str, Any] | None:
    """The schedule as call arguments, where the pipeline's __call__ forwards them."""
    from .paths import FlowPath, VPPath

    if isinstance(path, VPPath) and "timesteps" in drive.call_kwargs:
        idx = _vp_indices(path, times)
        return {"timesteps": idx} if isinstance(idx, list) else None
    if isinstance(path, FlowPath) and "sigmas" in drive.call_kwargs:
        return {"sigmas": [float(t) for t in times[:-1]]}
    return None


def _choose(drive: Drive, cands: list[_Candidate], path, schedules: dict[int, list[float]], trained: int,
            renoise: str, first: bool = False) -> tuple[tuple | None, list[str]]:
    """The best candidate that reproduces the trained step count: needing no patch, then no call
    arguments at the trained step count, then reproducing the most step counts, then first listed
    (`first`: the first that reproduces it). Another step count that the default spacing misses is
    retried with its times as call arguments."""
    best: tuple | None = None
    tried: list[str] = []
    for ci, cand in enumerate(cands):
        supported: dict[int, dict[str, Any]] = {}
        for n, ts in sorted(schedules.items()):
            attempts = [cand]
            if cand.kwargs is None and n != trained:
                custom = _custom_kwargs(drive, path, ts)
                if custom is not None:
                    attempts.append(dataclasses.replace(cand, kwargs=lambda _ts, c=custom: c))
            for att in attempts:
                try:
                    err, fed, kw = _probe(drive, att, path, ts, renoise)
                except Exception as e:  # noqa: BLE001 - a route that cannot run this schedule
                    if n == trained and att is cand:
                        tried.append(f"{cand.route}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                if err <= PROBE_RTOL:
                    supported[n] = {"times": ts, "timesteps": fed, "call_kwargs": kw, "max_rel_error": err}
                    break
                if n == trained and att is cand:
                    tried.append(f"{cand.route}: runs timesteps {[round(f, 3) for f in fed]}, off by {err:.2g}")
        if trained not in supported:
            continue
        key = (cand.patch is None, not supported[trained]["call_kwargs"], len(supported), -ci)
        if best is None or key > best[0]:
            best = (key, cand, supported)
        if first:
            break
    return best, tried


def _hints(path, drive: Drive, teacher_cfg: dict[str, Any], times: list[float], renoise: str,
           objective: str | None, params: dict[str, Any]) -> list[str]:
    """Nearby schedules this pipeline class does reproduce (for VP times between DDPM indices:
    the neighbouring integer grids, and the grids LCMScheduler's default spacing gives), so the
    refusal can say which objective setting would export."""
    import itertools

    import diffusers

    from .paths import FlowPath, VPPath

    out = []
    if isinstance(path, VPPath) and isinstance(_vp_indices(path, times), str):
        n_train, steps = path.num_train_timesteps, len(times) - 1
        want = [_vp_index(path, t) for t in times[:-1]]
        grids = set()
        options = [[round(i)] if abs(i - round(i)) <= 1e-6 else [math.floor(i), math.ceil(i)] for i in want]
        for combo in itertools.islice(itertools.product(*options), 64):
            grids.add(tuple(int(k) for k in combo))
        top = round(want[0])
        if abs(want[0] - top) <= 1e-6 and renoise == "fresh":
            with _quiet_diffusers():
                for o in (d for d in range(1, top + 2) if (top + 1) % d == 0 and d >= steps):
                    sch = diffusers.LCMScheduler(num_train_timesteps=top + 1, original_inference_steps=o)
                    sch.set_timesteps(steps)
                    grids.add(tuple(int(k) for k in sch.timesteps.tolist()))
        ok = []
        for g in grids:
            if any(b >= a for a, b in zip(g, g[1:])) or not all(0 <= k < n_train for k in g):
                continue
            ts = [(k + 1) / n_train for k in g] + [0.0]
            cands, _ = _candidates(drive, path, teacher_cfg, ts, renoise, objective, params)
            with _quiet_diffusers():
                best, _ = _choose(drive, cands, path, {steps: ts}, steps, renoise, first=True)
            if best is not None:
                ok.append((sum(abs(k - w) for k, w in zip(g, want)), g, ts))
        if ok:
            desc = []
            for _, g, ts in sorted(ok)[:3]:
                d = f"DDPM indices {list(g)} (t={[round(t, 6) for t in ts[:-1]]})"
                if objective in ("scm", "tbcm"):
                    from .objectives._trigflow import angle_of_t

                    angles = [math.pi / 2 if t >= 1 else float(angle_of_t(path, t)) for t in ts[:-1]]
                    d += f", objective.sampling_angles={angles}"
                desc.append(d)
            out.append("nearest schedules this pipeline reproduces: " + "; ".join(desc))
    if isinstance(path, FlowPath) and abs(times[0] - 1.0) > 1e-12 and "sigmas" not in drive.call_kwargs:
        out.append("a schedule from t=1 (e.g. objective.t_total=1.0 for TDM) is exported with a stock flow scheduler")
    return out


def plan_scheduler(pipeline_class: str, teacher_scheduler_config: dict[str, Any], sampling: dict[str, Any],
                   objective: str | None = None, objective_params: dict[str, Any] | None = None,
                   path=None) -> SchedulerPlan:
    """Choose the stock scheduler configuration that reproduces the student's sampler.

    Args:
        pipeline_class: the teacher's diffusers pipeline class name (a key of DRIVES).
        teacher_scheduler_config: the teacher folder's scheduler config (with `_class_name`).
        sampling: the run card's {"times": [...], "renoise": ..., "times_by_steps": {...}}, and
                  "prediction_type" where the student reads its output otherwise than the teacher.
        objective, objective_params: the run card's (LCM keeps its own boundary scalings).
        path: the teacher's noise path (default: from the scheduler config).
    Raises ExportError, naming the reason, when no route reproduces the trained step count.
    """
    from .paths import path_from_scheduler_config
    from .samplers import check_times

    if pipeline_class not in DRIVES:
        raise ExportError(f"pipeline class {pipeline_class!r} is not supported for export; supported: "
                          f"{', '.join(DRIVES)}")
    drive = DRIVES[pipeline_class]
    path = path if path is not None else path_from_scheduler_config(teacher_scheduler_config)
    if sampling.get("prediction_type"):  # a student that reads its output otherwise than its teacher
        from .paths import with_prediction

        try:
            path = with_prediction(path, str(sampling["prediction_type"]))
        except ValueError as e:
            raise ExportError(f"run card sampling.prediction_type: {e}") from e
    try:
        times = check_times(sampling["times"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"run card sampling: bad 'times' ({e})") from e
    renoise = sampling.get("renoise")
    if renoise not in ("fresh", "ddim"):
        raise ExportError(f"run card sampling: renoise must be 'fresh' or 'ddim', got {renoise!r}")
    if times[-1] != 0.0:
        raise ExportError(f"the student's times end at t={times[-1]:g}, not 0: a pipeline returns a clean sample")
    trained = len(times) - 1
    schedules: dict[int, list[float]] = {trained: times}
    for k, v in (sampling.get("times_by_steps") or {}).items():
        try:
            ts = check_times(v)
        except ValueError:
            continue
        if ts[-1] == 0.0 and int(k) == len(ts) - 1 and int(k) != trained:
            schedules[int(k)] = ts
    cands, why = _candidates(drive, path, dict(teacher_scheduler_config), times, renoise, objective,
                             dict(objective_params or {}))
    with _quiet_diffusers():
        best, tried = _choose(drive, cands, path, schedules, trained, renoise)
    if best is None:
        reasons = why + tried + _hints(path, drive, dict(teacher_scheduler_config), times, renoise, objective,
                                       dict(objective_params or {}))
        raise ExportError(
            f"no stock scheduler reproduces this student's sampler ({trained} step(s) at t={times[:-1]}, "
            f"{renoise} re-noising) in {pipeline_class}: " + ("; ".join(reasons) if reasons else "no route applies"))
    _, cand, supported = best
    _, cand, supported = best
    plan = SchedulerPlan(cand.cls, dict(cand.config), supported, cand.route, cand.patch)
    if cand.cls == "LCMScheduler":
        plan.boundary = _lcm_boundary(cand, supported[trained]["timesteps"])
        if objective == "lcm":
            plan.notes.append(f"LCMScheduler applies the boundary scalings c_skip x + c_out x0 with the student's own "
                              f"timestep_scaling {cand.config['timestep_scaling']:g}; fewstep's sampler uses x0 alone. "
                              f"At the trained timesteps c_skip <= {plan.boundary['max_c_skip']:.2g}.")
        else:
            plan.notes.append(f"timestep_scaling={cand.config['timestep_scaling']:g} makes LCMScheduler's boundary "
                              f"scalings exact for a student that predicts x0 directly: c_skip <= "
                              f"{plan.boundary['max_c_skip']:.2g}, "
                              f"1 - c_out <= {plan.boundary['max_one_minus_c_out']:.2g}"
                              f" (with the default 10, c_skip would reach "
                              f"{max(r['c_skip_at_default_10'] for r in plan.boundary['steps']):.2g}).")
    if cand.config.get("num_train_timesteps") != getattr(path, "num_train_timesteps", None) and \
            "trained_betas" in cand.config:
        plan.notes.append(f"num_train_timesteps is {cand.config['num_train_timesteps']} so that the default spacing "
                          f"lands on the student's grid; the noise table is the teacher's full "
                          f"{len(cand.config['trained_betas'])}-entry table, given as trained_betas.")
    missing = sorted(set(schedules) - set(supported))
    if missing:
        plan.notes.append(f"step counts {missing} have student times in the run card but this scheduler does not "
                          "reproduce them")
    return plan


# ---------------------------------------------------------------------------------------------
# reading a run dir or checkpoint
# ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    run_dir: Path
    card: dict[str, Any]
    card_path: Path
    teacher_source: str
    sampling: dict[str, Any]
    weights: str                              # "student" / "student_ema"
    student_folder: Path | None = None        # a diffusers model folder (config.json + weights)
    student_file: Path | None = None          # its weights file
    checkpoint: Path | None = None            # a training checkpoint folder (weights from its files)
    lora_file: Path | None = None             # the adapter alone (run dir final/<weights>_lora.safetensors)
    lora: dict[str, Any] | None = None        # {"rank", "alpha"} of a LoRA student


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e


def _read_run(checkpoint: str | os.PathLike, weights: str) -> _Run:
    if weights not in ("student", "student_ema"):
        raise ExportError(f"weights must be 'student' or 'student_ema', got {weights!r}")
    p = Path(checkpoint)
    if not p.is_dir():
        raise ExportError(f"--checkpoint {str(p)!r} is not a folder (give a run dir or <run>/checkpoints/step_N)")
    ckpt = None
    if (p / "state.json").is_file():
        ckpt, run_dir = p, p.parent.parent
    else:
        run_dir = p
    card_path = next((run_dir / n for n in RUN_CARD_NAMES if (run_dir / n).is_file()), None)
    if card_path is None:
        where = f"its run dir {run_dir}" if ckpt else str(run_dir)
        raise ExportError(f"{where} has no run_card.json (the training entry point writes it when a run finishes; it "
                          "names the teacher and the student's sampling times). Export a finished run.")
    card = _read_json(card_path)
    teacher = card.get("teacher")
    src = teacher.get("source") if isinstance(teacher, dict) else teacher
    if not isinstance(src, str) or not src:
        raise ExportError(f"run card {card_path} does not name its teacher ('teacher': {{'source': ...}})")
    sampling = card.get("sampling")
    if not isinstance(sampling, dict) or "times" not in sampling:
        raise ExportError(f"run card {card_path} has no 'sampling' entry with the student's times")
    lora = card.get("lora") if isinstance(card.get("lora"), dict) and card["lora"].get("student") else None
    run = _Run(run_dir, card, card_path, src, sampling, weights, checkpoint=ckpt, lora=lora)
    if ckpt is not None:
        f = ckpt / ("ema.safetensors" if weights == "student_ema" else "model.safetensors")
        if not f.is_file() and (ckpt / "shards").is_dir():
            raise ExportError(f"checkpoint {ckpt} is sharded (FSDP, torch.distributed.checkpoint): export the finished "
                              "run dir, whose final weights are gathered, or save full checkpoints "
                              "(checkpoint.state_dict=full)")
        if not f.is_file():
            raise ExportError(f"checkpoint {ckpt} has no {f.name} (weights={weights!r})")
        run.student_file = f
        return run
    files = card.get("files") or {}
    cands = []
    if isinstance(files.get(weights), str):
        cands.append(run_dir / files[weights])
    cands += [run_dir / "final" / weights]
    for c in cands:
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
            if c.is_dir() and (c / name).is_file():
                run.student_folder, run.student_file = c, c / name
                break
        if run.student_file is not None:
            break
    if run.student_file is None:
        have = ", ".join(sorted(k for k in files if k.startswith("student"))) or "none"
        raise ExportError(f"run dir {run_dir} holds no {weights} weights (looked in "
                          f"{', '.join(str(c) for c in cands)}; the run card lists: {have})")
    # the adapter of these very weights (the run writes the raw student's; an EMA has none)
    lf = files.get(f"{weights}_lora")
    if isinstance(lf, str) and (run_dir / lf).is_file():
        run.lora_file = run_dir / lf
    elif (run_dir / "final" / f"{weights}_lora.safetensors").is_file():
        run.lora_file = run_dir / "final" / f"{weights}_lora.safetensors"
    return run


# ---------------------------------------------------------------------------------------------
# the teacher's folder
# ---------------------------------------------------------------------------------------------
def _teacher_folder(source: str, scratch: Path) -> Path:
    """A pipeline folder for `source`: the folder itself, the embedded teacher's folder, a hub id
    from the local cache, or (an embedded teacher only in memory) the pipeline saved to `scratch`."""
    p = Path(source)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ExportError(f"teacher {source!r} has no model_index.json: not a diffusers pipeline folder")
        return p
    from .pipeline_teacher import DIGITS_TEACHERS

    if source in DIGITS_TEACHERS:
        from .digits.data import WEIGHTS_DIR

        folder = WEIGHTS_DIR / f"teacher_{source.split('-', 1)[1]}"
        if (folder / "model_index.json").is_file():
            return folder
        from .pipeline_teacher import load_teacher

        try:
            t = load_teacher(source)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the embedded teacher {source!r} is not available: {e}") from e
        if t.pipeline_dir and (Path(t.pipeline_dir) / "model_index.json").is_file():
            return Path(t.pipeline_dir)
        if t.pipeline is None:
            raise ExportError(f"the embedded teacher {source!r} has no pipeline to copy components from")
        scratch.mkdir(parents=True, exist_ok=True)
        t.pipeline.save_pretrained(scratch, safe_serialization=True)
        return scratch
    if p.exists() or source.startswith((".", "/", "~")):
        raise ExportError(f"teacher {source!r} (from the run card) is not a pipeline folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"teacher {source!r} is neither a local folder nor in the local Hugging Face cache "
                          f"({type(e).__name__}); nothing is downloaded here: download it first or pass "
                          "--teacher <folder>") from None


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    raise ExportError(f"{folder} holds no safetensors weights (diffusion_pytorch_model.safetensors)")


def _header(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


def _load_all(files: Sequence[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _expected_shapes(cls_name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a backbone built from `config` on the meta device (no memory)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        m = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _check_fit(cls_name: str, config: dict[str, Any], have: dict[str, tuple[int, ...]], what: str) -> None:
    want = _expected_shapes(cls_name, config)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if bad:
            parts.append(f"{len(bad)} of another shape (e.g. {bad[0]}: {have[bad[0]]} vs {want[bad[0]]})")
        raise ExportError(f"{what} do not fit a {cls_name} with this config: " + "; ".join(parts))


def _checkpoint_state(run: _Run, teacher_bb: Path, cls_name: str, config: dict[str, Any]) -> tuple[dict, dict | None]:
    """The student's full backbone state from a training checkpoint (LoRA merged into the teacher's
    weights; tensors a checkpoint leaves out because they are the teacher's, from the teacher),
    and the LoRA adapter alone (peft keys, adapter name removed) for LoRA students."""
    from .training.lora import merge_lora_state_dict

    prefix = "student.backbone."
    raw = {k[len(prefix):]: v for k, v in _load_all([run.student_file]).items() if k.startswith(prefix)}
    if run.weights == "student_ema" and run.checkpoint is not None and (run.checkpoint / "model.safetensors").is_file():
        base = {k[len(prefix):]: v for k, v in _load_all([run.checkpoint / "model.safetensors"]).items()
                if k.startswith(prefix)}
        raw = {**base, **raw}
    if not raw:
        raise ExportError(f"checkpoint {run.student_file} holds no '{prefix}*' tensors (a shared-base or custom "
                          "student layout): export the finished run dir instead")
    teacher_sd = _load_all(_safetensors_files(teacher_bb))
    adapter = None
    if any(".lora_A." in k for k in raw):
        meta = run.lora or {}
        if not meta.get("rank") or meta.get("alpha") is None:
            raise ExportError(f"checkpoint {run.student_file} holds LoRA adapters but the run card gives no lora rank "
                              "and alpha")
        names = {k.split(".lora_A.")[1].split(".")[0] for k in raw if ".lora_A." in k}
        if len(names) != 1:
            raise ExportError(f"checkpoint {run.student_file}: expected one LoRA adapter, found {sorted(names)}")
        name = names.pop()
        plain = {k.replace(".base_layer.", "."): v for k, v in raw.items() if "lora_" not in k}
        full = {**teacher_sd, **plain, **{k: v for k, v in raw.items() if "lora_" in k}}
        state = merge_lora_state_dict(full, float(meta["alpha"]) / float(meta["rank"]), name)
        adapter = {k.replace(f".{name}.", "."): v for k, v in raw.items() if "lora_" in k}
    else:
        state = {**teacher_sd, **raw}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _check_fit(cls_name, config, shapes, f"checkpoint {run.student_file} weights")
    return state, adapter


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# LoRA adapter in diffusers' format
# ---------------------------------------------------------------------------------------------
def _read_adapter(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    return load_file(str(path)), meta


def _write_lora(pipeline_class: str, drive: Drive, adapter: dict[str, Tensor], rank: int, alpha: float,
                out_dir: Path) -> dict[str, Any]:
    """Write the adapter with the pipeline class's own `save_lora_weights`. lora_B is multiplied by
    alpha / rank, so the file loads at scale 1 whatever alpha convention a loader assumes."""
    import diffusers

    scale = float(alpha) / float(rank)
    sd = {}
    for k, v in adapter.items():
        if ".lora_A." not in k and ".lora_B." not in k:
            raise ExportError(f"LoRA adapter key {k!r} is not a peft lora_A / lora_B weight")
        v = v.detach().float().contiguous()
        sd[k] = v * scale if ".lora_B." in k else v
    cls = getattr(diffusers, pipeline_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(out_dir), **{drive.lora: sd}, safe_serialization=True)
    return {"folder": LORA_DIR, "file": f"{LORA_DIR}/{LORA_FILE}", "rank": int(rank), "alpha": float(alpha),
            "scale_folded_into_lora_B": scale, "tensors": len(sd)}


# ---------------------------------------------------------------------------------------------
# metrics recorded beside the run
# ---------------------------------------------------------------------------------------------
def _find_results(run_dir: Path, extra: Sequence[str | os.PathLike] = ()) -> list[dict[str, Any]]:
    """Summaries of complete `fewstep eval` results (results.json) found under the run dir (up to
    three levels down) or given explicitly."""
    files = [Path(e) for e in extra]
    for depth in ("results.json", "*/results.json", "*/*/results.json", "*/*/*/results.json"):
        files += sorted(run_dir.glob(depth))
    out, seen = [], set()
    for f in files:
        f = f.resolve()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        try:
            res = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not str(res.get("format", "")).startswith("fewstep-eval") or not res.get("complete"):
            continue
        rows = []
        for r in res.get("rows", []):
            ms = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in (r.get("metrics") or {}).items()}
            rows.append({"steps": r.get("steps"), "guidance": r.get("guidance"), "hybrid": r.get("hybrid"),
                         "sampler": r.get("sampler"), "num_samples": r.get("num_samples"), "metrics": ms})
        out.append({"file": str(f), "protocol": (res.get("protocol") or {}).get("name"),
                    "command": res.get("command"), "rows": rows})
    return out


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    out: Path
    pipeline_class: str
    plan: SchedulerPlan
    card: dict[str, Any]
    seconds: float


def _guard_paths(out: Path, protected: Sequence[Path]) -> None:
    o = out.resolve()
    for p in protected:
        q = p.resolve()
        if o == q or o in q.parents:
            raise ExportError(f"--out {out} is (or contains) {p}, an input of this export; choose another folder")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by rename."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_component(src: Path, dst: Path, link: bool) -> None:
    if not link:
        shutil.copytree(src, dst, symlinks=False)
        return

    def hard(s, d):
        try:
            os.link(os.path.realpath(s), d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=False, copy_function=hard)


def export_student(checkpoint: str | os.PathLike, out: str | os.PathLike, *, weights: str = "student",
                   overwrite: bool = False, teacher: str | None = None, lora: str = "auto",
                   eval_results: Sequence[str | os.PathLike] = (), link_components: bool = False) -> ExportResult:
    """Write a stock diffusers pipeline folder for a trained student.

    Args:
        checkpoint: a finished run dir (run_card.json + final/) or one of its checkpoints
            (<run>/checkpoints/step_N).
        out: the folder to write (atomically; see `overwrite`).
        weights: "student" or "student_ema" (the EMA weights the run kept, if any).
        overwrite: replace a non-empty `out`.
        teacher: a pipeline folder to use instead of the run card's teacher source (e.g. the same
            teacher on another machine).
        lora: "auto" (write the adapter for LoRA students whose pipeline class loads LoRA),
            "off", or "required" (fail if it cannot be written).
        eval_results: results.json files of `fewstep eval` to summarise in the card (results under
            the run dir are found on their own).
        link_components: hard-link the teacher's component files instead of copying them.
    Returns an ExportResult (the folder, the scheduler plan, the card).
    """
    import diffusers

    from .model_card import render_readme

    t0 = time.time()
    if lora not in ("auto", "off", "required"):
        raise ExportError(f"lora must be 'auto', 'off' or 'required', got {lora!r}")
    run = _read_run(checkpoint, weights)
    source = teacher or run.teacher_source
    out = Path(out)
    scratch_root = out.parent / f".{out.name}.teacher-{os.getpid()}"
    try:
        tdir = _teacher_folder(source, scratch_root)
        _guard_paths(out, [run.run_dir, tdir] + ([run.checkpoint] if run.checkpoint else []))
        index = _read_json(tdir / "model_index.json")
        pipeline_class = str(index.get("_class_name"))
        if pipeline_class not in DRIVES:
            raise ExportError(f"teacher {source!r} is a {pipeline_class}; export supports {', '.join(DRIVES)}")
        drive = DRIVES[pipeline_class]
        if drive.backbone not in index or not (tdir / drive.backbone).is_dir():
            raise ExportError(f"teacher folder {tdir} has no {drive.backbone!r} component")
        bb_cls = index[drive.backbone][1]
        sched_file = tdir / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise ExportError(f"teacher folder {tdir} has no scheduler/scheduler_config.json")
        tsched = _read_json(sched_file)
        tsched.setdefault("_class_name", index.get("scheduler", [None, ""])[1])
        plan = plan_scheduler(pipeline_class, tsched, run.sampling, run.card.get("objective"),
                              run.card.get("objective_params") or {})

        # ---- the student's backbone ------------------------------------------------------------
        teacher_cfg = _read_json(tdir / drive.backbone / "config.json")
        if run.student_folder is not None and (run.student_folder / "config.json").is_file():
            student_cfg = _read_json(run.student_folder / "config.json")
        else:
            student_cfg = dict(teacher_cfg)
        if student_cfg.get("_class_name", bb_cls) != bb_cls:
            raise ExportError(f"the student is a {student_cfg.get('_class_name')} but the teacher's {drive.backbone} "
                              f"is a {bb_cls}")
        student_cfg["_class_name"] = bb_cls
        arch_diff = sorted(k for k in set(student_cfg) | set(teacher_cfg) if not k.startswith("_")
                           and student_cfg.get(k) != teacher_cfg.get(k))
        adapter: dict[str, Tensor] | None = None
        adapter_meta: dict[str, Any] = {}
        if run.checkpoint is not None:
            state, adapter = _checkpoint_state(run, tdir / drive.backbone, bb_cls, student_cfg)
            if adapter is not None:
                adapter_meta = {"rank": run.lora["rank"], "alpha": run.lora["alpha"]}
        else:
            state = None
            _check_fit(bb_cls, student_cfg, _header([run.student_file]), f"student weights {run.student_file}")
            if run.lora_file is not None:
                adapter, m = _read_adapter(run.lora_file)
                adapter_meta = {"rank": int(m.get("rank") or (run.lora or {}).get("rank") or 0),
                                "alpha": float(m.get("alpha") or (run.lora or {}).get("alpha") or 0)}

        with atomic_folder(out, overwrite) as tmp:
            # teacher components (everything but the backbone and the scheduler) and licence files
            for key, val in index.items():
                if key.startswith("_") or key in (drive.backbone, "scheduler"):
                    continue
                if isinstance(val, list) and val and val[0] is not None and (tdir / key).is_dir():
                    check_weights_folder(tdir / key, f"teacher component {key!r}")  # never copy damaged weights
                    _copy_component(tdir / key, tmp / key, link_components)
            for f in tdir.iterdir():
                if f.is_file() and f.name.lower().startswith(("license", "licence", "notice")):
                    shutil.copy2(f, tmp / f.name)
            # backbone
            bdir = tmp / drive.backbone
            bdir.mkdir()
            (bdir / "config.json").write_text(json.dumps(student_cfg, indent=2, sort_keys=True, default=list))
            if state is None:
                shutil.copy2(run.student_file, bdir / "diffusion_pytorch_model.safetensors")
            else:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state.items()},
                          str(bdir / "diffusion_pytorch_model.safetensors"))
            # scheduler and index
            plan.scheduler().save_pretrained(str(tmp / "scheduler"))
            new_index = dict(index)
            new_index["scheduler"] = ["diffusers", plan.scheduler_class]
            new_index["_diffusers_version"] = diffusers.__version__
            (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True))
            # LoRA adapter
            lora_info: dict[str, Any] | None = None
            if adapter is not None and lora != "off":
                if drive.lora is None:
                    if lora == "required":
                        raise ExportError(f"{pipeline_class} has no load_lora_weights; the adapter cannot be exported "
                                          "in a form it loads (the fused weights are exported)")
                    lora_info = {"written": False, "reason": f"{pipeline_class} does not load LoRA weights "
                                 "(no LoRA loader mixin); the folder holds the fused weights"}
                elif not adapter_meta.get("rank"):
                    raise ExportError("the LoRA adapter has no rank / alpha (run card 'lora' or file metadata)")
                else:
                    lora_info = {"written": True, **_write_lora(pipeline_class, drive, adapter, adapter_meta["rank"],
                                                                adapter_meta["alpha"], tmp / LORA_DIR)}
            elif lora == "required":
                raise ExportError(f"lora='required' but there is no LoRA adapter for the {weights} weights "
                                  + ("(the run saves the raw student's adapter only)" if run.lora else
                                     "(the student was trained in full)"))
            elif run.lora and lora != "off":
                lora_info = {"written": False, "reason": f"the run holds no adapter file for the {weights} weights; "
                             "the folder holds the fused weights"}
            # cards
            card = _card(run, source, tdir, tsched, pipeline_class, drive, plan, arch_diff, lora_info, eval_results,
                         bb_file_sha=_sha256(bdir / "diffusion_pytorch_model.safetensors"))
            (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
            (tmp / "README.md").write_text(render_readme(card))
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    return ExportResult(out, pipeline_class, plan, card, time.time() - t0)


def _card(run: _Run, source: str, tdir: Path, tsched: dict, pipeline_class: str, drive: Drive, plan: SchedulerPlan,
          arch_diff: list[str], lora_info: dict | None, eval_results, bb_file_sha: str) -> dict[str, Any]:
    import diffusers

    card = run.card
    params = card.get("objective_params") or {}
    trained = len(run.sampling["times"]) - 1
    ge = run.sampling.get("guidance_embedding")
    guidance_scale = float(ge.get("guidance", 1.0)) if isinstance(ge, dict) else 1.0
    if isinstance(params.get("guidance_min"), (int, float)) and isinstance(params.get("guidance_max"), (int, float)):
        teacher_guidance: Any = [params["guidance_min"], params["guidance_max"]]   # LCM draws w from a range
    else:
        teacher_guidance = next((params[k] for k in ("guidance", "teacher_guidance")
                                 if isinstance(params.get(k), (int, float))), None)
    noise = ("the pipeline's `generator` (passed to scheduler.step)" if drive.step_generator else
             "torch's global RNG (the pipeline calls scheduler.step without a generator): call torch.manual_seed(s) "
             "right before the pipeline")
    if drive.flux_sigmas:
        noise += "; FluxPipeline draws it in its packed (B, H/2 * W/2, 4C) layout"
    teacher_block = card.get("teacher") if isinstance(card.get("teacher"), dict) else {}
    return {
        "format": CARD_FORMAT,
        "name": card.get("name"),
        "objective": card.get("objective"),
        "method": METHODS.get(str(card.get("objective")), str(card.get("objective"))),
        "objective_params": params,
        "teacher": {"source": source, "family": teacher_block.get("family"), "pipeline_class": pipeline_class,
                    "folder": str(tdir), "latent_shape": teacher_block.get("latent_shape"),
                    "num_classes": teacher_block.get("num_classes"), "scheduler_class": tsched.get("_class_name"),
                    "num_train_timesteps": tsched.get("num_train_timesteps")},
        "sampling": run.sampling,
        "pipeline_class": pipeline_class,
        "backbone": drive.backbone,
        "conditioning": drive.conditioning,
        "scheduler": {"class": plan.scheduler_class, "route": plan.route, "notes": plan.notes,
                      "boundary_scalings": plan.boundary},
        "trained_steps": trained,
        "supported_steps": {str(n): v for n, v in sorted(plan.supported.items())},
        "guidance_scale": guidance_scale,
        "teacher_guidance_in_training": teacher_guidance,
        "fresh_noise": run.sampling.get("renoise") == "fresh" and trained > 1,
        "noise_source": noise,
        "requires_patch": plan.needs_patch,
        "weights": {"which": run.weights, "from": str(run.student_file), "checkpoint": str(run.checkpoint)
                    if run.checkpoint else None, "sha256": bb_file_sha, "architecture_differs_from_teacher_in":
                    arch_diff, "lora": run.lora},
        "lora_adapter": lora_info,
        "hybrid": {"command": "fewstep eval --pipeline <this folder> --hybrid K --teacher-guidance W",
                   "python": "fewstep.samplers.sample_hybrid(teacher, student, noise, cond, times[:K+1], times[K:], "
                             "guidance=W)", "teacher_source": source},
        "metrics": _find_results(run.run_dir, eval_results),
        "run": {"dir": str(run.run_dir), "card": str(run.card_path), "steps": card.get("steps"),
                "wall_time_s": card.get("wall_time_s")},
        "exported": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "diffusers": diffusers.__version__,
                     "torch": torch.__version__},
    }


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a finished run dir (run_card.json, final/) or <run>/checkpoints/step_N")
    p.add_argument("--out", required=True, help="pipeline folder to write (atomically)")
    p.add_argument("--weights", choices=["student", "student_ema"], default="student",
                   help="the raw student weights or the EMA the run kept (default: student)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--teacher", help="the teacher's pipeline folder, instead of the run card's teacher source")
    p.add_argument("--lora", choices=["auto", "off", "required"], default="auto",
                   help="LoRA students: also write the adapter in diffusers' format (default auto: where the "
                        "pipeline class loads LoRA)")
    p.add_argument("--eval-results", action="append", default=[],
                   help="a `fewstep eval` results.json to summarise in the card (repeatable; results under the run "
                        "dir are found on their own)")
    p.add_argument("--link-components", action="store_true",
                   help="hard-link the teacher's VAE / text encoders instead of copying them (same file system)")


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        res = export_student(args.checkpoint, args.out, weights=args.weights, overwrite=args.overwrite,
                             teacher=args.teacher, lora=args.lora, eval_results=args.eval_results,
                             link_components=args.link_components)
    except ExportError as e:
        print(f"fewstep export: error: {one_line(e)}", file=sys.stderr)
        return 2
    steps = ", ".join(res.card["supported_steps"])
    print(f"fewstep export: wrote {res.out} ({res.pipeline_class} + {res.plan.scheduler_class}; "
          f"num_inference_steps {steps}; guidance_scale {res.card['guidance_scale']:g}) in {res.seconds:.1f}s")
    if res.plan.needs_patch:
        print(f"note: {res.plan.needs_patch}")
    return 0
