"""What the training loop tells the experiment trackers (accelerate's: TensorBoard, wandb, ...)
beyond its losses: the sample grids as images, the time per step, samples per second and the
peak memory. The same scalars go to metrics.jsonl, so `fewstep plot` and a run without any
tracker installed see them too.

    timer = StepTimer()
    timer.start(); ...one training step...; timer.stop()
    perf = {**timer.stats(global_batch), **peak_memory(device)}
    log_grid(accelerator, "samples/student", grid_png, step)

Trackers are optional extras: `pip install fewstep[tensorboard]` or `fewstep[wandb]`.
TensorBoard writes its event file under <output_dir>/<run name>/; wandb writes under
<output_dir>/wandb/ (WANDB_MODE=offline keeps it on disk).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["StepTimer", "peak_memory", "log_grid", "init_kwargs", "EXTRAS", "PERF_KEYS"]

# tracker name -> the pip extra that installs it
EXTRAS = {"tensorboard": "fewstep[tensorboard]", "wandb": "fewstep[wandb]"}
PERF_KEYS = ("perf/step_time_s", "perf/samples_per_s", "memory/peak_rss_mb", "memory/peak_cuda_mb")


class StepTimer:
    """Wall time of the training steps themselves (batch, updates, EMA), without the sample grids,
    evaluations and checkpoints written between them; averaged over the steps since the last `stats`."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self._t0: float | None = None
        self._busy = 0.0
        self._steps = 0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # CUDA runs ahead of the host: time the work, not the launch

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() without start()")
        self._sync()
        self._busy += time.perf_counter() - self._t0
        self._steps += 1
        self._t0 = None

    def stats(self, global_batch: int) -> dict[str, float]:
        """{"perf/step_time_s", "perf/samples_per_s"} over the steps since the last call (then reset);
        {} when no step was timed. Samples per second count the global batch (all processes)."""
        if self._steps == 0:
            return {}
        per_step = self._busy / self._steps
        self._busy, self._steps = 0.0, 0
        return {
            "perf/step_time_s": per_step,
            "perf/samples_per_s": global_batch / per_step if per_step > 0 else float("inf"),
        }


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """Peak memory of this process so far, in MiB: resident set size (resource.getrusage) and, on
    CUDA, torch's peak allocated memory on `device`."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/peak_rss_mb": rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0}
    if device is not None and device.type == "cuda":
        out["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)
    return out


def init_kwargs(names: list[str], run_dir: Path, run_name: str) -> dict[str, dict[str, Any]]:
    """Per-tracker arguments of `accelerator.init_trackers`: wandb writes into the run folder."""
    kw: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kw["wandb"] = {"dir": str(run_dir), "name": run_name}
    return kw


def _read_png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()  # (H, W, 3) uint8


def log_grid(accelerator, tag: str, png: str | Path, step: int) -> list[str]:
    """Send the grid PNG at `png` (exactly what the run folder holds) to every tracker that takes
    images, under `tag`, at `step`. Main process only. Returns the trackers it went to."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return []
    hwc = _read_png(Path(png))
    sent = []
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue  # e.g. mlflow, comet_ml: their scalars still go through accelerator.log
        if tracker.name == "tensorboard":
            tracker.log_images({tag: hwc[None]}, step=step, dataformats="NHWC")
            tracker.writer.flush()  # accelerate flushes scalars, not images: make the grid readable now
        else:  # wandb, aim, clearml, swanlab take a list of (H, W, 3) arrays
            tracker.log_images({tag: [hwc]}, step=step)
        sent.append(tracker.name)
    return sent
