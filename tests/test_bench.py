"""eval/bench.py, the one benchmark command: its argument handling (overrides anywhere, clear refusals
of contradictory options), the step counts it scores, and one short run through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import bench as bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return bench_script


def test_overrides_before_and_after_the_options(bench):
    args = bench.parse_args(
        [
            "--config",
            "configs/digits/tdm_4step_vp.yaml",
            "steps=10",
            "--no-teacher",
            "--threads",
            "1",
            "objective.guidance=1.5",
            "--out",
            "x",
        ]
    )
    assert args.overrides == ["steps=10", "objective.guidance=1.5"]
    assert args.no_teacher and args.threads == 1 and args.out == "x" and args.weights is None
    assert args.metrics == ["fid", "kid", "class_acc"] and args.steps_eval is None
    args = bench.parse_args(["--config", "c.yaml", "--steps-eval", "1,4"])
    assert args.steps_eval == [1, 4]
    args = bench.parse_args(["--config", "c.yaml", "--intermediate-angles", "1.1, 1.3", "--weights", "student"])
    assert args.intermediate_angles == [1.1, 1.3] and args.weights == "student"
    args = bench.parse_args(["--teacher", "digits-flow", "--teacher-guidance", "1.25"])
    assert args.teacher == "digits-flow" and args.teacher_guidance == 1.25 and args.config is None


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--config is required"),
        (["--config", "c.yaml", "--bogus"], "unrecognized arguments: --bogus"),
        (["--config", "c.yaml", "stray"], "not a key=value override of the preset: stray"),
        (["--config", "c.yaml", "--steps-eval", "1,two"], "--steps-eval: expected comma-separated numbers"),
        (["--config", "c.yaml", "--steps-eval", "0,2"], "--steps-eval: step counts must be >= 1"),
        (["--config", "c.yaml", "--intermediate-angles", ""], "--intermediate-angles: empty list"),
        (["--config", "c.yaml", "--intermediate-angles", "1.3", "--eval-only"], "drop --eval-only"),
        (["--teacher", "digits-vp", "--config", "c.yaml"], "--teacher scores a teacher alone"),
        (["--teacher", "digits-vp", "--no-teacher"], "--teacher cannot be combined"),
        (["--config", "c.yaml", "--weights", "ema"], "invalid choice: 'ema'"),
        (["--config", "c.yaml", "--threads", "0"], "--threads must be >= 1"),
        (["--config", "c.yaml", "--num-samples", "0"], "--num-samples must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_scored_step_counts_come_from_the_run_card(bench):
    assert bench.card_steps({"sampling": {"times": [1.0, 0.5, 0.0]}}) == [2]
    card = {"sampling": {"times": [1.0, 0.75, 0.5, 0.25, 0.0], "times_by_steps": {"1": [1.0, 0.0], "2": [1, 0.5, 0]}}}
    assert bench.card_steps(card) == [1, 2, 4]


@pytest.mark.slow
def test_a_short_run_through_the_entry_point(bench, tmp_path, capsys):
    """LCM for two steps: trained by fewstep.training.run, the objective's times for 1, 2 and 4 steps
    recorded in the run card, all three scored, bench.json written; --eval-only scores it again."""
    out = tmp_path / "lcm"
    argv = [
        "--config",
        str(ROOT / "configs" / "digits" / "lcm_4step_vp.yaml"),
        "steps=2",
        "data.batch_size=4",
        "log.progress=false",
        "log.trackers=[]",
        "--no-teacher",
        "--num-samples",
        "10",
        "--metrics",
        "fid,class_acc",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    card = json.loads((out / "run_card.json").read_text())
    assert sorted(card["sampling"]["times_by_steps"]) == ["1", "2", "4"] and card["steps"] == 2
    res = json.loads((out / "bench.json").read_text())
    assert [r["steps"] for r in res["rows"]] == [1, 2, 4]
    assert all(r["num_samples"] == 10 and r["fid"] > 0 and r["kid"] is None for r in res["rows"])
    assert res["command"].startswith("python eval/bench.py --config") and res["overrides"][0] == "steps=2"
    assert "| lcm (digits-vp, student) | 4 |" in capsys.readouterr().out
    assert bench.main([*argv, "--eval-only", "--steps-eval", "4"]) == 0
    again = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["steps"] for r in again] == [4] and again[0]["fid"] == res["rows"][2]["fid"]
