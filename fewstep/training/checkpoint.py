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
from dataclasses import dataclass
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


@dataclass
class _Parts:
    """What a checkpoint holds of a run: the keyword arguments that `save_checkpoint` and
    `load_checkpoint` take besides their own."""

    accelerator: Any  # None: one process
    holder: nn.Module  # the networks other than the teacher, by role
    keys: set[str]  # the names in holder's state dict that are saved (`saved_keys`)
    optimizers: dict[str, torch.optim.Optimizer]  # by optimizer group
    schedulers: dict[str, Any]  # by optimizer group
    ema: Any = None  # the student's EMA (training/ema.py)
    objective: Any = None  # saved when it has state_dict / load_state_dict

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    def state_dicts(self, full: bool) -> dict[str, Any]:
        """The networks' (saved keys only), optimizers' and EMA's states. Collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = {k: v for k, v in get_model_state_dict(self.holder, options=_options(full)).items() if k in self.keys}
        opt_list = list(self.optimizers.values())
        optim = get_optimizer_state_dict(self.holder, opt_list, options=_options(full)) if opt_list else {}
        return {"model": model, "optim": optim, "ema": self.ema.state_dict() if self.ema is not None else {}}


def _fail(fail_after: str | None, part: str) -> None:
    """Tests: raise after the named part of a checkpoint is written."""
    if fail_after == part:
        raise CheckpointError(f"simulated failure after writing {part}")


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    counters: dict[str, Any] | None = None,
    sharded: bool = False,
    keep: int = 3,
    _fail_after: str | None = None,
    **parts: Any,
) -> Path:
    """Save everything a resume needs (`parts`: accelerator, holder, keys, optimizers, schedulers
    and optionally ema and objective, as `_Parts` describes them); returns the checkpoint folder.
    Collective under FSDP: every process must call it. `_fail_after` (tests) raises after the
    named part is written."""
    s = _Parts(**parts)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if s.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(s.accelerator)
    _write_states(tmp, s, sharded, _fail_after)
    torch.save(rng_state(), tmp / f"rng_{s.rank}.pt")
    if s.main:
        torch.save({g: sch.state_dict() for g, sch in s.schedulers.items()}, tmp / "schedulers.pt")
        if s.objective is not None and hasattr(s.objective, "state_dict"):
            torch.save(s.objective.state_dict(), tmp / "objective.pt")
        _fail(_fail_after, "rng")
    _barrier(s.accelerator)
    if s.main:
        state = {
            "step": int(step),
            "format": "sharded" if sharded else "full",
            "num_processes": 1 if s.accelerator is None else s.accelerator.num_processes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(counters or {}),
        }
        _publish(tmp, final, state, _fail_after)
        older = [p for st, p in list_checkpoints(run_dir) if st < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(s.accelerator)
    return final


def _write_states(tmp: Path, s: _Parts, sharded: bool, fail_after: str | None) -> None:
    """The networks, optimizers and EMA: one shard per process, or gathered files on the main one."""
    from safetensors.torch import save_file

    sd = s.state_dicts(full=not sharded)
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, checkpoint_id=str(tmp / "shards"))
        return
    ema_full = {k: _full(v) for k, v in sd["ema"].items()}  # collective for DTensors
    if s.main:
        save_file(_cpu_contig(sd["model"]), str(tmp / "model.safetensors"))
        _fail(fail_after, "model")
        torch.save(sd["optim"], tmp / "optim.pt")
        if ema_full:
            save_file(_cpu_contig(ema_full), str(tmp / "ema.safetensors"))


def _publish(tmp: Path, final: Path, state: dict[str, Any], fail_after: str | None) -> None:
    """state.json (synced), then the manifest, then the rename that makes the checkpoint exist."""
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fail(fail_after, "state")
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


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


def load_checkpoint(path: str | Path, **parts: Any) -> dict[str, Any]:
    """Restore a checkpoint in place (`parts` as for `save_checkpoint`); returns its state.json
    (step and counters)."""
    s = _Parts(**parts)
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume: {path} is not a complete checkpoint (no state.json)")
    state = read_state(path)
    res = _load_sharded(path, s) if state["format"] == "sharded" else _load_full(path, s)
    unexpected = [k for k in getattr(res, "unexpected_keys", []) if k in s.keys]
    if unexpected:
        raise CheckpointError(f"resume: tensors {unexpected[:3]} of {path} do not fit this run's networks")
    sched = _load_torch(path / "schedulers.pt")
    old_names = {new: old for old, new in RENAMED_GROUPS.items()}
    for g, sch in s.schedulers.items():
        saved = g if g in sched else old_names.get(g)  # else a checkpoint written under the group's old name
        if saved not in sched:
            raise CheckpointError(f"resume: {path} has no scheduler state for optimizer group {g!r}")
        sch.load_state_dict(sched[saved])
    if s.objective is not None and hasattr(s.objective, "load_state_dict") and (path / "objective.pt").is_file():
        s.objective.load_state_dict(_load_torch(path / "objective.pt"))
    rng_file = path / f"rng_{s.rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load_torch(rng_file))
    return state


def _load_sharded(path: Path, s: _Parts) -> Any:
    """Each process's shards of the networks, optimizers and EMA (torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (path / "shards").is_dir():
        raise CheckpointError(f"resume: {path} says sharded but has no shards/ folder")
    import torch.distributed.checkpoint as dcp

    blob = s.state_dicts(full=False)
    dcp.load(blob, checkpoint_id=str(path / "shards"))
    res = set_model_state_dict(s.holder, blob["model"], options=_options(False, strict=False))
    opt_list = list(s.optimizers.values())
    if opt_list:
        set_optimizer_state_dict(s.holder, opt_list, blob["optim"], options=_options(False))
    if s.ema is not None:
        s.ema.load_state_dict(blob["ema"])
    return res


def _load_full(path: Path, s: _Parts) -> Any:
    """The gathered files: every saved tensor checked against this run's networks (names and
    shapes) before anything is loaded."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_sd = _read(load_file, path / "model.safetensors")
    missing = sorted(s.keys - set(model_sd))
    if missing:
        raise CheckpointError(
            f"resume: {path} lacks {len(missing)} tensors of this run's networks, "
            f"e.g. {missing[:3]} (different objective or LoRA settings?)"
        )
    extra = sorted(set(model_sd) - s.keys)
    if extra:
        raise CheckpointError(f"resume: {path} holds tensors this run does not have, e.g. {extra[:3]}")
    current = get_model_state_dict(s.holder, options=_options(False))
    for k in sorted(s.keys):
        if tuple(current[k].shape) != tuple(model_sd[k].shape):
            raise CheckpointError(
                f"resume: tensor {k} of {path} has shape {tuple(model_sd[k].shape)}, this run's "
                f"has {tuple(current[k].shape)} (different objective or network settings?)"
            )
    res = set_model_state_dict(s.holder, model_sd, options=_options(True, strict=False))
    opt_list = list(s.optimizers.values())
    if opt_list:
        set_optimizer_state_dict(s.holder, opt_list, _load_torch(path / "optim.pt"), options=_options(True))
    if s.ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise CheckpointError(f"resume: {path} has no EMA weights but this run keeps an EMA (ema.rate > 0)")
        full_ema = _read(load_file, ema_file)
        s.ema.load_state_dict({k: _shard_like(v, s.ema.shadow.get(k)) for k, v in full_ema.items()})
    return res


def _shard_like(full: Tensor, like: Tensor | None) -> Tensor:
    if like is not None and hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full
