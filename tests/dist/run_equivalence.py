"""Launched by tests/test_distributed.py (and usable by hand):

    ACCELERATE_USE_CPU=1 PYTHONPATH=. torchrun --nproc_per_node 2 tests/dist/run_equivalence.py OUT_DIR [NAME ...]

Trains every registered objective (or the NAMEs) for a few steps on the tiny DiT with two gloo
processes, each process's share of the global batch in two micro-batches, and writes rank 0's
trained tensors of all networks to OUT_DIR/<name>.safetensors (a failure to OUT_DIR/<name>.error).
OUT_DIR/latents.safetensors (`equivalence.real_latents`) must exist.
The test trains the same configs in one process with the whole batch at once and compares.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from fewstep.training import run
from tests.dist import equivalence as eq


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    latents = out / "latents.safetensors"  # written by the launching test (eq.real_latents)
    for name in names:
        try:
            cfg = eq.case_config(name, out / name, latents, f"data.micro_batch_size={eq.BATCH // 4}")
            res = run(cfg, teacher=eq.teacher(name))
            if rank == 0:
                save_file(eq.trained_state(res.objective), str(out / f"{name}.safetensors"))
        except Exception:
            if rank == 0:
                (out / f"{name}.error").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or eq.NAMES)
