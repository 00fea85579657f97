"""Which checkpoint a resume continues from, and what a resume may not change.

    ckpt = choose_checkpoint(cfg, run_dir, say)        # resume=latest or resume=<folder>
    check_resumed(state, settings(cfg, gcfg, name, params), cfg, say)   # after the optimizers exist

- `resume=latest` takes the newest checkpoint that is verified (its manifest matches every file)
  and was not written during a streak of non-finite updates; the checkpoints it passes over are
  named with the reason and moved aside to checkpoints/set_aside/<time>/ (never deleted), so they
  cannot shadow the new checkpoints of the resumed run.
- `resume=<folder>` inside the same run, older than the run's latest checkpoint, is refused unless
  `resume.branch=true`, which moves the later checkpoints aside the same way: pruning then only
  ever sees this run's own history.
- `steps` below the checkpoint's step is an error (there is nothing to train); a changed optimizer
  setting (lr, betas, weight decay, eps, scheduler, warm-up, cycles) is an error, because the
  optimizer and scheduler state restored from the checkpoint would silently keep the old values;
  a changed `steps` with a decaying schedule is allowed and said (the schedule is laid out
  over the new total); a different objective is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .checkpoint import (
    CheckpointError,
    checkpoint_problem,
    is_marked,
    list_checkpoints,
    read_state,
)

__all__ = ["OPTIM_KEYS", "check_resumed", "choose_checkpoint", "settings"]

# the optimizer-group settings whose values live in the restored optimizer / scheduler state
OPTIM_KEYS = ("lr", "betas", "weight_decay", "eps", "scheduler", "warmup_steps", "num_cycles")


def _move_aside(run_dir: Path, folders: list[Path]) -> Path | None:
    if not folders:
        return None
    dest = run_dir / "checkpoints" / "set_aside" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for f in folders:
        os.replace(f, dest / f.name)
    return dest


def _step_of(ckpt: Path) -> int:
    return int(read_state(ckpt)["step"])


def choose_checkpoint(
    cfg: Config,
    run_dir: Path,
    say: Callable[[str], None],
    main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path | None:
    """The checkpoint to resume from (None: start afresh), after moving aside what must not stay.
    Every process calls it; only `main` moves folders."""
    if cfg.resume is None:
        return None
    aside: list[Path] = []
    if cfg.resume == "latest":
        cks = list_checkpoints(run_dir)
        chosen, marked, notes = None, None, []
        for _, p in reversed(cks):
            problem = checkpoint_problem(p)
            if problem is None and is_marked(read_state(p)):
                problem = "written during a streak of non-finite updates"
                marked = marked or p
            if problem is None:
                chosen = p
                break
            notes.append(f"{p.name} ({problem})")
        if chosen is None and marked is not None:
            chosen = marked
            notes = [n for n in notes if not n.startswith(marked.name + " ")]
        if chosen is None and cks:
            raise CheckpointError(
                f"resume=latest: no usable checkpoint in {run_dir / 'checkpoints'}: " + "; ".join(notes)
            )
        if chosen is None:
            return None
        aside = [p for s, p in cks if s > _step_of(chosen)]
        if notes:
            say(f"resume=latest: skipped {', '.join(notes)}; resuming from {chosen}")
        if is_marked(read_state(chosen)):
            say(
                f"resume=latest: {chosen} is the only usable checkpoint; it was written during a streak of "
                "non-finite updates"
            )
    else:
        chosen = Path(cfg.resume)
        if not (chosen / "state.json").is_file():
            raise ConfigError(f"resume={cfg.resume!r}: not a complete checkpoint folder (no state.json)")
        problem = checkpoint_problem(chosen)
        if problem is not None and "no manifest.json" not in problem:
            raise CheckpointError(f"resume={cfg.resume!r}: damaged checkpoint: {problem}")
        if problem is not None:
            say(f"resume={cfg.resume!r}: not verified ({problem})")
        step = _step_of(chosen)
        same_run = chosen.resolve().parent == (run_dir / "checkpoints").resolve()
        later = [p for s, p in list_checkpoints(run_dir) if s > step] if same_run else []
        if later and not cfg.resume_branch:
            raise ConfigError(
                f"resume={cfg.resume!r}: step {step} is older than this run's latest checkpoint "
                f"({later[-1].name}); continuing from it would write a second history into the same run. "
                "Pass resume.branch=true to move the later checkpoints aside (they are kept under "
                "checkpoints/set_aside/), or resume=latest"
            )
        aside = later
    state = read_state(chosen)
    step = int(state["step"])
    was = (state.get("settings") or {}).get("objective")
    if was is not None and was != cfg.objective.name:
        raise CheckpointError(
            f"resume: {chosen} was trained with objective {was!r}, this run asks for "
            f"objective.name={cfg.objective.name!r}"
        )
    if getattr(cfg, "generator_steps", None) is None and cfg.steps < step:  # else checked once steps is resolved
        raise ConfigError(
            f"steps={cfg.steps} is below the step of the checkpoint to resume ({step}, {chosen}): "
            f"nothing would be trained; set steps >= {step}"
        )
    barrier()
    if main and aside:
        dest = _move_aside(run_dir, aside)
        say(f"resume: moved {', '.join(p.name for p in aside)} aside to {dest}")
    barrier()
    return chosen


def settings(cfg: Config, gcfg: dict[str, Any], objective: str, params: Any) -> dict[str, Any]:
    """What a checkpoint records of the run, to check a resume against (plain JSON data)."""
    p = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})
    return {
        "objective": objective,
        "objective_params": json.loads(json.dumps(p, default=str)),
        "steps": cfg.steps,
        "optim": {
            g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(c, k)) for k in OPTIM_KEYS)}
            for g, c in gcfg.items()
        },
    }


def check_resumed(state: dict[str, Any], now: dict[str, Any], say: Callable[[str], None]) -> None:
    """Refuse a resume that changes what the checkpoint's state fixes; say what changes legitimately."""
    if int(state["step"]) > now["steps"]:
        raise ConfigError(
            f"steps={now['steps']} is below the step of the checkpoint to resume ({state['step']}): "
            f"nothing would be trained; set steps >= {state['step']}"
        )
    old = state.get("settings")
    if not old:  # a checkpoint of an older fewstep: nothing to compare
        return
    if old["objective"] != now["objective"]:
        raise CheckpointError(
            f"resume: the checkpoint was trained with objective {old['objective']!r}, this run "
            f"asks for {now['objective']!r}"
        )
    for g, new in now["optim"].items():
        was = old["optim"].get(g)
        if was is None:
            raise CheckpointError(f"resume: the checkpoint has no optimizer group {g!r}")
        for k in OPTIM_KEYS:
            if was.get(k) != new.get(k):
                raise ConfigError(
                    f"optim.{g}.{k}: the checkpoint was trained with {was.get(k)!r}, this run asks for "
                    f"{new.get(k)!r}; the restored optimizer and scheduler state would keep {was.get(k)!r}. "
                    f"Resume with optim.{g}.{k}={was.get(k)!r}, or start a new run"
                )
    if old.get("steps") != now["steps"]:
        moving = [g for g, c in now["optim"].items() if c["scheduler"] != "constant"]
        if moving:
            say(
                f"resume: steps {old.get('steps')} -> {now['steps']}: the learning-rate schedule of "
                f"{', '.join(moving)} is laid out over {now['steps']} steps from here on"
            )
