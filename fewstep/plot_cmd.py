"""`fewstep plot RUN`: the training curves of a run, drawn from its metrics.jsonl to a PNG.

    fewstep plot runs/digits/dmd2_1step_vp                  # -> runs/digits/dmd2_1step_vp/curves.png
    fewstep plot runs/digits/dmd2_1step_vp --out curves.png
    fewstep plot "DMD2=runs/a" "Flash-DMD=runs/b" --compare eval/fid --x updates/generator --out fid.png


One panel each for the losses (`loss/<group>`), the gradient norms (`grad_norm/<group>`, log
scale), the learning rates (`lr/<group>`) and, when the run evaluated itself during training
(`eval.every`), the FID and class accuracy (`eval/fid`, `eval/class_acc`); one line per optimizer
group. Non-finite values (skipped updates) are left out of the lines. matplotlib is an optional
extra (`pip install fewstep[plot]`): only this command needs it.

With `--compare KEY`, one panel holds KEY from every run given (`LABEL=RUN` names a line; a bare RUN
is labelled by its folder name), against `--x` (the step, or a recorded count such as
`updates/generator`, so that runs with different update rules compare at equal updates); the
points are also printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError, check_output_file

__all__ = ["add_arguments", "run", "read_metrics", "series", "curves_figure", "compare_figure", "PANELS"]

# (title, key prefix or exact key, y scale)
PANELS = (
    ("loss", "loss/", "linear"),
    ("gradient norm", "grad_norm/", "log"),
    ("learning rate", "lr/", "linear"),
    ("FID (periodic evaluation)", "eval/fid", "linear"),
    ("class accuracy (periodic evaluation)", "eval/class_acc", "linear"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", metavar="RUN", nargs="+", help="a run folder (with metrics.jsonl) or a metrics.jsonl file; LABEL=RUN"
    )
    p.add_argument("--out", help="the PNG to write (default: RUN/curves.png; required with --compare)")
    p.add_argument("--compare", metavar="KEY", help="one panel: KEY (e.g. eval/fid) of every RUN")
    p.add_argument("--x", default="step", help="with --compare: the x axis, step or a recorded key (updates/generator)")


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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """{name: (xs, values)} of the finite values of `key` (a prefix ending in "/" gathers one
    series per key under it, named by the rest of the key); xs are the steps, or the record's
    value of `x` (records without a finite `x` are left out)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        if not _finite(r.get(x)):
            continue
        for k, v in r.items():
            if not _finite(v):
                continue
            if key.endswith("/") and k.startswith(key):
                name = k[len(key) :]
            elif k == key:
                name = key
            else:
                continue
            s = out.setdefault(name, ([], []))
            s[0].append(int(r["step"]) if x == "step" else float(r[x]))
            s[1].append(float(v))
    return out


def _figure_class():
    """matplotlib's Figure (no pyplot state), or a one-line error naming the optional extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("fewstep plot needs matplotlib: pip install fewstep[plot]") from None
    return Figure


def _save_png(fig, out: Path) -> None:
    """Write the figure to `out` whole or not at all (a temporary file, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(out)


def curves_figure(records: list[dict[str, Any]], title: str = ""):
    """A matplotlib Figure with one panel per PANELS entry that has data (no pyplot state)."""
    Figure = _figure_class()
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


def compare_figure(runs: dict[str, list[dict[str, Any]]], key: str, x: str = "step"):
    """A matplotlib Figure with one panel: `key` of each run (one line per run, labelled) against `x`."""
    Figure = _figure_class()
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, records in runs.items():
        pts = series(records, key, x).get(key)
        if not pts:
            raise UserError(f"RUN {label!r}: no finite {key!r} with a finite {x!r} in its records")
        ax.plot(*pts, label=label, marker="o" if len(pts[0]) < 40 else None, markersize=3)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return fig


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if sep and label and path:
        return label, _metrics_file(path)
    f = _metrics_file(spec)
    return f.parent.name, f


def _compare(args: argparse.Namespace) -> int:
    if not args.out:
        raise UserError("--compare needs --out (the PNG to write)")
    out = check_output_file(Path(args.out), "--out")
    runs: dict[str, list[dict[str, Any]]] = {}
    for spec in args.run_dir:
        label, f = _labelled(spec)
        if label in runs:
            raise UserError(f"RUN {spec!r}: the label {label!r} is used twice; name the runs LABEL=RUN")
        runs[label] = read_metrics(f)
    fig = compare_figure(runs, args.compare, args.x)
    _save_png(fig, out)
    print(f"| run | {args.x}: {args.compare} |\n|---|---|")
    for label, records in runs.items():
        xs, ys = series(records, args.compare, args.x)[args.compare]
        print(f"| {label} | " + ", ".join(f"{a:g}: {b:.4g}" for a, b in zip(xs, ys)) + " |")
    print(f"{out}: {args.compare} of {len(runs)} run(s) against {args.x}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    if len(args.run_dir) > 1:
        raise UserError(f"{len(args.run_dir)} runs given: several runs are drawn together with --compare KEY")
    f = _metrics_file(args.run_dir[0])
    out = Path(args.out) if args.out else f.parent / "curves.png"
    check_output_file(out, "--out")
    records = read_metrics(f)
    if not records:
        raise UserError(f"{f}: no records yet (a run writes one every log.every steps)")
    fig = curves_figure(records, title=f.parent.name)
    _save_png(fig, out)
    n = len(fig.axes)
    print(f"{out}: {n} panel(s) from {len(records)} records of {f} (steps {records[0]['step']}-{records[-1]['step']})")
    return 0
