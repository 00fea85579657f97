"""What a user sees: a tqdm bar on the main process, accelerate trackers, a metrics.jsonl file in
the run folder (sample grids: `fewstep.images.save_grid`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "flat_config"]


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a/b": scalar} for trackers (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            out[key] = str(list(v))
        elif v is None:
            out[key] = "none"
        else:
            out[key] = v
    return out


class RunLog:
    """Progress, trackers and metrics.jsonl; only the main process writes."""

    def __init__(
        self,
        accelerator,
        run_dir: Path,
        name: str,
        start_step: int,
        total: int,
        progress: bool = True,
        trackers: bool = False,
    ):
        from tqdm.auto import tqdm

        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.trackers = trackers
        self.bar = tqdm(
            total=total,
            initial=start_step,
            disable=not (self.main and progress),
            desc=name,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if self.main else None

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def record(self, step: int, scalars: dict[str, float]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **{k: _num(v) for k, v in scalars.items()}}) + "\n")
        self.file.flush()
        shown = {
            k.split("/")[-1] if k.startswith("loss/") else k: v for k, v in scalars.items() if k.startswith("loss/")
        }
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if self.trackers:
            self.acc.log(scalars, step=step)

    def write(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
