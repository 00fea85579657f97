"""Atomic, resumable checkpoints.

    <run>/checkpoints/step_0000500/
        state.json           step, counters, format, the run's settings (fewstep.training.resume)
        manifest.json        size and sha256 of every other file; written last (training/manifest.py)
        model.safetensors    the networks' state (full format), keys "<role>.<param>"
        optim.pt             all optimizers, keyed by parameter name (torch.load weights_only)
        ema.safetensors      the student's EMA shadows
        shards/              sharded format (FSDP): one file per process via torch.distributed.checkpoint
        schedulers.pt, objective.pt, rng_<process>.pt

Everything is written into `.tmp-step_XXXXXXX` and renamed when complete; `latest_checkpoint`
only considers `step_*` folders holding a state.json, so a crash mid-save never leaves a
checkpoint that resume would pick up; `checkpoint_problem` also checks the manifest, so a file
damaged later (truncated, overwritten) is found before it is loaded. Pruning keeps the new
checkpoint and the `keep - 1` newest ones of lower step; a checkpoint of higher step (another
branch of the run) is never pruned. A checkpoint written while some optimizer group was in a
streak of non-finite updates is marked (`nonfinite_streak` > 0 in state.json) and is never the
"last good" one.

What is saved of the networks: every trainable parameter, plus any other parameter or buffer of a
non-teacher network that is not a frozen tensor shared with the teacher (and not a frozen LoRA
base weight): e.g. a full fake score, a LoRA student's adapters, an EMA target network. The
teacher is reloaded from its source on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RENAMED_GROUPS
from ..errors import UserError
from .manifest import verify_manifest, write_manifest

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "saved_keys",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "clean_stale",
    "checkpoint_problem",
    "is_marked",
    "last_good_checkpoint",
]

_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (incomplete, damaged, or of another run's shape)."""


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def read_state(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable state.json ({type(e).__name__}: {e})") from None


def is_marked(state: dict[str, Any]) -> bool:
    """Written while an optimizer group was in a streak of non-finite updates."""
    return int(state.get("nonfinite_streak", 0) or 0) > 0


def checkpoint_problem(path: str | Path, hashes: bool = True) -> str | None:
    """None when the checkpoint is complete and its files match its manifest; else what is wrong."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return "no state.json (not a complete checkpoint)"
    return verify_manifest(path, hashes=hashes)


def last_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that is verified and was not written during a non-finite streak."""
    for _, p in reversed(list_checkpoints(run_dir)):
        if checkpoint_problem(p) is None and not is_marked(read_state(p)):
            return p
    return None


def clean_stale(run_dir: str | Path) -> None:
    """Remove temporary folders of interrupted saves (main process, before training)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
def saved_keys(holder: nn.Module, teacher_tensors: set[int]) -> set[str]:
    """Names (as in holder.state_dict()) of the tensors a checkpoint must hold; computed before
    sharding, while tensor identity with the teacher is still visible."""
    keys = set()
    for n, p in holder.named_parameters(remove_duplicate=False):
        frozen = not p.requires_grad
        if frozen and (id(p) in teacher_tensors or ".base_layer." in n):
            continue
        keys.add(n)
    for n, b in holder.named_buffers(remove_duplicate=False):
        if id(b) in teacher_tensors or ".base_layer." in n:
            continue
        keys.add(n)
    return keys


def rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    except ImportError:  # pragma: no cover
        pass
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np

        n = st["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


def _barrier(accelerator) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _cpu_contig(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _options(full: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, **kw)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    accelerator,
    holder: nn.Module,
    keys: set[str],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    ema=None,
    objective: Any = None,
    counters: dict[str, Any] | None = None,
    sharded: bool = False,
    keep: int = 3,
    _fail_after: str | None = None,
) -> Path:
    """Save everything a resume needs; returns the checkpoint folder. Collective under FSDP:
    every process must call it. `_fail_after` (tests) raises after the named part is written."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(accelerator)

    def fail(part: str) -> None:
        if _fail_after == part:
            raise CheckpointError(f"simulated failure after writing {part}")

    full = not sharded
    model_sd = {k: v for k, v in get_model_state_dict(holder, options=_options(full)).items() if k in keys}
    opt_list = list(optimizers.values())
    optim_sd = get_optimizer_state_dict(holder, opt_list, options=_options(full)) if opt_list else {}
    ema_sd = ema.state_dict() if ema is not None else {}
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema_sd}, checkpoint_id=str(tmp / "shards"))
    else:
        ema_full = {k: _full(v) for k, v in ema_sd.items()}  # collective for DTensors
        if main:
            save_file(_cpu_contig(model_sd), str(tmp / "model.safetensors"))
            fail("model")
            torch.save(optim_sd, tmp / "optim.pt")
            if ema_full:
                save_file(_cpu_contig(ema_full), str(tmp / "ema.safetensors"))
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if main:
        torch.save({g: s.state_dict() for g, s in schedulers.items()}, tmp / "schedulers.pt")
        if objective is not None and hasattr(objective, "state_dict"):
            torch.save(objective.state_dict(), tmp / "objective.pt")
        fail("rng")
    _barrier(accelerator)
    if main:
        state = {
            "step": int(step),
            "format": "sharded" if sharded else "full",
            "num_processes": 1 if accelerator is None else accelerator.num_processes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(counters or {}),
        }
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fail("state")
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        older = [p for s, p in list_checkpoints(run_dir) if s < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def _read(loader, path: Path) -> Any:
    """Load one checkpoint file; a missing or damaged file is a CheckpointError naming it."""
    if not Path(path).is_file():
        raise CheckpointError(f"resume: checkpoint file {path} is missing")
    try:
        return loader(str(path))
    except Exception as e:  # safetensors / pickle-free torch.load errors on damaged files
        raise CheckpointError(
            f"resume: cannot read checkpoint file {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _load_torch(path: Path) -> Any:
    return _read(lambda f: torch.load(f, map_location="cpu", weights_only=True), path)


def load_checkpoint(
    path: str | Path,
    *,
    accelerator,
    holder: nn.Module,
    keys: set[str],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    ema=None,
    objective: Any = None,
) -> dict[str, Any]:
    """Restore a checkpoint in place; returns its state.json (step and counters)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume: {path} is not a complete checkpoint (no state.json)")
    state = read_state(path)
    rank = 0 if accelerator is None else accelerator.process_index
    opt_list = list(optimizers.values())
    if state["format"] == "sharded":
        if not (path / "shards").is_dir():
            raise CheckpointError(f"resume: {path} says sharded but has no shards/ folder")
        import torch.distributed.checkpoint as dcp

        model_sd = {k: v for k, v in get_model_state_dict(holder, options=_options(False)).items() if k in keys}
        optim_sd = get_optimizer_state_dict(holder, opt_list, options=_options(False)) if opt_list else {}
        ema_sd = ema.state_dict() if ema is not None else {}
        blob = {"model": model_sd, "optim": optim_sd, "ema": ema_sd}
        dcp.load(blob, checkpoint_id=str(path / "shards"))
        res = set_model_state_dict(holder, blob["model"], options=_options(False, strict=False))
        if opt_list:
            set_optimizer_state_dict(holder, opt_list, blob["optim"], options=_options(False))
        if ema is not None:
            ema.load_state_dict(blob["ema"])
    else:
        model_sd = _read(load_file, path / "model.safetensors")
        missing = sorted(keys - set(model_sd))
        if missing:
            raise CheckpointError(
                f"resume: {path} lacks {len(missing)} tensors of this run's networks, "
                f"e.g. {missing[:3]} (different objective or LoRA settings?)"
            )
        extra = sorted(set(model_sd) - keys)
        if extra:
            raise CheckpointError(f"resume: {path} holds tensors this run does not have, e.g. {extra[:3]}")
        current = get_model_state_dict(holder, options=_options(False))
        for k in sorted(keys):
            if tuple(current[k].shape) != tuple(model_sd[k].shape):
                raise CheckpointError(
                    f"resume: tensor {k} of {path} has shape {tuple(model_sd[k].shape)}, this run's "
                    f"has {tuple(current[k].shape)} (different objective or network settings?)"
                )
        res = set_model_state_dict(holder, model_sd, options=_options(True, strict=False))
        if opt_list:
            optim_sd = _load_torch(path / "optim.pt")
            set_optimizer_state_dict(holder, opt_list, optim_sd, options=_options(True))
        if ema is not None:
            ema_file = path / "ema.safetensors"
            if not ema_file.is_file():
                raise CheckpointError(f"resume: {path} has no EMA weights but this run keeps an EMA (ema.rate > 0)")
            full_ema = _read(load_file, ema_file)
            ema.load_state_dict({k: _shard_like(v, ema.shadow.get(k)) for k, v in full_ema.items()})
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if k in keys]
    if unexpected:
        raise CheckpointError(f"resume: tensors {unexpected[:3]} of {path} do not fit this run's networks")
    sched = _load_torch(path / "schedulers.pt")
    old_names = {new: old for old, new in RENAMED_GROUPS.items()}
    for g, s in schedulers.items():
        saved = g if g in sched else old_names.get(g)  # else a checkpoint written under the group's old name
        if saved not in sched:
            raise CheckpointError(f"resume: {path} has no scheduler state for optimizer group {g!r}")
        s.load_state_dict(sched[saved])
    if objective is not None and hasattr(objective, "load_state_dict") and (path / "objective.pt").is_file():
        objective.load_state_dict(_load_torch(path / "objective.pt"))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load_torch(rng_file))
    return state


def _shard_like(full: Tensor, like: Tensor | None) -> Tensor:
    if like is not None and hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full
