"""What a run says at start-up about its processes, and the launch mistake it warns about.

`accelerate launch --num_processes 2 train.py` without `--multi_gpu` (or a multi-process
accelerate config) on a CPU machine runs ONE process and says nothing: the run trains, with the
whole global batch on one process. The run cannot see the launcher's arguments directly, so it
looks where they are: `fewstep launch` records the process count it asked for in
FEWSTEP_REQUESTED_PROCESSES; torchrun sets WORLD_SIZE; and a process started by `accelerate launch`
(Linux) can read its parent's command line. When the count asked for exceeds the processes
running, the run warns, naming both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["REQUESTED_ENV", "requested_processes", "startup_lines"]

REQUESTED_ENV = "FEWSTEP_REQUESTED_PROCESSES"


def _from_launcher_cmdline(cmdline: list[str]) -> int | None:
    """--num_processes N / --num-processes=N of an `accelerate launch` command line."""
    text = " ".join(cmdline)
    if "accelerate" not in text or "launch" not in cmdline:
        return None
    m = re.search(r"--num[_-]processes(?:=|\s+)(\d+)", text)
    return int(m.group(1)) if m else None


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or no access
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def requested_processes() -> tuple[int | None, str]:
    """(process count the launcher was asked for, where that was read), or (None, "")."""
    v = os.environ.get(REQUESTED_ENV)
    if v and v.isdigit():
        return int(v), f"{REQUESTED_ENV}={v}"
    v = os.environ.get("WORLD_SIZE")
    if v and v.isdigit():
        return int(v), f"WORLD_SIZE={v}"
    n = _from_launcher_cmdline(_parent_cmdline())
    if n is not None:
        return n, f"accelerate launch --num_processes {n}"
    return None, ""


def startup_lines(world: int, distributed_type: str, batch_size: int, micro: int) -> list[str]:
    """The start-up report: processes, distributed type, how the global batch is split; and a
    warning line when fewer processes run than the launcher was asked for."""
    share = batch_size // max(1, world)
    accum = -(-share // max(1, micro))
    lines = [
        f"processes: {world} ({distributed_type}); global batch {batch_size} = {world} process(es) x "
        f"{share} samples, in {accum} micro-batch(es) of at most {micro} (data.micro_batch_size)"
    ]
    asked, where = requested_processes()
    if asked is not None and asked > world:
        lines.append(
            f"WARNING: the launcher was asked for {asked} processes ({where}) but {world} running: "
            "on CPU `accelerate launch --num_processes N` needs --multi_gpu (or an accelerate config "
            "with distributed_type MULTI_CPU / MULTI_GPU) to start N processes; the run continues "
            f"with {world}"
        )
    return lines
