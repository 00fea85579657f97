"""Measure export on the tiny-teacher matrix of tests/test_export.py: for each case, the export
time, the scheduler chosen, and the largest difference between the exported pipeline (run in a
fresh process without fewstep) and fewstep's own sampler, per supported step count.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.export_check.measure [--out table.md]

Prints a markdown table (absolute max difference, and relative to the sample's max |x|).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests import test_export as T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="fewstep-export-measure-"))
    teachers = {k: T._teacher_folder(root / "teachers", k) for k in {c[1] for c in T.CASES}}
    rows, jobs, made = [], [], []
    for i, (case, kind, objective, params, lora, _) in enumerate(T.CASES):
        run_dir = T.make_run(root / "runs", case, teachers[kind], objective, params, lora=lora, seed=i)
        t0 = time.perf_counter()
        res = T.export_student(run_dir, root / "exports" / case)
        secs = time.perf_counter() - t0
        made.append((case, run_dir, res, secs))
        jobs += T.pipeline_jobs(case, res.out, res.card, root)
    t0 = time.perf_counter()
    status = T.run_in_fresh_process(jobs, root)
    pipe_secs = time.perf_counter() - t0
    for case, run_dir, res, secs in made:
        for n in res.card["supported_steps"]:
            with _flux_noise(res.card) as mp:
                ref = T.fewstep_sample(run_dir, res.card, int(n), mp)
            got = T.pipeline_latents(str(root / f"{case}-{n}.safetensors"), res.card)
            err = (got - ref).abs().max().item()
            rows.append(
                (case, res.pipeline_class, res.plan.scheduler_class, n, err, err / ref.abs().max().item(), secs)
            )
    lines = [
        "| case | pipeline | scheduler | steps | max abs diff | relative | export s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {c} | {p} | {s} | {n} | {e:.2e} | {r:.2e} | {t:.2f} |" for c, p, s, n, e, r, t in rows]
    lines.append("")
    lines.append(
        f"{len(jobs)} pipeline runs in one fresh process ({pipe_secs:.1f} s, fewstep imported there: "
        f"{status['fewstep_imported']}); torch {torch.__version__}, 1 thread."
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


class _flux_noise:
    """fewstep's side draws Flux's fresh noise in the packed layout (see fewstep_sample)."""

    def __init__(self, card):
        import pytest

        self.mp = pytest.MonkeyPatch() if card["pipeline_class"] == "FluxPipeline" else None

    def __enter__(self):
        return self.mp

    def __exit__(self, *a):
        if self.mp is not None:
            self.mp.undo()
        return False


if __name__ == "__main__":
    sys.exit(main())
