"""Scheduler configurations that might reproduce a student's times and re-noising rule, best
first (each is then checked by replay, see `replay.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._common import EXACT_TIMESTEP_SCALING
from .drives import Drive


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
            return (
                f"t={t:g} is DDPM index {i:.4f}, between integer timesteps (stock VP schedulers feed the "
                "network integer timesteps and index their noise table with them)"
            )
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
    return {
        "num_train_timesteps": int(num_train),
        "trained_betas": _teacher_betas(teacher_cfg),
        "rescale_betas_zero_snr": False,
    }


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
        from ..paths import betas_from_config

        betas = betas_from_config(cfg)
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
        cfg = {
            **_vp_table_config(teacher_cfg, top),
            "original_inference_steps": o,
            "timestep_scaling": scaling,
            "prediction_type": pred,
            "set_alpha_to_one": True,
            "clip_sample": False,
            "thresholding": False,
            "timestep_spacing": "leading",
            "steps_offset": 0,
        }
        out.append(
            _Candidate(
                "LCMScheduler",
                cfg,
                route=f"LCMScheduler default spacing (original_inference_steps={o}"
                + (f", num_train_timesteps={top}" if top != path.num_train_timesteps else "")
                + ")",
            )
        )
    return out


def _vp_call_timestep_candidates(path, teacher_cfg, kinds: set[str], scaling: float, pred: str) -> list[_Candidate]:
    """For pipelines that pass `timesteps` at call time: LCMScheduler (fresh noise) and first-order
    DPM-Solver++ (exactly DDIM), each given the student's timesteps."""
    base = {**_vp_table_config(teacher_cfg, path.num_train_timesteps), "prediction_type": pred}
    configs = []
    if "fresh" in kinds:
        configs.append(
            (
                "LCMScheduler",
                {
                    "original_inference_steps": path.num_train_timesteps,
                    "timestep_scaling": scaling,
                    "set_alpha_to_one": True,
                    "clip_sample": False,
                    "thresholding": False,
                },
                "LCMScheduler with the timesteps passed at call time",
            )
        )
    if "ddim" in kinds:
        configs.append(
            (
                "DPMSolverMultistepScheduler",
                {
                    "algorithm_type": "dpmsolver++",
                    "solver_order": 1,
                    "final_sigmas_type": "zero",
                    "lower_order_final": True,
                    "thresholding": False,
                    "use_karras_sigmas": False,
                },
                "first-order DPM-Solver++ (exactly DDIM) with the timesteps passed at call time",
            )
        )
    return [
        _Candidate(name, {**base, **cfg}, kwargs=lambda ts: {"timesteps": _vp_indices(path, ts)}, route=route)
        for name, cfg, route in configs
    ]


def _candidates(
    drive: Drive,
    path,
    teacher_cfg: dict[str, Any],
    times: list[float],
    renoise: str,
    objective: str | None,
    objective_params: dict[str, Any],
) -> tuple[list[_Candidate], list[str]]:
    """Scheduler configurations that might reproduce `times` / `renoise`, best first, and the
    reasons routes were ruled out before trying."""
    from ..paths import FlowPath, VPPath

    one_step = len(times) == 2
    kinds = {"fresh", "ddim"} if one_step else {renoise}  # one step never re-noises
    if isinstance(path, VPPath):
        return _vp_candidates(drive, path, teacher_cfg, times, renoise, kinds, objective, objective_params)
    if isinstance(path, FlowPath):
        return _flow_candidates(drive, path, teacher_cfg, times, renoise, kinds)
    return [], [f"{type(path).__name__} teachers have no stock scheduler route here"]


def _vp_candidates(
    drive: Drive,
    path,
    teacher_cfg: dict[str, Any],
    times: list[float],
    renoise: str,
    kinds: set[str],
    objective: str | None,
    objective_params: dict[str, Any],
) -> tuple[list[_Candidate], list[str]]:
    """VP path: LCMScheduler (fresh noise) and DDIMScheduler (deterministic) on the trained DDPM
    indices, then the call-time `timesteps` routes."""
    out: list[_Candidate] = []
    idx = _vp_indices(path, times)
    if isinstance(idx, str):
        return [], [idx]
    pred = path.prediction_type
    if objective == "lcm":
        scaling = float(objective_params.get("timestep_scaling", 10.0))
    else:
        scaling = EXACT_TIMESTEP_SCALING
    top = idx[0] + 1
    ddim = _Candidate(
        "DDIMScheduler",
        {
            **_vp_table_config(teacher_cfg, top),
            "prediction_type": pred,
            "timestep_spacing": "trailing",
            "set_alpha_to_one": True,
            "clip_sample": False,
            "thresholding": False,
            "steps_offset": 0,
        },
        route=f"DDIMScheduler, trailing spacing over {top} steps, final alpha 1, eta 0",
    )
    # the scheduler of the student's own re-noising rule first (a one-step student takes either)
    if renoise == "fresh":
        out += _lcm_candidates(path, teacher_cfg, idx, scaling, pred) + ([ddim] if "ddim" in kinds else [])
    else:
        out += [ddim] + (_lcm_candidates(path, teacher_cfg, idx, scaling, pred) if "fresh" in kinds else [])
    if "timesteps" in drive.call_kwargs:
        out += _vp_call_timestep_candidates(path, teacher_cfg, kinds, scaling, pred)
    return out, []


