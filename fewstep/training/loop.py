"""The training loop, top to bottom:

    config -> accelerator -> teacher -> data -> objective (registry) -> placement / sharding /
    precision -> optimizers and schedulers per group -> resume -> for step: batch -> for phase:
    loss -> backward -> average grads -> clip -> non-finite check -> step that group -> zero ALL
    grads -> after_step -> EMA -> log / sample / checkpoint -> final weights + run card.

`run(cfg)` is what `accelerate launch train/train.py`, `fewstep train` and the tests call.
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
from ..objectives.registry import BuildContext, build_objective, make_params
from ..samplers import initial_noise, sample
from .checkpoint import last_good_checkpoint, load_checkpoint, save_checkpoint, saved_keys
from .data import BatchSource
from .ema import EMA
from .logging import RunLog, flat_config, save_grid
from ..families import family_name
from .bundle import TeacherBundle, load_bundle
from .lora import lora_meta, lora_only_state_dict, make_factories, merge_lora_state_dict
from .outdir import OutputFolder
from .parallel import (available_trackers, average_gradients, broadcast_parameters, grad_norm_and_clip, is_fsdp,
                       make_accelerator, reduce_mean, shard_module, wrap_autocast)
from .preflight import preflight
from .resume import check_resumed, settings

__all__ = ["run", "RunResult", "NonFiniteError", "lr_lambda"]


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row."""


@dataclass
class RunResult:
    run_dir: Path
    steps: int                      # steps completed (the next step to run)
    stopped_early: bool             # stopped by stop_after (a checkpoint holds the state)
    skipped: int                    # non-finite updates skipped
    wall_time: float
    logs: dict[str, float] = field(default_factory=dict)   # the last step's (process-averaged) logs
    files: dict[str, str] = field(default_factory=dict)


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


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _backbone(m: nn.Module) -> nn.Module:
    """The network a role runs: a Denoiser's (or role view's) backbone, else the module itself."""
    bb = getattr(m, "backbone", None)
    return bb if isinstance(bb, nn.Module) else m


def _check_groups(cfg: Config, obj: Any, name: str) -> None:
    for g in cfg.optim:
        if g != "default" and g not in obj.groups:
            raise ConfigError(f"optim.{g}: objective {name!r} has no optimizer group {g!r} "
                              f"(its groups: {', '.join(obj.groups)})")


def _plain_config(bb: nn.Module) -> dict | None:
    cfg = getattr(bb, "config", None)
    if cfg is None or not hasattr(cfg, "items"):
        return None
    import diffusers

    orig = next((c for c in type(bb).__mro__ if c.__module__.startswith("diffusers.")), type(bb))
    out = {"_class_name": orig.__name__, "_diffusers_version": diffusers.__version__}
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")})
    return out


def run(cfg: Config, teacher: TeacherBundle | None = None, accelerator=None) -> RunResult:
    """Train as `cfg` says. `teacher` overrides cfg.teacher (tests, scripts); `accelerator` lets a
    caller set up processes / FSDP itself. Everything that can be checked without the teacher is
    checked before the output folder is touched; a run replacing another (overwrite=true) puts
    the old one back if it fails before its first checkpoint."""
    preflight(cfg, check_teacher=teacher is None)
    output: list[OutputFolder] = []
    try:
        return _run(cfg, teacher, accelerator, output)
    except BaseException:
        for out in output:
            out.restore()
        raise


