"""Scheduler planning: the candidates, the replay check and the choice, or a refusal that says
why and which nearby schedule would export."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ._common import PROBE_RTOL, ExportError
from .candidates import _Candidate, _candidates, _vp_index, _vp_indices
from .drives import DRIVES, Drive
from .replay import _lcm_boundary, _probe, _quiet_diffusers

__all__ = ["SchedulerPlan", "plan_scheduler"]


@dataclass
class SchedulerPlan:
    """A stock scheduler configuration and what it reproduces.

    supported: {num_inference_steps: {"times", "timesteps", "call_kwargs", "max_rel_error"}} for
    every step count with known student times that this configuration reproduces.
    """

    scheduler_class: str
    config: dict[str, Any]
    supported: dict[int, dict[str, Any]]
    route: str  # one line: what was chosen and why it is exact
    needs_patch: str | None = None  # a one-line fix the pipeline class needs, or None
    notes: list[str] = field(default_factory=list)
    boundary: dict[str, Any] | None = None  # LCMScheduler: c_skip / c_out per step

    def scheduler(self):
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_config(self.config)


def _custom_kwargs(drive: Drive, path, times: list[float]) -> dict[str, Any] | None:
    """The schedule as call arguments, where the pipeline's __call__ forwards them."""
    from ..paths import FlowPath, VPPath

    if isinstance(path, VPPath) and "timesteps" in drive.call_kwargs:
        idx = _vp_indices(path, times)
        return {"timesteps": idx} if isinstance(idx, list) else None
    if isinstance(path, FlowPath) and "sigmas" in drive.call_kwargs:
        return {"sigmas": [float(t) for t in times[:-1]]}
    return None


def _choose(
    drive: Drive,
    cands: list[_Candidate],
    path,
    schedules: dict[int, list[float]],
    trained: int,
    renoise: str,
    first: bool = False,
) -> tuple[tuple | None, list[str]]:
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


def _hints(
    path,
    drive: Drive,
    teacher_cfg: dict[str, Any],
    times: list[float],
    renoise: str,
    objective: str | None,
    params: dict[str, Any],
) -> list[str]:
    """Nearby schedules this pipeline class does reproduce (for VP times between DDPM indices:
    the neighbouring integer grids, and the grids LCMScheduler's default spacing gives), so the
    refusal can say which objective setting would export."""
    import itertools

    import diffusers

    from ..paths import FlowPath, VPPath

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
            if any(b >= a for a, b in zip(g, g[1:], strict=False)) or not all(0 <= k < n_train for k in g):
                continue
            ts = [(k + 1) / n_train for k in g] + [0.0]
            cands, _ = _candidates(drive, path, teacher_cfg, ts, renoise, objective, params)
            with _quiet_diffusers():
                best, _ = _choose(drive, cands, path, {steps: ts}, steps, renoise, first=True)
            if best is not None:
                ok.append((sum(abs(k - w) for k, w in zip(g, want, strict=False)), g, ts))
        if ok:
            desc = []
            for _, g, ts in sorted(ok)[:3]:
                d = f"DDPM indices {list(g)} (t={[round(t, 6) for t in ts[:-1]]})"
                if objective in ("scm", "tbcm"):
                    from ..objectives._trigflow import angle_of_t

                    angles = [math.pi / 2 if t >= 1 else float(angle_of_t(path, t)) for t in ts[:-1]]
                    d += f", objective.sampling_angles={angles}"
                desc.append(d)
            out.append("nearest schedules this pipeline reproduces: " + "; ".join(desc))
    if isinstance(path, FlowPath) and abs(times[0] - 1.0) > 1e-12 and "sigmas" not in drive.call_kwargs:
        out.append("a schedule from t=1 (e.g. objective.t_total=1.0 for TDM) is exported with a stock flow scheduler")
    return out


