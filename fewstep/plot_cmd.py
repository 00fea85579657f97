"""`fewstep plot RUN`: the training curves of a run, drawn from its metrics.jsonl to a PNG.

    fewstep plot runs/digits/dmd2_1step_vp                  # -> runs/digits/dmd2_1step_vp/curves.png
    fewstep plot runs/digits/dmd2_1step_vp --out curves.png

One panel each for the losses (`loss/<group>`), the gradient norms (`grad_norm/<group>`, log
scale), the learning rates (`lr/<group>`) and, when the run evaluated itself during training
(`eval.every`), the FID and class accuracy (`eval/fid`, `eval/class_acc`); one line per optimizer
group. Non-finite values (skipped updates) are left out of the lines. matplotlib is an optional
extra (`pip install fewstep[plot]`): only this command needs it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError, check_output_file

__all__ = ["add_arguments", "run", "read_metrics", "series", "curves_figure", "PANELS"]

# (title, key prefix or exact key, y scale)
PANELS = (
    ("loss", "loss/", "linear"),
    ("gradient norm", "grad_norm/", "log"),
    ("learning rate", "lr/", "linear"),
    ("FID (periodic evaluation)", "eval/fid", "linear"),
    ("class accuracy (periodic evaluation)", "eval/class_acc", "linear"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a run folder (with metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="the PNG to write (default: RUN/curves.png)")


def _metrics_file(run: str | Path) -> Path:
    p = Path(run)
    f = p if p.suffix == ".jsonl" else p / "metrics.jsonl"
    if not f.is_file():
        what = "no such file" if p.suffix == ".jsonl" else f"no metrics.jsonl in {p} (not a training run folder?)"
        raise UserError(f"RUN={str(run)!r}: {what}")
    return f


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ({"step": N, key: value, ...} a line), non-finite values
    (written as strings) read back as floats; a bad line is an error naming the file and line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec = {k: (float(v) if isinstance(v, str) and k != "step" else v) for k, v in rec.items()}
            int(rec["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: line {i} is not a metrics record ({e})") from None
        out.append(rec)
    return out


def series(records: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of the finite values of `key` (a prefix ending in "/" gathers one
    series per key under it, named by the rest of the key)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for k, v in r.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if key.endswith("/") and k.startswith(key):
                name = k[len(key) :]
            elif k == key:
                name = key
            else:
                continue
            s = out.setdefault(name, ([], []))
            s[0].append(int(r["step"]))
            s[1].append(float(v))
    return out


def curves_figure(records: list[dict[str, Any]], title: str = ""):
    """A matplotlib Figure with one panel per PANELS entry that has data (no pyplot state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("fewstep plot needs matplotlib: pip install fewstep[plot]") from None
    panels = [(t, k, scale, s) for t, k, scale in PANELS if (s := series(records, k))]
    if not panels:
        keys = sorted({k for r in records for k in r if k != "step"})
        raise UserError(f"no curves to draw: the records hold none of loss/*, grad_norm/*, lr/*, eval/* (keys: {keys})")
    fig = Figure(figsize=(7.0, 2.4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, key, scale, lines) in zip(axes, panels):
        for label, (steps, values) in sorted(lines.items()):
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, markersize=3)
        if scale == "log" and all(v > 0 for _, vs in lines.values() for v in vs):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key.endswith("/"):
            ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def run(args: argparse.Namespace) -> int:
    f = _metrics_file(args.run_dir)
    out = Path(args.out) if args.out else f.parent / "curves.png"
    check_output_file(out, "--out")
    records = read_metrics(f)
    if not records:
        raise UserError(f"{f}: no records yet (a run writes one every log.every steps)")
    fig = curves_figure(records, title=f.parent.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(out)
    n = len(fig.axes)
    print(f"{out}: {n} panel(s) from {len(records)} records of {f} (steps {records[0]['step']}-{records[-1]['step']})")
    return 0
