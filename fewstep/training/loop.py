"""The training loop, top to bottom:

    config -> accelerator -> teacher -> data -> objective (registry) -> placement / sharding /
    precision -> optimizers and schedulers per group -> resume -> for step: batch -> for phase:
    loss -> backward -> average grads -> clip -> non-finite check -> step that group -> zero ALL
    grads -> after_step -> EMA -> log / sample / checkpoint -> final weights + run card.

`run(cfg)` is what `accelerate launch train/train.py`, `fewstep train` and the tests call; it
returns the trained student and the objective with the run's outputs, so a script needs no reload.
Each numbered section of `run` is one function below (4.-6., building the objective, its networks
and optimizers, in training/build.py); the steps are `_steps`, the per-phase update `_update`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError, config_to_dict
from ..errors import dumps_json, user_errors
from .accumulate import accumulated_loss, micro_batch_size, split_batch
from .build import Env, Trainer, build_trainer
from .bundle import TeacherBundle, load_bundle
from .checkpoint import last_good_checkpoint, load_checkpoint, save_checkpoint
from .data import BatchSource
from .logging import RunLog, flat_config
from .outdir import OutputFolder
from .outputs import print_summary, run_card, sample_grid, save_final
from .parallel import (
    available_trackers,
    average_gradients,
    grad_norm_and_clip,
    is_fsdp,
    make_accelerator,
    reduce_mean,
)
from .periodic_eval import check_eval, due, evaluate_student
from .preflight import preflight
from .processes import startup_lines
from .resume import check_resumed
from .trackers import StepTimer, init_kwargs, log_grid, peak_memory
from .updates import update_counts

__all__ = ["run", "RunResult", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int  # steps completed (the next step to run)
    stopped_early: bool  # stopped by stop_after (a checkpoint holds the state)
    skipped: int  # non-finite updates skipped
    wall_time: float
    logs: dict[str, float] = field(default_factory=dict)  # the last step's (process-averaged) logs
    files: dict[str, str] = field(default_factory=dict)
    student: nn.Module | None = None  # the trained student (raw weights; the EMA's are in files["student_ema"])
    objective: Any = None  # the objective, with all its networks (`objective.nets`)


def run(cfg: Config, teacher: TeacherBundle | None = None, accelerator=None) -> RunResult:
    """Train as `cfg` says. `teacher` overrides cfg.teacher (tests, scripts); `accelerator` lets a
    caller set up processes / FSDP itself. Returns the outputs, the trained student and the objective.
    Checks come before the output folder is touched (training/preflight.py, training/outdir.py)."""
    preflight(cfg, check_teacher=teacher is None)
    if cfg.objective.name == "msd" and cfg.objective.params.get("student_index") is None:
        from ..msd.train import run_msd  # K students, one sub-run each (fewstep/msd/train.py)

        return run_msd(cfg, teacher, accelerator)
    if cfg.objective.name == "msd" and cfg.data.conditions is None:
        raise ConfigError(
            "objective.student_index is set by the entry point for each MSD student's sub-run "
            "(with data.conditions); remove it to train all students"
        )
    output: list[OutputFolder] = []
    try:
        return _run(cfg, teacher, accelerator, output)
    except BaseException:
        for out in output:
            out.restore()
        raise


def _run(cfg: Config, teacher: TeacherBundle | None, accelerator, output: list[OutputFolder]) -> RunResult:
    t_start = time.time()
    env, resume_from = _start(cfg, accelerator, output)  # 1. accelerator, folder, seeds
    bundle = _teacher(cfg, env, teacher)  # 2. teacher (frozen)
    source = _batch_source(cfg, env, bundle)  # 3. data
    tr = build_trainer(cfg, env, bundle, source)  # 4.-6. objective, optimizers
    _announce(cfg, env)
    start_step = _resume(cfg, env, tr, resume_from)  # 7. resume
    tr.made = update_counts(tr.obj, start_step)
    trackers = _start_trackers(cfg, env)
    log = RunLog(
        env.accelerator, env.run_dir, cfg.name, start_step, cfg.steps, progress=cfg.log.progress, trackers=trackers
    )
    t_loop = time.time()
    try:  # 8. the loop
        done, stopped_early, logs = _steps(cfg, env, tr, bundle, source, log, start_step, t_loop)
    finally:
        log.close()
    loop_time = time.time() - t_loop
    files = {} if stopped_early else _save_outputs(cfg, env, tr, bundle, source, done)  # 9. outputs
    wall = time.time() - t_start
    if env.main and not stopped_early:
        facts = {"num_classes": source.num_classes, "steps_done": done, "wall": wall, "loop_time": loop_time}
        files["run_card"] = _write_card(cfg, env, tr, bundle, {**facts, "files": files, "logs": logs})
    if trackers:
        env.accelerator.end_training()
    if env.main:
        print_summary(cfg, env, tr, done, start_step, wall, loop_time, logs, stopped_early)
    return RunResult(
        run_dir=env.run_dir,
        steps=done,
        stopped_early=stopped_early,
        skipped=tr.skipped,
        wall_time=wall,
        logs=logs,
        files=files,
        student=tr.nets["student"],
        objective=tr.obj,
    )


# ---- 1. accelerator, output folder, seeds ----------------------------------------------------------
def _start(cfg: Config, accelerator, output: list[OutputFolder]) -> tuple[Env, Path | None]:
    run_dir = cfg.run_dir()
    if accelerator is None:
        accelerator = make_accelerator(cfg.precision.mixed_precision, cfg.log.trackers, str(run_dir))
    env = Env(
        accelerator,
        run_dir,
        accelerator.device,
        accelerator.is_main_process,
        accelerator.num_processes,
        accelerator.process_index,
        is_fsdp(accelerator),
        accelerator.mixed_precision,
    )
    if env.mp not in ("no", "bf16"):
        raise ConfigError(f"precision.mixed_precision={env.mp!r} is not supported; use 'no' or 'bf16'")
    if env.device.type == "cuda" and cfg.precision.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env.output = OutputFolder.prepare(cfg, run_dir, accelerator, env.say)
    output.append(env.output)
    _seed_all(cfg.seed)  # the same on every process while the networks are built
    return env, env.output.resume_from


def _announce(cfg: Config, env: Env) -> None:
    """Processes, distributed type and the batch split; a warning when fewer processes run than
    the launcher was asked for (training/processes.py)."""
    import sys

    micro = micro_batch_size(cfg.data.batch_size, env.world, cfg.data.micro_batch_size)
    dtype = str(getattr(env.accelerator.distributed_type, "value", env.accelerator.distributed_type))
    for line in startup_lines(env.world, dtype, cfg.data.batch_size, micro):
        if env.main:
            print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout, flush=True)


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ---- 2. teacher, 3. data ------------------------------------------------------------------------------
def _teacher(cfg: Config, env: Env, teacher: TeacherBundle | None) -> TeacherBundle:
    """The teacher bundle (the caller's, else loaded as cfg.teacher says), frozen on this process's device."""
    with user_errors(f"teacher.source={cfg.teacher.source!r}", ValueError, OSError, named=cfg.teacher.source):
        bundle = teacher if teacher is not None else load_bundle(cfg.teacher, env.device)
    check_eval(cfg, bundle.source)  # a teacher passed in (tests, scripts) was not seen by preflight
    bundle.denoiser.requires_grad_(False)
    bundle.denoiser.to(env.device)
    return bundle


def _batch_source(cfg: Config, env: Env, bundle: TeacherBundle) -> BatchSource:
    """This process's share of every step's batch, as cfg.data says."""
    with user_errors("data", ValueError, OSError, named="data."):
        return BatchSource.from_config(bundle, cfg.data, cfg.seed, env.rank, env.world, env.device)


# ---- 7. resume, trackers ------------------------------------------------------------------------------
def _checkpoint_kwargs(env: Env, tr: Trainer) -> dict[str, Any]:
    parts = {k: getattr(tr, k) for k in ("holder", "keys", "optimizers", "schedulers", "ema")}
    return {"accelerator": env.accelerator, "objective": tr.obj, **parts}


def _resume(cfg: Config, env: Env, tr: Trainer, resume_from: Path | None) -> int:
    """Load the checkpoint to continue from (or seed each process afresh); write config.yaml.
    Returns the first step to run."""
    start_step = 0
    if resume_from is not None:
        check_resumed(json.loads((resume_from / "state.json").read_text()), tr.settings, env.say)
        state = load_checkpoint(resume_from, **_checkpoint_kwargs(env, tr))
        start_step, tr.skipped = int(state["step"]), int(state.get("skipped", 0))
        if env.main:  # drop records of steps after the checkpoint (an interrupted run wrote them)
            mfile = env.run_dir / "metrics.jsonl"
            if mfile.is_file():
                keep = [ln for ln in mfile.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
                mfile.write_text("".join(k + "\n" for k in keep))
    else:
        _seed_all(cfg.seed * 1000 + 7919 * env.rank + 1)  # per-process randomness for training
    if env.main:
        import yaml

        (env.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return start_step


def _start_trackers(cfg: Config, env: Env) -> bool:
    """Start the experiment trackers that are installed; True when any runs."""
    usable, missing = available_trackers(cfg.log.trackers)
    if env.accelerator.log_with is None:
        usable = []
    if missing and env.main:
        from .trackers import EXTRAS

        print(
            f"log.trackers: {', '.join(missing)} not installed (pip install "
            f"{' '.join(EXTRAS.get(n, n) for n in missing)}); metrics go to {env.run_dir / 'metrics.jsonl'}",
            flush=True,
        )
    if usable:
        run_name = cfg.name.replace("/", "_")
        env.accelerator.init_trackers(
            run_name, config=flat_config(config_to_dict(cfg)), init_kwargs=init_kwargs(usable, env.run_dir, run_name)
        )
    return bool(usable)


# ---- 8. one phase's update, logging, grids, checkpoints -------------------------------------------------
def _steps(
    cfg: Config,
    env: Env,
    tr: Trainer,
    bundle: TeacherBundle,
    source: BatchSource,
    log: RunLog,
    start_step: int,
    t_loop: float,
) -> tuple[int, bool, dict[str, float]]:
    """Steps start_step.. of the run: every phase's update, the EMA, and the records, grids and
    checkpoints their settings ask for. Returns the steps done, whether stop_after stopped the run
    early, and the last step's logs."""
    logs: dict[str, float] = {}
    done = start_step
    micro = micro_batch_size(cfg.data.batch_size, env.world, cfg.data.micro_batch_size)
    timer = StepTimer(env.device)  # step time, samples per second (training/trackers.py)
    for step in range(start_step, cfg.steps):
        timer.start()
        batches = split_batch(source(step), micro)  # this process's share, in micro-batches
        logs = {}
        student_updated = False
        for phase in tr.obj.phases(step):
            student_updated |= _update(cfg, env, tr, phase, batches, step, logs, log)
        if tr.ema is not None and student_updated:
            tr.ema.update(step)
        timer.stop()
        done = step + 1
        log.step()
        scores = _evaluate(cfg, env, tr, bundle, source) if due(cfg, done) else {}
        if done % cfg.log.every == 0 or done == cfg.steps or due(cfg, done):  # every process alike
            _record(env, tr, log, done, logs, t_loop, {**timer.stats(cfg.data.batch_size), **scores})
        if cfg.log.sample_every and done % cfg.log.sample_every == 0 and done < cfg.steps:
            _grid(cfg, env, tr, bundle, source, done)
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
            _checkpoint(cfg, env, tr, done)
        if cfg.stop_after is not None and done == cfg.stop_after and done < cfg.steps:
            _checkpoint(cfg, env, tr, done)
            return done, True, logs
    return done, False, logs


def _update(
    cfg: Config,
    env: Env,
    tr: Trainer,
    phase: str,
    batches: list[dict],
    step: int,
    logs: dict[str, float],
    log: RunLog,
) -> bool:
    """loss -> backward (accumulated over the micro-batches) -> average grads -> clip -> non-finite
    check -> step this group -> zero ALL grads -> after_step. Adds the phase's scalars to `logs`;
    True when the student's group stepped."""
    loss, obj_logs = accumulated_loss(tr.obj, phase, batches, step, env.accelerator.backward)
    plist = tr.group_params[phase]
    if not env.sharded:
        average_gradients(plist, env.world)
    loss_v = reduce_mean(loss, env.accelerator)
    norm = grad_norm_and_clip(plist, tr.gcfg[phase].grad_clip)
    ok = math.isfinite(loss_v) and math.isfinite(norm)
    if ok:
        tr.optimizers[phase].step()
        tr.schedulers[phase].step()
        tr.consecutive[phase] = 0
    else:
        tr.skipped += 1
        tr.consecutive[phase] += 1
    for m in [tr.tden, *tr.holder.values()]:
        m.zero_grad(set_to_none=True)
    if not ok:
        _nonfinite(cfg, env, tr, phase, step, loss_v, log)
    elif hasattr(tr.obj, "after_step"):
        tr.obj.after_step(phase, step)
    tr.made[phase] = tr.made.get(phase, 0) + 1
    logs[f"loss/{phase}"] = loss_v
    logs[f"grad_norm/{phase}"] = norm
    logs[f"lr/{phase}"] = tr.schedulers[phase].get_last_lr()[0]
    logs.update({f"{phase}/{k}": float(v) for k, v in obj_logs.items()})
    return ok and phase == tr.student_group


def _nonfinite(cfg: Config, env: Env, tr: Trainer, phase: str, step: int, loss_v: float, log: RunLog) -> None:
    """Report a skipped update; stop with NonFiniteError after too many in a row."""
    log.write(
        f"step {step}: non-finite {'loss' if not math.isfinite(loss_v) else 'gradient'} in "
        f"phase {phase!r}, update skipped ({tr.consecutive[phase]} in a row, {tr.skipped} in all)"
    )
    if tr.consecutive[phase] > cfg.faults.max_consecutive_nonfinite:
        last = last_good_checkpoint(env.run_dir)
        raise NonFiniteError(
            f"stopping at step {step}: {tr.consecutive[phase]} non-finite updates in a row of group "
            f"{phase!r} "
            f"(faults.max_consecutive_nonfinite={cfg.faults.max_consecutive_nonfinite}); "
            + (
                f"the last good checkpoint is {last} (resume=latest continues from it)"
                if last
                else "no checkpoint was written yet"
            )
        )


def _record(
    env: Env, tr: Trainer, log: RunLog, done: int, logs: dict[str, float], t_loop: float, main_only: dict
) -> None:
    """Average the objective's own scalars over processes and write the step's record, with the
    main process's own measures (`main_only`: step time, samples per second, evaluation scores)
    and its peak memory (training/trackers.py)."""
    own = sorted(k for k in logs if not k.startswith(("loss/", "grad_norm/", "lr/")))
    if own and env.world > 1:
        vals = torch.tensor([logs[k] for k in own], dtype=torch.float64, device=env.device)
        vals = env.accelerator.reduce(vals, reduction="mean")
        logs.update({k: float(v) for k, v in zip(own, vals.tolist(), strict=True)})
    logs["skipped"] = float(tr.skipped)
    logs.update({f"updates/{g}": float(n) for g, n in tr.made.items()})
    logs.update(main_only)
    log.record(done, {**logs, **peak_memory(env.device), "time_s": round(time.time() - t_loop, 4)})


def _evaluate(cfg: Config, env: Env, tr: Trainer, bundle: TeacherBundle, source: BatchSource) -> dict[str, float]:
    """Periodic evaluation (eval.every): FID and class accuracy of the student's samples (training/periodic_eval.py);
    with an EMA, of its weights too ("eval/fid_ema", "eval/class_acc_ema")."""
    args = (tr.obj.sampling, bundle, source.num_classes, env.device, env.main, env.sharded)
    scores = evaluate_student(cfg, tr.nets["student"], *args)
    if tr.ema is not None:
        with tr.ema.swapped():
            scores.update({f"{k}_ema": v for k, v in evaluate_student(cfg, tr.nets["student"], *args).items()})
    return scores


def _grid(
    cfg: Config, env: Env, tr: Trainer, bundle: TeacherBundle, source: BatchSource, done: int, use_ema: bool = False
) -> Path | None:
    """The student's sample grid as a PNG in the run folder, also sent to the trackers as an image."""
    path = sample_grid(
        cfg,
        tr.nets["student"],
        tr.obj.sampling,
        bundle,
        source,
        env.run_dir,
        done,
        env.main,
        env.sharded,
        env.device,
        ema=tr.ema if use_ema else None,
    )
    if path is not None:
        log_grid(env.accelerator, "samples/student_ema" if use_ema else "samples/student", path, done)
    return path


def _checkpoint(cfg: Config, env: Env, tr: Trainer, done: int) -> Path:
    # a checkpoint written while a group is in a non-finite streak is marked: never "the last good one"
    counters = {
        "skipped": tr.skipped,
        "nonfinite_streak": max(tr.consecutive.values(), default=0),
        "settings": tr.settings,
    }
    path = save_checkpoint(
        env.run_dir,
        done,
        counters=counters,
        sharded=env.sharded and cfg.checkpoint.state_dict == "sharded",
        keep=cfg.checkpoint.keep,
        **_checkpoint_kwargs(env, tr),
    )
    env.output.commit()  # a run this one replaces (overwrite=true) is deleted only now
    return path


# ---- 9. outputs --------------------------------------------------------------------------------------
def _save_outputs(
    cfg: Config, env: Env, tr: Trainer, bundle: TeacherBundle, source: BatchSource, done: int
) -> dict[str, str]:
    """The last sample grids (raw and EMA) and the final weights; returns the files written."""
    files: dict[str, str] = {}
    g = _grid(cfg, env, tr, bundle, source, done)
    if g is not None:
        files["samples"] = str(g.relative_to(env.run_dir))
    if tr.ema is not None:
        g = _grid(cfg, env, tr, bundle, source, done, use_ema=True)
        if g is not None:
            files["samples_ema"] = str(g.relative_to(env.run_dir))
    files.update(save_final(env.run_dir, tr.nets["student"], tr.ema, env.accelerator))
    if tr.ema is None and isinstance(tr.nets.get("student_ema"), nn.Module):  # an EMA the objective keeps
        files.update(save_final(env.run_dir, tr.nets["student_ema"], None, env.accelerator, folder="student_ema"))
    env.output.commit()  # the final weights exist: a run this one replaces (overwrite=true) goes now
    return files


def _write_card(cfg: Config, env: Env, tr: Trainer, bundle: TeacherBundle, facts: dict[str, Any]) -> str:
    """Write run_card.json (what was trained, how, and what it left); returns its name in the run dir.
    `facts`: num_classes, steps_done, wall, loop_time, files, logs (`outputs.run_card`)."""
    card = run_card(cfg, tr.params, tr.obj, bundle, tr.family, **facts, **_run_facts(env, tr))
    (env.run_dir / "run_card.json").write_text(dumps_json(card, indent=1, default=str))
    return "run_card.json"


def _run_facts(env: Env, tr: Trainer) -> dict[str, Any]:
    """What the run card records of the processes and of the updates made."""
    return {"skipped": tr.skipped, "world": env.world, "sharded": env.sharded, "mp": env.mp, "updates": dict(tr.made)}