def plan_scheduler(
    pipeline_class: str,
    teacher_scheduler_config: dict[str, Any],
    sampling: dict[str, Any],
    objective: str | None = None,
    objective_params: dict[str, Any] | None = None,
    path=None,
) -> SchedulerPlan:
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
    from ..paths import path_from_scheduler_config

    if pipeline_class not in DRIVES:
        raise ExportError(
            f"pipeline class {pipeline_class!r} is not supported for export; supported: {', '.join(DRIVES)}"
        )
    drive = DRIVES[pipeline_class]
    path = path if path is not None else path_from_scheduler_config(teacher_scheduler_config)
    if sampling.get("prediction_type"):  # a student that reads its output otherwise than its teacher
        from ..paths import with_prediction

        try:
            path = with_prediction(path, str(sampling["prediction_type"]))
        except ValueError as e:
            raise ExportError(f"run card sampling.prediction_type: {e}") from e
    times, renoise, schedules = _read_sampling(sampling)
    trained = len(times) - 1
    cands, why = _candidates(
        drive, path, dict(teacher_scheduler_config), times, renoise, objective, dict(objective_params or {})
    )
    with _quiet_diffusers():
        best, tried = _choose(drive, cands, path, schedules, trained, renoise)
    if best is None:
        reasons = (
            why
            + tried
            + _hints(
                path, drive, dict(teacher_scheduler_config), times, renoise, objective, dict(objective_params or {})
            )
        )
        raise ExportError(
            f"no stock scheduler reproduces this student's sampler ({trained} step(s) at t={times[:-1]}, "
            f"{renoise} re-noising) in {pipeline_class}: " + ("; ".join(reasons) if reasons else "no route applies")
        )
    _, cand, supported = best
    plan = SchedulerPlan(cand.cls, dict(cand.config), supported, cand.route, cand.patch)
    _add_notes(plan, cand, path, objective, trained, sorted(set(schedules) - set(supported)))
    return plan


def _read_sampling(sampling: dict[str, Any]) -> tuple[list[float], str, dict[int, list[float]]]:
    """The run card's trained times, re-noising rule, and every step count with known times."""
    from ..samplers import check_times

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
    return times, renoise, schedules


def _add_notes(
    plan: SchedulerPlan, cand: _Candidate, path, objective: str | None, trained: int, missing: list[int]
) -> None:
    """What the card says about the chosen route: LCM boundary scalings, a shortened noise table,
    step counts it does not reproduce."""
    supported = plan.supported
    if cand.cls == "LCMScheduler":
        plan.boundary = _lcm_boundary(cand, supported[trained]["timesteps"])
        if objective == "lcm":
            plan.notes.append(
                f"LCMScheduler applies the boundary scalings c_skip x + c_out x0 with the student's own "
                f"timestep_scaling {cand.config['timestep_scaling']:g}; fewstep's sampler uses x0 alone. "
                f"At the trained timesteps c_skip <= {plan.boundary['max_c_skip']:.2g}."
            )
        else:
            plan.notes.append(
                f"timestep_scaling={cand.config['timestep_scaling']:g} makes LCMScheduler's boundary "
                f"scalings exact for a student that predicts x0 directly: c_skip <= "
                f"{plan.boundary['max_c_skip']:.2g}, "
                f"1 - c_out <= {plan.boundary['max_one_minus_c_out']:.2g}"
                f" (with the default 10, c_skip would reach "
                f"{max(r['c_skip_at_default_10'] for r in plan.boundary['steps']):.2g})."
            )
    if (
        cand.config.get("num_train_timesteps") != getattr(path, "num_train_timesteps", None)
        and "trained_betas" in cand.config
    ):
        plan.notes.append(
            f"num_train_timesteps is {cand.config['num_train_timesteps']} so that the default spacing "
            f"lands on the student's grid; the noise table is the teacher's full "
            f"{len(cand.config['trained_betas'])}-entry table, given as trained_betas."
        )
    if missing:
        plan.notes.append(
            f"step counts {missing} have student times in the run card but this scheduler does not reproduce them"
        )