def _flow_candidates(
    drive: Drive, path, teacher_cfg: dict[str, Any], times: list[float], renoise: str, kinds: set[str]
) -> tuple[list[_Candidate], list[str]]:
    """Flow path: the flow Euler schedulers (stochastic for fresh noise), with `shift_terminal` at
    the last time or the sigmas passed at call time."""
    why: list[str] = []
    out: list[_Candidate] = []
    if abs(path.timestep_scale - path.num_train_timesteps) > 1e-9:
        return [], [f"flow path feeds timestep = {path.timestep_scale:g} t, not num_train_timesteps t"]
    n_train = path.num_train_timesteps
    patch = None
    if drive.scale_input:
        patch = (
            "this pipeline calls scheduler.scale_model_input, which FlowMatchEulerDiscreteScheduler does not "
            "define; after loading set `pipe.scheduler.scale_model_input = lambda sample, timestep: sample` "
            "(the identity, what a flow scheduler's scaling is)"
        )
    base = {
        "num_train_timesteps": n_train,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
    if abs(times[0] - 1.0) > 1e-12 and "sigmas" not in drive.call_kwargs:
        why.append(
            f"the schedule starts at t={times[0]:g}, and this pipeline passes no custom sigmas, so the "
            "stock flow schedulers start at sigma 1"
        )
    for kind in sorted(kinds, key=lambda k: k != renoise):
        out += _flow_kind_candidates(kind, drive, teacher_cfg, times, base, patch)
    return out, why


def _flow_kind_candidates(
    kind: str, drive: Drive, teacher_cfg: dict[str, Any], times: list[float], base: dict[str, Any], patch: str | None
) -> list[_Candidate]:
    """The flow schedulers that replay the student's times with re-noising `kind` ("ddim": the
    deterministic Euler step; "fresh": the stochastic one)."""
    out: list[_Candidate] = []
    n_train = base["num_train_timesteps"]
    last = float(times[-2])
    stoch = kind == "fresh"
    if kind == "ddim" and abs(times[0] - 1.0) < 1e-12:
        out.append(
            _Candidate(
                "FlowMapEulerDiscreteScheduler",
                {"num_train_timesteps": n_train, "shift": 1.0},
                route="FlowMapEulerDiscreteScheduler (Euler), sigmas linspace(1, 0, n + 1)",
            )
        )
    if (
        kind == "ddim"
        and "FlowMatch" in str(teacher_cfg.get("_class_name", ""))
        and not teacher_cfg.get("use_dynamic_shifting", False)
    ):
        cfg = {k: v for k, v in teacher_cfg.items() if not k.startswith("_")}
        cfg["stochastic_sampling"] = False
        out.append(
            _Candidate(
                "FlowMatchEulerDiscreteScheduler",
                cfg,
                route="the teacher's own Euler scheduler (the student samples on the teacher's schedule)",
                patch=patch,
            )
        )
    name = ("stochastic " if stoch else "") + "FlowMatchEulerDiscreteScheduler, shift 1"

    def euler(shift_terminal: float | None, route: str, kwargs=None) -> _Candidate:
        cfg = {**base, "stochastic_sampling": stoch, "shift_terminal": shift_terminal}
        return _Candidate("FlowMatchEulerDiscreteScheduler", cfg, patch=patch, kwargs=kwargs, route=name + route)

    if abs(times[0] - 1.0) < 1e-12:
        terminal = len(times) > 2
        route = f", shift_terminal {last:g} (sigmas linspace(1, {last:g}, n))" if terminal else ""
        out.append(euler(last if terminal else None, route))
    if "sigmas" in drive.call_kwargs:
        sigmas = lambda ts: {"sigmas": [float(t) for t in ts[:-1]]}  # noqa: E731
        out.append(euler(None, ", with the sigmas passed at call time", sigmas))
    return out