def _run(cfg: Config, teacher: TeacherBundle | None, accelerator, output: list[OutputFolder]) -> RunResult:
    t_start = time.time()

    # 1. accelerator, output folder, seeds ----------------------------------------------------------
    run_dir = cfg.run_dir()
    if accelerator is None:
        accelerator = make_accelerator(cfg.precision.mixed_precision, cfg.log.trackers, str(run_dir))
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    sharded = is_fsdp(accelerator)
    mp = accelerator.mixed_precision
    if mp not in ("no", "bf16"):
        raise ConfigError(f"precision.mixed_precision={mp!r} is not supported; use 'no' or 'bf16'")
    if device.type == "cuda" and cfg.precision.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def say(msg: str) -> None:
        if main:
            print(msg, flush=True)

    out = OutputFolder.prepare(cfg, run_dir, accelerator, say)
    output.append(out)
    resume_from = out.resume_from
    _seed_all(cfg.seed)  # the same on every process while the networks are built

    # 2. teacher (frozen) -----------------------------------------------------------------------------
    with user_errors(f"teacher.source={cfg.teacher.source!r}", ValueError, OSError, named=cfg.teacher.source):
        bundle = teacher if teacher is not None else load_bundle(cfg.teacher, device)
    tden = bundle.denoiser
    tden.requires_grad_(False)
    tden.to(device)
    teacher_tensors = {id(t) for t in list(tden.parameters()) + list(tden.buffers())}

    # 3. data -------------------------------------------------------------------------------------------
    with user_errors("data", ValueError, OSError, named="data."):
        source = BatchSource(bundle, cfg.data.batch_size, cfg.seed, rank, world, device, cfg.data.real_data,
                             cfg.data.prompts, cfg.data.num_classes, cfg.data.real_latents)

    # 4. objective via the registry ----------------------------------------------------------------------
    family = bundle.family or family_name(tden.backbone)
    make_student, make_copy = make_factories(cfg.lora, sharded=sharded, family=family,
                                             gradient_checkpointing=cfg.precision.gradient_checkpointing)
    ctx = BuildContext(latent_shape=tuple(bundle.latent_shape), num_classes=source.num_classes,
                       null_class=bundle.null_class, text=bundle.text, has_real_data=source.has_real_data,
                       seed=cfg.seed, device=device, family=family, lora=cfg.lora, num_processes=world,
                       sharded=sharded, mixed_precision=mp, gradient_checkpointing=cfg.precision.gradient_checkpointing,
                       steps=cfg.steps, make_student=make_student, make_copy=make_copy)
    params = make_params(cfg.objective.name, cfg.objective.params)
    obj = build_objective(cfg.objective.name, params, tden, ctx)
    _check_groups(cfg, obj, cfg.objective.name)
    nets: dict[str, nn.Module] = obj.nets
    if "student" not in nets:
        raise TypeError(f"objective {cfg.objective.name!r}: nets has no 'student' role (sampling, EMA and the "
                        "final weights need it)")
    teacher_roles = {r for r, m in nets.items() if m is tden or r == "teacher"}
    holder = nn.ModuleDict({r: m for r, m in nets.items() if r not in teacher_roles})
    holder.to(device)
    if cfg.precision.gradient_checkpointing:
        for m in holder.values():
            bb = _backbone(m)
            if any(p.requires_grad for p in bb.parameters()) and getattr(bb, "_supports_gradient_checkpointing", False):
                bb.enable_gradient_checkpointing()

    # which parameters each optimizer group trains (by name, fixed now; sharding swaps the objects)
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = saved_keys(holder, teacher_tensors)
    keys &= set(get_model_state_dict(holder, options=StateDictOptions()).keys())
    student_group = next((g for g, roles in obj.groups.items() if "student" in roles), None)

    # 5. placement, sharding, precision -------------------------------------------------------------------
    broadcast_parameters(list(holder.values()), world)
    backbones: list[nn.Module] = []
    for m in [tden, *holder.values()]:
        bb = _backbone(m)
        if all(bb is not b for b in backbones):
            backbones.append(bb)
    if sharded:
        if len(backbones) < 1 + len(holder):
            raise ConfigError("FSDP sharding needs one backbone per role; this objective shares one backbone "
                              "between roles (e.g. objective.shared_base=true): use lora.student / lora.fake "
                              "copies, or run without FSDP")
        for bb in backbones:
            shard_module(accelerator, bb)
    if mp == "bf16":
        for bb in backbones:
            wrap_autocast(bb, device.type)

    # 6. optimizers and schedulers, one per group ---------------------------------------------------------
    named = dict(holder.named_parameters(remove_duplicate=False))
    group_params = {g: [named[n] for n in names] for g, names in group_names.items()}
    updates = {g: 0 for g in obj.groups}
    for s in range(cfg.steps):
        for ph in obj.phases(s):
            if ph not in updates:
                raise TypeError(f"objective {cfg.objective.name!r}: phases({s}) names {ph!r}, not one of its groups")
            updates[ph] += 1
    optimizers, schedulers, gcfg = {}, {}, {}
    for g, plist in group_params.items():
        gc = gcfg[g] = resolve_group(cfg, g, (getattr(obj, "optim", None) or {}).get(g))
        optimizers[g] = torch.optim.AdamW(plist, lr=gc.lr, betas=tuple(gc.betas), eps=gc.eps,
                                          weight_decay=gc.weight_decay)
        schedulers[g] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[g], lr_lambda(gc.scheduler, gc.warmup_steps, updates[g], gc.num_cycles))
    run_settings = settings(cfg, gcfg, cfg.objective.name, params)
    ema = None
    if cfg.ema.rate > 0:
        ema = EMA({n: p for n, p in named.items() if n.startswith("student.") and p.requires_grad},
                  cfg.ema.rate, cfg.ema.start_step)

    # 7. resume ---------------------------------------------------------------------------------------------
    start_step, skipped = 0, 0
    ck_kw = dict(accelerator=accelerator, holder=holder, keys=keys, optimizers=optimizers, schedulers=schedulers,
                 ema=ema, objective=obj)
    if resume_from is not None:
        check_resumed(json.loads((resume_from / "state.json").read_text()), run_settings, say)
        state = load_checkpoint(resume_from, **ck_kw)
        start_step, skipped = int(state["step"]), int(state.get("skipped", 0))
        if main:  # drop records of steps after the checkpoint (an interrupted run wrote them)
            mfile = run_dir / "metrics.jsonl"
            if mfile.is_file():
                keep = [ln for ln in mfile.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
                mfile.write_text("".join(k + "\n" for k in keep))
    else:
        _seed_all(cfg.seed * 1000 + 7919 * rank + 1)  # per-process randomness for training
    if main:
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    usable_trackers, missing_trackers = available_trackers(cfg.log.trackers)
    if accelerator.log_with is None:
        usable_trackers = []
    if missing_trackers and main:
        print(f"log.trackers: {', '.join(missing_trackers)} not installed; metrics go to {run_dir / 'metrics.jsonl'}",
              flush=True)
    if usable_trackers:
        accelerator.init_trackers(cfg.name.replace("/", "_"), config=flat_config(config_to_dict(cfg)))

    def checkpoint(step_done: int) -> Path:
        # a checkpoint written while a group is in a non-finite streak is marked: never "the last good one"
        counters = {"skipped": skipped, "nonfinite_streak": max(consecutive.values(), default=0),
                    "settings": run_settings}
        path = save_checkpoint(run_dir, step_done, counters=counters, sharded=sharded and
                               cfg.checkpoint.state_dict == "sharded", keep=cfg.checkpoint.keep, **ck_kw)
        out.commit()  # a run this one replaces (overwrite=true) is deleted only now
        return path

    def grid(step_done: int, use_ema: bool = False) -> Path | None:
        if not (main or sharded):
            return None
        rng = torch.get_rng_state()
        n = cfg.log.sample_count
        noise = initial_noise((n, *bundle.latent_shape), torch.Generator().manual_seed(cfg.log.sample_seed), device)
        ctx_ema = ema.swapped() if use_ema else _nullcontext()
        with ctx_ema:
            x0 = sample(nets["student"], noise, source.grid_cond(n), obj.sampling["times"],
                        renoise=obj.sampling["renoise"], generator=torch.Generator().manual_seed(cfg.log.sample_seed + 1))
        torch.set_rng_state(rng)
        if not main:
            return None
        images = bundle.decode(x0) if bundle.decode is not None else x0
        k = source.num_classes
        tag = "_ema" if use_ema else ""
        return save_grid(images, run_dir / "samples" / f"step_{step_done:07d}{tag}.png",
                         nrow=k if k and k <= n and k <= 16 else None)

    # 8. the loop --------------------------------------------------------------------------------------------
    log = RunLog(accelerator, run_dir, cfg.name, start_step, cfg.steps, progress=cfg.log.progress,
                 trackers=bool(usable_trackers))
    all_modules = [tden, *holder.values()]
    consecutive = {g: 0 for g in obj.groups}   # non-finite updates in a row, per group
    stopped_early = False
    logs: dict[str, float] = {}
    done = start_step
    t_loop = time.time()
    try:
        for step in range(start_step, cfg.steps):
            batch = source(step)
            logs = {}
            student_updated = False
            for phase in obj.phases(step):
                loss, obj_logs = obj.loss(phase, batch, step)
                accelerator.backward(loss)
                plist = group_params[phase]
                if not sharded:
                    average_gradients(plist, world)
                loss_v = reduce_mean(loss, accelerator)
                norm = grad_norm_and_clip(plist, gcfg[phase].grad_clip)
                ok = math.isfinite(loss_v) and math.isfinite(norm)
                if ok:
                    optimizers[phase].step()
                    schedulers[phase].step()
                    consecutive[phase] = 0
                else:
                    skipped += 1
                    consecutive[phase] += 1
                for m in all_modules:
                    m.zero_grad(set_to_none=True)
                if not ok:
                    log.write(f"step {step}: non-finite {'loss' if not math.isfinite(loss_v) else 'gradient'} in "
                              f"phase {phase!r}, update skipped ({consecutive[phase]} in a row, {skipped} in all)")
                    if consecutive[phase] > cfg.faults.max_consecutive_nonfinite:
                        last = last_good_checkpoint(run_dir)
                        raise NonFiniteError(
                            f"stopping at step {step}: {consecutive[phase]} non-finite updates in a row of group "
                            f"{phase!r} "
                            f"(faults.max_consecutive_nonfinite={cfg.faults.max_consecutive_nonfinite}); "
                            + (f"the last good checkpoint is {last} (resume=latest continues from it)" if last
                               else "no checkpoint was written yet"))
                else:
                    if hasattr(obj, "after_step"):
                        obj.after_step(phase, step)
                    student_updated |= phase == student_group
                logs[f"loss/{phase}"] = loss_v
                logs[f"grad_norm/{phase}"] = norm
                logs[f"lr/{phase}"] = schedulers[phase].get_last_lr()[0]
                logs.update({f"{phase}/{k}": float(v) for k, v in obj_logs.items()})
            if ema is not None and student_updated:
                ema.update(step)
            done = step + 1
            log.step()
            if done % cfg.log.every == 0 or done == cfg.steps:
                own = sorted(k for k in logs if not k.startswith(("loss/", "grad_norm/", "lr/")))
                if own and world > 1:
                    vals = torch.tensor([logs[k] for k in own], dtype=torch.float64, device=device)
                    vals = accelerator.reduce(vals, reduction="mean")
                    logs.update({k: float(v) for k, v in zip(own, vals.tolist())})
                logs["skipped"] = float(skipped)
                log.record(done, {**logs, "time_s": round(time.time() - t_loop, 4)})
            if cfg.log.sample_every and done % cfg.log.sample_every == 0 and done < cfg.steps:
                grid(done)
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < cfg.steps:
                checkpoint(done)
            if cfg.stop_after is not None and done == cfg.stop_after and done < cfg.steps:
                checkpoint(done)
                stopped_early = True
                break
    finally:
        log.close()
    steps_done = done
    loop_time = time.time() - t_loop

    # 9. outputs: final weights (student, EMA, LoRA), last grid, run card -------------------------------------
    files: dict[str, str] = {}
    if not stopped_early:
        g = grid(steps_done)
        if g is not None:
            files["samples"] = str(g.relative_to(run_dir))
        if ema is not None:
            g = grid(steps_done, use_ema=True)
            if g is not None:
                files["samples_ema"] = str(g.relative_to(run_dir))
        files.update(_save_final(run_dir, nets["student"], ema, accelerator))
        if ema is None and isinstance(nets.get("student_ema"), nn.Module):  # an EMA the objective keeps
            files.update(_save_final(run_dir, nets["student_ema"], None, accelerator, folder="student_ema"))
    wall = time.time() - t_start
    if main and not stopped_early:
        card = {
            "name": cfg.name,
            "objective": cfg.objective.name,
            "objective_params": _jsonable(params),
            "teacher": {"source": bundle.source, "family": family, "latent_shape": list(bundle.latent_shape),
                        "num_classes": source.num_classes, "null_class": bundle.null_class},
            "sampling": {"times": [float(t) for t in obj.sampling["times"]], "renoise": obj.sampling["renoise"],
                         **({"prediction_type": obj.sampling["prediction_type"]}
                            if obj.sampling.get("prediction_type") else {})},
            "steps": steps_done,
            "steps_planned": cfg.steps,
            "batch_size": cfg.data.batch_size,
            "wall_time_s": round(wall, 2),
            "train_time_s": round(loop_time, 2),
            "nonfinite_skipped": skipped,
            "processes": world,
            "sharded": sharded,
            "mixed_precision": mp,
            "lora": {"student": cfg.lora.student, "fake": cfg.lora.fake, "rank": cfg.lora.rank,
                     "alpha": cfg.lora.alpha} if (cfg.lora.student or cfg.lora.fake) else None,
            "ema_rate": cfg.ema.rate,
            "files": files,
            "final_logs": logs,
            "config": config_to_dict(cfg),
        }
        (run_dir / "run_card.json").write_text(dumps_json(card, indent=1, default=str))
        files["run_card"] = "run_card.json"
    if not stopped_early:
        out.commit()
    if usable_trackers:
        accelerator.end_training()
    if main:
        its = (steps_done - start_step) / max(loop_time, 1e-9)
        losses = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in logs.items() if k.startswith("loss/"))
        what = "stopped (checkpoint written, resume=latest continues)" if stopped_early else "done"
        print(f"fewstep train {what}: {cfg.name} [{cfg.objective.name}] {steps_done}/{cfg.steps} steps in "
              f"{wall:.1f}s ({its:.2f} it/s), {skipped} non-finite updates skipped"
              f"{', final ' + losses if losses else ''}; outputs in {run_dir}", flush=True)
    return RunResult(run_dir=run_dir, steps=steps_done, stopped_early=stopped_early, skipped=skipped,
                     wall_time=wall, logs=logs, files=files)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _jsonable(p: Any) -> dict | None:
    import dataclasses

    if p is None or not dataclasses.is_dataclass(p):
        return None
    return json.loads(json.dumps(dataclasses.asdict(p), default=str))


