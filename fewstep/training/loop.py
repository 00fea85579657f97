"""The training loop, top to bottom:

    config -> accelerator -> teacher -> data -> objective (registry) -> placement / sharding /
    precision -> optimizers and schedulers per group -> resume -> for step: batch -> for phase:
    loss -> backward -> average grads -> clip -> non-finite check -> step that group -> zero ALL
    grads -> after_step -> EMA -> log / sample / checkpoint -> final weights + run card.

`run(cfg)` is what `accelerate launch train/train.py`, `fewstep train` and the tests call; it
returns the trained student and the objective with the run's outputs, so a script needs no reload.
Each numbered section of `run` is one function below; the per-phase update is `_update`.
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

from ..config import Config, ConfigError, config_to_dict, resolve_group
from ..errors import dumps_json, user_errors
from ..families import family_name
from ..objectives.registry import BuildContext, build_objective, make_params
from .bundle import TeacherBundle, load_bundle
from .checkpoint import last_good_checkpoint, load_checkpoint, save_checkpoint, saved_keys
from .checkpointing import enable_activation_checkpointing
from .compile import compile_backbones
from .data import BatchSource
from .ema import EMA
from .logging import RunLog, flat_config
from .lora import make_factories
from .outdir import OutputFolder
from .outputs import backbone_of, run_card, sample_grid, save_final
from .parallel import (
    available_trackers,
    average_gradients,
    broadcast_parameters,
    grad_norm_and_clip,
    is_fsdp,
    make_accelerator,
    reduce_mean,
    shard_module,
    wrap_autocast,
)
from .preflight import preflight
from .resume import check_resumed, settings
from .updates import resolve_steps, update_counts

__all__ = ["run", "RunResult", "NonFiniteError", "lr_lambda"]


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


def lr_lambda(kind: str, warmup: int, total: int, cycles: int = 1):
    """Learning-rate factor per update: linear warm-up, then constant / cosine / cosine with restarts."""

    def f(n: int) -> float:
        if warmup > 0 and n < warmup:
            return (n + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(1, total - warmup)
        prog = min(1.0, (n - warmup) / span)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * prog))
        if kind == "cosine_restarts":
            if prog >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((cycles * prog) % 1.0)))
        raise ValueError(f"unknown scheduler {kind!r}")

    return f


@dataclass
class _Env:
    """Where and how this process runs."""

    accelerator: Any
    run_dir: Path
    device: torch.device
    main: bool
    world: int
    rank: int
    sharded: bool
    mp: str
    output: OutputFolder | None = None  # the output folder's rules (overwrite keeps the old run until a checkpoint)

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)


@dataclass
class _Trainer:
    """The built run: objective and networks, what each optimizer group trains, the optimizers,
    the EMA, and the counters the loop keeps."""

    obj: Any
    params: Any
    family: str | None
    tden: nn.Module
    nets: dict[str, nn.Module]
    holder: nn.ModuleDict
    keys: set[str]
    group_params: dict[str, list[nn.Parameter]]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    gcfg: dict[str, Any]
    ema: EMA | None
    student_group: str | None
    skipped: int = 0
    consecutive: dict[str, int] = field(default_factory=dict)  # non-finite updates in a row, per group
    made: dict[str, int] = field(default_factory=dict)  # updates per group so far (attempted)
    settings: dict[str, Any] = field(default_factory=dict)  # what a checkpoint records to check a resume


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
    with user_errors(f"teacher.source={cfg.teacher.source!r}", ValueError, OSError, named=cfg.teacher.source):
        bundle = teacher if teacher is not None else load_bundle(cfg.teacher, env.device)  # 2. teacher (frozen)
    tden = bundle.denoiser
    tden.requires_grad_(False)
    tden.to(env.device)
    with user_errors("data", ValueError, OSError, named="data."):  # 3. data
        source = BatchSource(
            bundle,
            cfg.data.batch_size,
            cfg.seed,
            env.rank,
            env.world,
            env.device,
            cfg.data.real_data,
            cfg.data.prompts,
            cfg.data.num_classes,
            cfg.data.real_latents,
            conditions=cfg.data.conditions,
        )
    tr = _build(cfg, env, bundle, source)  # 4.-6. objective, optimizers
    start_step = _resume(cfg, env, tr, resume_from)  # 7. resume
    tr.made = update_counts(tr.obj, start_step)
    trackers = _start_trackers(cfg, env)
    log = RunLog(
        env.accelerator, env.run_dir, cfg.name, start_step, cfg.steps, progress=cfg.log.progress, trackers=trackers
    )
    logs: dict[str, float] = {}
    done, stopped_early, t_loop = start_step, False, time.time()
    try:  # 8. the loop
        for step in range(start_step, cfg.steps):
            batch = source(step)
            logs = {}
            student_updated = False
            for phase in tr.obj.phases(step):
                student_updated |= _update(cfg, env, tr, phase, batch, step, logs, log)
            if tr.ema is not None and student_updated:
                tr.ema.update(step)
            done = step + 1
            log.step()
            if done % cfg.log.every == 0 or done == cfg.steps:
                _record(env, tr, log, done, logs, t_loop)
            if cfg.log.sample_every and done % cfg.log.sample_every == 0 and done < cfg.steps:
                _grid(cfg, env, tr, bundle, source, done)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
                _checkpoint(cfg, env, tr, done)
            if cfg.stop_after is not None and done == cfg.stop_after and done < cfg.steps:
                _checkpoint(cfg, env, tr, done)
                stopped_early = True
                break
    finally:
        log.close()
    loop_time = time.time() - t_loop
    files = {} if stopped_early else _save_outputs(cfg, env, tr, bundle, source, done)  # 9. outputs
    wall = time.time() - t_start
    if env.main and not stopped_early:
        card = run_card(
            cfg,
            tr.params,
            tr.obj,
            bundle,
            tr.family,
            source.num_classes,
            steps_done=done,
            wall=wall,
            loop_time=loop_time,
            skipped=tr.skipped,
            world=env.world,
            sharded=env.sharded,
            mp=env.mp,
            files=files,
            logs=logs,
            updates=dict(tr.made),
        )
        (env.run_dir / "run_card.json").write_text(dumps_json(card, indent=1, default=str))
        files["run_card"] = "run_card.json"
    if trackers:
        env.accelerator.end_training()
    if env.main:
        _summary(cfg, env, tr, done, start_step, wall, loop_time, logs, stopped_early)
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
def _start(cfg: Config, accelerator, output: list[OutputFolder]) -> tuple[_Env, Path | None]:
    run_dir = cfg.run_dir()
    if accelerator is None:
        accelerator = make_accelerator(cfg.precision.mixed_precision, cfg.log.trackers, str(run_dir))
    env = _Env(
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


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ---- 4.-6. objective, placement, optimizers ---------------------------------------------------------
def _build(cfg: Config, env: _Env, bundle: TeacherBundle, source: BatchSource) -> _Trainer:
    """The objective through the registry, its trainable networks placed, sharded and cast, and one
    optimizer and learning-rate schedule per group."""
    tden = bundle.denoiser
    teacher_tensors = {id(t) for t in list(tden.parameters()) + list(tden.buffers())}
    family = bundle.family or family_name(tden.backbone)
    make_student, make_copy = make_factories(
        cfg.lora, sharded=env.sharded, family=family, gradient_checkpointing=cfg.precision.gradient_checkpointing
    )
    ctx = BuildContext(
        latent_shape=tuple(bundle.latent_shape),
        num_classes=source.num_classes,
        null_class=bundle.null_class,
        text=bundle.text,
        has_real_data=source.has_real_data,
        seed=cfg.seed,
        device=env.device,
        family=family,
        lora=cfg.lora,
        num_processes=env.world,
        sharded=env.sharded,
        mixed_precision=env.mp,
        gradient_checkpointing=cfg.precision.gradient_checkpointing,
        steps=cfg.steps or 1,
        make_student=make_student,
        make_copy=make_copy,
        decode=bundle.decode,
    )
    params = make_params(cfg.objective.name, cfg.objective.params)
    obj = build_objective(cfg.objective.name, params, tden, ctx)
    _check_groups(cfg, obj, cfg.objective.name)
    cfg.steps = resolve_steps(cfg, obj)  # generator_steps -> steps (the objective's update schedule)
    nets: dict[str, nn.Module] = obj.nets
    if "student" not in nets:
        raise TypeError(
            f"objective {cfg.objective.name!r}: nets has no 'student' role (sampling, EMA and the "
            "final weights need it)"
        )
    teacher_roles = {r for r, m in nets.items() if m is tden or r == "teacher"}
    holder = nn.ModuleDict({r: m for r, m in nets.items() if r not in teacher_roles})
    holder.to(env.device)
    if cfg.precision.gradient_checkpointing:
        enable_activation_checkpointing(holder.values(), say=env.say)
    group_names = _group_names(cfg, obj, holder, teacher_roles)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = saved_keys(holder, teacher_tensors)
    keys &= set(get_model_state_dict(holder, options=StateDictOptions()).keys())
    student_group = next((g for g, roles in obj.groups.items() if "student" in roles), None)
    _place(env, tden, holder)
    if cfg.precision.compile:
        compile_backbones([*holder.values(), tden], cfg.precision.compile_mode, env.say)
    named = dict(holder.named_parameters(remove_duplicate=False))
    group_params = {g: [named[n] for n in names] for g, names in group_names.items()}
    optimizers, schedulers, gcfg = _optimizers(cfg, obj, group_params)
    ema = None
    if cfg.ema.rate > 0:
        ema = EMA(
            {n: p for n, p in named.items() if n.startswith("student.") and p.requires_grad},
            cfg.ema.rate,
            cfg.ema.start_step,
        )
    return _Trainer(
        obj,
        params,
        family,
        tden,
        nets,
        holder,
        keys,
        group_params,
        optimizers,
        schedulers,
        gcfg,
        ema,
        student_group,
        consecutive={g: 0 for g in obj.groups},
        settings=settings(cfg, gcfg, cfg.objective.name, params),
    )


def _check_groups(cfg: Config, obj: Any, name: str) -> None:
    for g in cfg.optim:
        if g != "default" and g not in obj.groups:
            raise ConfigError(
                f"optim.{g}: objective {name!r} has no optimizer group {g!r} (its groups: {', '.join(obj.groups)})"
            )


def _group_names(cfg: Config, obj: Any, holder: nn.ModuleDict, teacher_roles: set[str]) -> dict[str, list[str]]:
    """Which parameters each optimizer group trains (by name, fixed now; sharding swaps the objects)."""
    group_names: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for g, roles in obj.groups.items():
        names = []
        for r in roles:
            if r in teacher_roles:
                raise TypeError(f"objective {cfg.objective.name!r}: group {g!r} trains the teacher")
            for n, p in holder[r].named_parameters(prefix=r):
                if p.requires_grad and n not in names:
                    if n in owner and owner[n] != g:
                        raise TypeError(f"parameter {n} is trained by two groups, {owner[n]!r} and {g!r}")
                    owner[n] = g
                    names.append(n)
        if not names:
            raise TypeError(f"objective {cfg.objective.name!r}: group {g!r} ({roles}) has no trainable parameters")
        group_names[g] = names
    return group_names


def _place(env: _Env, tden: nn.Module, holder: nn.ModuleDict) -> None:
    """5. The same initial weights on every process; FSDP sharding and bf16 autocast per backbone."""
    broadcast_parameters(list(holder.values()), env.world)
    backbones: list[nn.Module] = []
    for m in [tden, *holder.values()]:
        bb = backbone_of(m)
        if all(bb is not b for b in backbones):
            backbones.append(bb)
    if env.sharded:
        if len(backbones) < 1 + len(holder):
            raise ConfigError(
                "FSDP sharding needs one backbone per role; this objective shares one backbone "
                "between roles (e.g. objective.shared_base=true): use lora.student / lora.fake "
                "copies, or run without FSDP"
            )
        for bb in backbones:
            shard_module(env.accelerator, bb)
    if env.mp == "bf16":
        for bb in backbones:
            wrap_autocast(bb, env.device.type)


def _optimizers(cfg: Config, obj: Any, group_params: dict[str, list[nn.Parameter]]):
    """6. AdamW and a LambdaLR schedule per group, the schedule's length counted in that group's updates."""
    updates = update_counts(obj, cfg.steps, name=cfg.objective.name)  # raises on a phase that is no group
    optimizers, schedulers, gcfg = {}, {}, {}
    for g, plist in group_params.items():
        gc = gcfg[g] = resolve_group(cfg, g, (getattr(obj, "optim", None) or {}).get(g))
        optimizers[g] = torch.optim.AdamW(
            plist, lr=gc.lr, betas=tuple(gc.betas), eps=gc.eps, weight_decay=gc.weight_decay
        )
        schedulers[g] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[g], lr_lambda(gc.scheduler, gc.warmup_steps, updates[g], gc.num_cycles)
        )
    return optimizers, schedulers, gcfg


# ---- 7. resume, trackers ------------------------------------------------------------------------------
def _checkpoint_kwargs(env: _Env, tr: _Trainer) -> dict[str, Any]:
    return dict(
        accelerator=env.accelerator,
        holder=tr.holder,
        keys=tr.keys,
        optimizers=tr.optimizers,
        schedulers=tr.schedulers,
        ema=tr.ema,
        objective=tr.obj,
    )


def _resume(cfg: Config, env: _Env, tr: _Trainer, resume_from: Path | None) -> int:
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


def _start_trackers(cfg: Config, env: _Env) -> bool:
    """Start the experiment trackers that are installed; True when any runs."""
    usable, missing = available_trackers(cfg.log.trackers)
    if env.accelerator.log_with is None:
        usable = []
    if missing and env.main:
        print(
            f"log.trackers: {', '.join(missing)} not installed; metrics go to {env.run_dir / 'metrics.jsonl'}",
            flush=True,
        )
    if usable:
        env.accelerator.init_trackers(cfg.name.replace("/", "_"), config=flat_config(config_to_dict(cfg)))
    return bool(usable)


# ---- 8. one phase's update, logging, grids, checkpoints -------------------------------------------------
def _update(
    cfg: Config, env: _Env, tr: _Trainer, phase: str, batch: dict, step: int, logs: dict[str, float], log: RunLog
) -> bool:
    """loss -> backward -> average grads -> clip -> non-finite check -> step this group -> zero ALL
    grads -> after_step. Adds the phase's scalars to `logs`; True when the student's group stepped."""
    loss, obj_logs = tr.obj.loss(phase, batch, step)
    env.accelerator.backward(loss)
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


def _nonfinite(cfg: Config, env: _Env, tr: _Trainer, phase: str, step: int, loss_v: float, log: RunLog) -> None:
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


def _record(env: _Env, tr: _Trainer, log: RunLog, done: int, logs: dict[str, float], t_loop: float) -> None:
    """Average the objective's own scalars over processes and write the step's record."""
    own = sorted(k for k in logs if not k.startswith(("loss/", "grad_norm/", "lr/")))
    if own and env.world > 1:
        vals = torch.tensor([logs[k] for k in own], dtype=torch.float64, device=env.device)
        vals = env.accelerator.reduce(vals, reduction="mean")
        logs.update({k: float(v) for k, v in zip(own, vals.tolist(), strict=True)})
    logs["skipped"] = float(tr.skipped)
    logs.update({f"updates/{g}": float(n) for g, n in tr.made.items()})
    log.record(done, {**logs, "time_s": round(time.time() - t_loop, 4)})


def _grid(
    cfg: Config, env: _Env, tr: _Trainer, bundle: TeacherBundle, source: BatchSource, done: int, use_ema: bool = False
) -> Path | None:
    return sample_grid(
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


def _checkpoint(cfg: Config, env: _Env, tr: _Trainer, done: int) -> Path:
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
    cfg: Config, env: _Env, tr: _Trainer, bundle: TeacherBundle, source: BatchSource, done: int
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


def _summary(
    cfg: Config,
    env: _Env,
    tr: _Trainer,
    done: int,
    start_step: int,
    wall: float,
    loop_time: float,
    logs: dict[str, float],
    stopped_early: bool,
) -> None:
    its = (done - start_step) / max(loop_time, 1e-9)
    losses = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in logs.items() if k.startswith("loss/"))
    what = "stopped (checkpoint written, resume=latest continues)" if stopped_early else "done"
    ups = ", ".join(f"{g} {n}" for g, n in tr.made.items())
    print(
        f"fewstep train {what}: {cfg.name} [{cfg.objective.name}] {done}/{cfg.steps} steps "
        f"(updates: {ups}) in {wall:.1f}s ({its:.2f} it/s), {tr.skipped} non-finite updates skipped"
        f"{', final ' + losses if losses else ''}; outputs in {env.run_dir}",
        flush=True,
    )
