"""`fewstep plot RUN`: the curves drawn are the run's metrics (one line per optimizer group and
key, non-finite values left out), the PNG is written, and bad input is a one-line error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from fewstep.cli import main

pytest.importorskip("matplotlib")

RECORDS = [
    {
        "step": s,
        "loss/generator": 1.0 / s,
        "loss/fake_score": 2.0 - 0.1 * s,
        "grad_norm/generator": 10.0 * s,
        "grad_norm/fake_score": 0.5,
        "lr/generator": 1e-4 * min(1.0, s / 4),
        "lr/fake_score": 2e-4,
        "perf/step_time_s": 0.1,
        **({"eval/fid": 50.0 - s, "eval/class_acc": 0.1 * s} if s % 4 == 0 else {}),
    }
    for s in range(2, 13, 2)
]


def _write(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_curves_are_the_metrics(tmp_path):
    from fewstep.plot_cmd import curves_figure, read_metrics

    recs = [dict(r) for r in RECORDS]
    recs[2]["loss/generator"] = "nan"  # a skipped update, as metrics.jsonl writes it
    run = _write(tmp_path / "run", recs)
    fig = curves_figure(read_metrics(run / "metrics.jsonl"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "loss",
        "gradient norm",
        "learning rate",
        "FID (periodic evaluation)",
        "class accuracy (periodic evaluation)",
    ]
    lines = {(ax.get_title(), ln.get_label()): ln for ax in fig.axes for ln in ax.get_lines()}
    steps = [r["step"] for r in RECORDS]
    gen = lines[("loss", "generator")]
    assert list(gen.get_xdata()) == [s for s in steps if s != 6]  # the nan is left out
    assert list(gen.get_ydata()) == pytest.approx([1.0 / s for s in steps if s != 6])
    assert list(lines[("loss", "fake_score")].get_ydata()) == pytest.approx([2.0 - 0.1 * s for s in steps])
    assert list(lines[("gradient norm", "generator")].get_ydata()) == pytest.approx([10.0 * s for s in steps])
    assert fig.axes[1].get_yscale() == "log" and fig.axes[0].get_yscale() == "linear"
    assert list(lines[("learning rate", "generator")].get_ydata()) == pytest.approx(
        [1e-4 * min(1.0, s / 4) for s in steps]
    )
    fid = lines[("FID (periodic evaluation)", "eval/fid")]
    assert list(fid.get_xdata()) == [4, 8, 12] and list(fid.get_ydata()) == [46.0, 42.0, 38.0]
    acc = lines[("class accuracy (periodic evaluation)", "eval/class_acc")]
    assert list(acc.get_ydata()) == pytest.approx([0.4, 0.8, 1.2])


def test_without_periodic_eval_there_is_no_fid_panel(tmp_path):
    from fewstep.plot_cmd import curves_figure

    fig = curves_figure([{k: v for k, v in r.items() if not k.startswith("eval/")} for r in RECORDS])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "gradient norm", "learning rate"]


def test_plot_command_writes_a_png(tmp_path, capsys):
    run = _write(tmp_path / "run", RECORDS)
    assert main(["plot", str(run)]) == 0
    out = run / "curves.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 5 * 200
        a = np.asarray(im.convert("L"))
    assert (a < 128).mean() > 0.005  # ink: axes, text and curves, not a blank page
    assert "5 panel(s) from 6 records" in capsys.readouterr().out
    assert main(["plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "x" / "c.png")]) == 0
    assert (tmp_path / "x" / "c.png").is_file()


def test_plot_of_a_real_run(tmp_path):
    """The curves of a short training run (its own metrics.jsonl)."""
    from pathlib import Path

    from fewstep.config import load_config
    from fewstep.plot_cmd import curves_figure, read_metrics
    from fewstep.training import run
    from tests.dist.bundles import gmm_bundle

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "configs" / "digits" / "dsm.yaml",
        [f"output_dir={tmp_path / 'run'}", "log.trackers=[]", "log.progress=false", "steps=4", "log.every=1"]
        + ["data.batch_size=4", "log.sample_every=0", "log.sample_count=2", "checkpoint.every=0"],
    )
    res = run(cfg, teacher=gmm_bundle())
    recs = read_metrics(res.run_dir / "metrics.jsonl")
    fig = curves_figure(recs)
    (loss,) = fig.axes[0].get_lines()
    assert list(loss.get_xdata()) == [1, 2, 3, 4]
    assert list(loss.get_ydata()) == [r["loss/generator"] for r in recs] and all(map(math.isfinite, loss.get_ydata()))
    assert main(["plot", str(res.run_dir)]) == 0 and (res.run_dir / "curves.png").is_file()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    run = _write(tmp_path / "run", [])
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/g": 1.0}\nnot json\n')
    assert main(["plot", str(run)]) == 2
    assert "line 2 is not a metrics record" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "skipped": 0.0}\n')
    assert main(["plot", str(run)]) == 2
    assert "no curves to draw" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/g": 1.0}\n')
    (tmp_path / "dir.png").mkdir()
    assert main(["plot", str(run), "--out", str(tmp_path / "dir.png")]) == 2
    assert "--out" in capsys.readouterr().err and not (run / "curves.png").exists()


def test_compare_draws_one_line_per_run_against_updates(tmp_path, capsys):
    """--compare: each run's eval/fid against its generator updates (not its steps), one labelled
    line per run, and the table of the same points."""
    from fewstep.plot_cmd import compare_figure, read_metrics

    a = [{"step": s, "updates/generator": s / 5, "eval/fid": 60.0 - s} for s in (10, 20, 30)]
    b = [{"step": s, "updates/generator": s, "eval/fid": 40.0 + s} for s in (5, 10)]
    b.append({"step": 15, "updates/generator": 15, "loss/generator": 1.0})  # no FID: not a point
    ra, rb = _write(tmp_path / "a", a), _write(tmp_path / "b", b)
    fig = compare_figure(
        {"A": read_metrics(ra / "metrics.jsonl"), "B": read_metrics(rb / "metrics.jsonl")},
        "eval/fid",
        "updates/generator",
    )
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert list(lines["A"].get_xdata()) == [2.0, 4.0, 6.0] and list(lines["A"].get_ydata()) == [50.0, 40.0, 30.0]
    assert list(lines["B"].get_xdata()) == [5.0, 10.0] and list(lines["B"].get_ydata()) == [45.0, 50.0]
    assert ax.get_xlabel() == "updates/generator"
    out = tmp_path / "cmp.png"
    assert (
        main(["plot", f"A={ra}", str(rb), "--compare", "eval/fid", "--x", "updates/generator", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "| A | 2: 50, 4: 40, 6: 30 |" in text and "| b | 5: 45, 10: 50 |" in text
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_compare_bad_input_is_one_line(tmp_path, capsys):
    run = _write(tmp_path / "run", [{"step": 1, "loss/generator": 1.0}])
    out = tmp_path / "c.png"
    assert main(["plot", str(run), str(run)]) == 2
    assert "--compare" in capsys.readouterr().err
    assert main(["plot", str(run), "--compare", "eval/fid"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["plot", str(run), "--compare", "eval/fid", "--out", str(out)]) == 2
    assert "no finite 'eval/fid'" in capsys.readouterr().err and not out.exists()
    assert main(["plot", str(run), str(run), "--compare", "loss/generator", "--out", str(out)]) == 2
    assert "used twice" in capsys.readouterr().err
