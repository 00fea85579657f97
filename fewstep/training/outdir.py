"""The run's output folder: nothing is deleted before the new run has something to show.

    out = OutputFolder.prepare(cfg, run_dir, accelerator, say)   # after `preflight(cfg)`
    ...  out.resume_from                                            # the checkpoint to continue, or None
    out.commit()      # the new run wrote its first checkpoint (or finished): the old run goes
    out.restore()     # the new run failed before that: the old run comes back as it was

With `overwrite=true` and a non-empty output_dir the old run is renamed to a hidden sibling
(`.<name>.replaced`), not deleted; `restore()` renames it back (the failed new run's files are
removed), `commit()` deletes it. A sibling left by a killed process is never overwritten: the
next overwrite names it and stops.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..config import Config, ConfigError
from .checkpoint import clean_stale
from .resume import choose_checkpoint

__all__ = ["OutputFolder", "aside_path", "set_aside"]


def aside_path(run_dir: Path) -> Path:
    """Where `overwrite=true` keeps the old run until the new one has a checkpoint."""
    return run_dir.parent / f".{run_dir.name}.replaced"


def set_aside(cfg: Config, run_dir: Path, accelerator) -> Path:
    """A non-empty output folder without resume: refuse it unless overwrite=true, then move the old
    run aside (collective); returns where it is kept until the new run has a checkpoint."""
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir {str(run_dir)!r} exists and is not empty: pass resume=latest to "
            "continue it, overwrite=true to replace it, or another output_dir"
        )
    aside = aside_path(run_dir)
    if aside.exists():
        raise ConfigError(
            f"overwrite=true: {aside} holds the run an interrupted overwrite of "
            f"{str(run_dir)!r} set aside; move it back or delete it first"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(run_dir, aside)
    return aside


class OutputFolder:
    def __init__(self, run_dir: Path, main: bool, resume_from: Path | None, aside: Path | None, created: bool):
        self.run_dir = run_dir
        self.main = main
        self.resume_from = resume_from
        self.aside = aside  # the old run while the new one has no checkpoint yet
        self.created = created  # the folder did not exist before this run

    @classmethod
    def prepare(cls, cfg: Config, run_dir: Path, accelerator, say: Callable[[str], None]) -> OutputFolder:
        """Apply the output-folder rules (resume, overwrite, refuse a non-empty folder); collective."""
        main = accelerator.is_main_process
        created = not run_dir.exists()
        nonempty = run_dir.is_dir() and any(run_dir.iterdir())
        aside = None
        ckpt = None
        if cfg.resume is not None:
            ckpt = choose_checkpoint(cfg, run_dir, say, main=main, barrier=accelerator.wait_for_everyone)
            if cfg.resume == "latest" and ckpt is None:
                if (run_dir / "run_card.json").is_file():
                    raise ConfigError(f"resume=latest: {run_dir} holds a finished run and no checkpoint to continue")
                if main and (run_dir / "metrics.jsonl").is_file():
                    (run_dir / "metrics.jsonl").unlink()  # nothing to continue: start afresh
        elif nonempty:
            aside = set_aside(cfg, run_dir, accelerator)
            if main:
                say(f"overwrite=true: the previous run is kept in {aside} until this run writes its first checkpoint")
        accelerator.wait_for_everyone()
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            clean_stale(run_dir)
        accelerator.wait_for_everyone()
        return cls(run_dir, main, ckpt, aside, created)

    def commit(self) -> None:
        """The new run has a checkpoint (or its final outputs): delete the run it replaces."""
        if self.aside is not None and self.main:
            shutil.rmtree(self.aside, ignore_errors=True)
        self.aside = None

    def restore(self) -> None:
        """The new run failed before its first checkpoint: put the replaced run back (a folder this
        run created and left empty goes too)."""
        if self.main and self.created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
        if self.aside is None or not self.main:
            self.aside = None
            return
        if self.aside.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            os.replace(self.aside, self.run_dir)
        self.aside = None
