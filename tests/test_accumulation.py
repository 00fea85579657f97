"""Gradient accumulation and the split-invariance of every objective's randomness.

`data.batch_size` is the global batch; `data.micro_batch_size` caps the samples one process puts
through the loss at once. Four micro-batches of 2 must train exactly as one batch of 8 (the same
per-step losses and gradient norms, the same weights to float tolerance) for every registered
objective: that holds only if each objective's draws are per sample (fewstep.randomness) and its
loss a mean over samples whose micro-batch losses the entry point weights by their share. A draw
from torch's global generator, a per-batch statistic, or a missing 1/4 weight fails here.
"""

from __future__ import annotations

import pytest
import torch

from fewstep.config import ConfigError, load_config
from fewstep.randomness import SampleDraws, shared_generator
from fewstep.training import run
from fewstep.training.accumulate import micro_batch_size, split_batch
from fewstep.training.processes import REQUESTED_ENV, startup_lines
from tests.dist import equivalence as eq


@pytest.mark.parametrize("name", eq.NAMES)
def test_four_micro_batches_train_as_one_batch_of_four_times_the_size(name, tmp_path, equivalence_runs):
    full, full_state = equivalence_runs(name)
    micro = run(
        eq.case_config(name, tmp_path / "micro", equivalence_runs.latents, f"data.micro_batch_size={eq.BATCH // 4}"),
        teacher=eq.teacher(name),
    )
    assert full.steps == micro.steps == eq.STEPS and full.skipped == micro.skipped == 0
    ra, rb = eq.records(full.run_dir), eq.records(micro.run_dir)
    assert len(ra) == eq.STEPS and [r.keys() for r in ra] == [r.keys() for r in rb]
    for a, b in zip(ra, rb):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7), (a, b)
    assert eq.rel_diff(eq.trained_state(micro.objective), full_state, name) < 1e-4


def test_draws_depend_on_the_sample_not_on_the_batch_it_is_in():
    whole = SampleDraws(range(8), 3, 7, "x")
    parts = [SampleDraws(range(lo, lo + 2), 3, 7, "x") for lo in range(0, 8, 2)]
    for draw in ("normal", "uniform"):
        a = getattr(whole, draw)(2, 3)
        b = torch.cat([getattr(p, draw)(2, 3) for p in parts])
        assert torch.equal(a, b)
    a, b = whole.integers(0, 5), torch.cat([p.integers(0, 5) for p in parts])
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.min()) >= 0 and int(a.max()) < 5
    # another step, seed or stream gives other numbers; rows differ from each other
    x = SampleDraws(range(8), 3, 7, "x").normal(4)
    for other in (SampleDraws(range(8), 3, 8, "x"), SampleDraws(range(8), 4, 7, "x"), SampleDraws(range(8), 3, 7, "y")):
        assert not torch.allclose(other.normal(4), x)
    assert not torch.allclose(x[0], x[1])
    assert torch.equal(
        torch.rand(3, generator=shared_generator(1, 2, "r")), torch.rand(3, generator=shared_generator(1, 2, "r"))
    )


def test_split_batch_keeps_global_positions_and_conditions():
    batch = {
        "cond": {"class_labels": torch.arange(10, 16)},
        "x0": torch.randn(6, 1, 2, 2),
        "shape": (6, 1, 2, 2),
        "index": torch.arange(4, 10),
        "global_batch_size": 12,
        "prompts": list("abcdef"),
    }
    parts = split_batch(batch, 4)
    assert [p["shape"] for p in parts] == [(4, 1, 2, 2), (2, 1, 2, 2)]
    assert torch.equal(torch.cat([p["index"] for p in parts]), batch["index"])
    assert torch.equal(torch.cat([p["cond"]["class_labels"] for p in parts]), batch["cond"]["class_labels"])
    assert torch.equal(torch.cat([p["x0"] for p in parts]), batch["x0"])
    assert sum((p["prompts"] for p in parts), []) == batch["prompts"]
    assert all(p["global_batch_size"] == 12 for p in parts)
    assert split_batch(batch, 6) == [batch]
    assert (
        micro_batch_size(256, 4, None) == 64 and micro_batch_size(256, 4, 16) == 16 and micro_batch_size(8, 2, 64) == 4
    )


def test_micro_batch_size_is_validated():
    with pytest.raises(ConfigError, match="data.micro_batch_size"):
        load_config(None, ["data.micro_batch_size=0"])


def test_start_up_names_processes_and_warns_when_fewer_run_than_asked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(REQUESTED_ENV, "2")
    lines = startup_lines(1, "NO", 8, 2)
    assert lines[0].startswith("processes: 1 (NO)") and "4 micro-batch(es) of at most 2" in lines[0]
    assert len(lines) == 2 and "asked for 2 processes" in lines[1] and "--multi_gpu" in lines[1]
    assert len(startup_lines(2, "MULTI_CPU", 8, 4)) == 1  # as many as asked: no warning


def test_the_asked_process_count_is_found_where_launchers_leave_it(monkeypatch):
    from types import SimpleNamespace

    from fewstep.launch_cmd import _record_requested
    from fewstep.training.processes import _from_launcher_cmdline, requested_processes

    monkeypatch.setenv(REQUESTED_ENV, "")  # restored (removed) after the test: _record_requested sets it
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _record_requested(SimpleNamespace(num_processes=3, config_file=None))  # `fewstep launch --num_processes 3`
    assert requested_processes()[0] == 3
    cmd = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "train/train.py"]
    assert _from_launcher_cmdline(cmd) == 2
    assert _from_launcher_cmdline(["accelerate", "launch", "--num-processes=4", "x.py"]) == 4
    assert _from_launcher_cmdline(["python", "train/train.py", "--num_processes", "2"]) is None