def _save_final(run_dir: Path, student: nn.Module, ema: EMA | None, accelerator,
                folder: str = "student") -> dict[str, str]:
    """The student's weights as a diffusers model folder (LoRA merged), its EMA likewise, and the
    LoRA adapters alone. Collective under FSDP."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if hasattr(student, "standalone"):  # a role view on a shared backbone: its adapter merged into a copy
        student = student.standalone()
    bb = _backbone(student)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def grab() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_model_state_dict(bb, options=opts).items()}

    sd = grab()
    sd_ema = None
    if ema is not None:
        with ema.swapped():
            sd_ema = grab()
    if not accelerator.is_main_process:
        return {}
    meta = lora_meta(bb)
    config = _plain_config(bb)
    out = run_dir / "final"
    files = {}

    def write(folder: str, state: dict[str, torch.Tensor]) -> None:
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        plain = merge_lora_state_dict(state, meta["alpha"] / meta["rank"], meta["adapter"]) if meta else state
        if config is not None:
            (d / "config.json").write_text(json.dumps(config, indent=1, default=list))
            save_file(plain, str(d / "diffusion_pytorch_model.safetensors"))
        else:
            save_file(plain, str(d / "model.safetensors"))
        files[folder] = str(d.relative_to(run_dir))

    write(folder, sd)
    if sd_ema is not None:
        write(f"{folder}_ema", sd_ema)
    # the student's adapter alone (a shared backbone may also hold other roles' adapters)
    adapter = {k.replace(f".{meta['adapter']}.", "."): v for k, v in lora_only_state_dict(sd).items()
               if f".{meta['adapter']}." in k} if meta else {}
    if adapter:
        save_file(adapter, str(out / f"{folder}_lora.safetensors"),
                  metadata={"rank": str(meta["rank"]), "alpha": str(meta["alpha"]),
                            "target_modules": json.dumps(meta["targets"])})
        files[f"{folder}_lora"] = str((out / f"{folder}_lora.safetensors").relative_to(run_dir))
    return files
