"""Seconds per training step with and without `precision.compile` (torch.compile of the student,
fake score and teacher backbones), on CPU, through the training entry point.

    python eval/bench_compile.py [--config configs/digits/dmd2_1step_vp.yaml] [--steps 40] [--warmup 15]
        [--out runs/bench/compile] [key=value ...]

Each setting runs in its own fresh process (`fewstep train`, one thread) for --steps steps with a
metrics record every step; the first --warmup steps (start-up and compilation, including the
recompilations for the batch sizes the objective uses) are reported apart, and the steady state is
the median step time after them. Lines the run printed about backbones that did not compile are
repeated here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, compile_on: bool, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / ("compiled" if compile_on else "eager")
    cmd = [sys.executable, "-m", "fewstep.cli", "train", "--config", config, f"steps={steps}", "log.every=1"]
    cmd += ["checkpoint.every=0", "log.sample_every=0", "log.progress=false", f"output_dir={run_dir}", "overwrite=true"]
    cmd += [f"precision.compile={'true' if compile_on else 'false'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    if p.returncode != 0:
        raise SystemExit(f"{'compiled' if compile_on else 'eager'} run failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    times = [r["time_s"] for r in recs if "time_s" in r]
    return {
        "compile": compile_on,
        "times": times,
        "wall_s": round(time.time() - t0, 1),
        "messages": [ln for ln in (p.stdout + p.stderr).splitlines() if "precision.compile" in ln],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits/dmd2_1step_vp.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--out", default="runs/bench/compile")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.steps - 2:
        raise SystemExit("--warmup must be between 1 and --steps - 3")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for on in (False, True):
        r = _run(args.config, on, args.steps, out, args.overrides)
        t = r["times"]
        steady = [b - a for a, b in zip(t[args.warmup - 1 : -1], t[args.warmup :])]
        r["warmup_s"] = round(t[args.warmup - 1], 2)
        r["steady_s_per_step"] = round(statistics.median(steady), 4)
        rows.append(r)
        print(
            f"compile {'on ' if on else 'off'}: first {args.warmup} steps {r['warmup_s']:.1f}s, then "
            f"{r['steady_s_per_step']:.3f} s/step (median of {len(steady)}); process wall {r['wall_s']}s",
            flush=True,
        )
        for m in r["messages"]:
            print("  " + m)
    ratio = rows[0]["steady_s_per_step"] / rows[1]["steady_s_per_step"]
    print(f"speed-up after warm-up: {ratio:.2f}x")
    from fewstep.errors import script_command

    command = script_command("eval/bench_compile.py", argv)
    (out / "compile.json").write_text(json.dumps({"command": command, "rows": rows, "speedup": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
