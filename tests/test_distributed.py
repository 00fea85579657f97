"""Two processes (gloo on CPU, one torchrun launch per fixture): data parallel gives the same
losses and weights as one process at the same global batch, for every registered objective (with
gradient accumulation on the two processes), and FSDP2 through accelerate's
plugin trains the same, saves a sharded (and a full) checkpoint, and resumes from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.training import run
from tests.dist import equivalence as eq
from tests.dist.bundles import tiny_bundle
from tests.dist.run_dist import cfg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _weights(run_dir: Path, which: str = "student") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / which / "diffusion_pytorch_model.safetensors"))


def _rel_diff(got: dict, ref: dict, start: dict) -> float:
    """|got - ref| relative to how far training moved ref from the start (float tolerance of a
    different reduction order, as opposed to a different training)."""
    num = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
    den = sum(float(((ref[k] - start[k]) ** 2).sum()) for k in ref) ** 0.5
    assert den > 0, "training did not move the weights"
    return num / den


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss/generator"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _torchrun() -> str:
    """The torchrun next to this interpreter (the test is skipped without one)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    return torchrun


def _launch_two(torchrun: str, script: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """`script OUT` under torchrun with two gloo processes on the CPU, one thread each."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / script), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    torchrun = _torchrun()
    out = tmp_path_factory.mktemp("dist")
    proc = _launch_two(torchrun, "tests/dist/run_dist.py", out, 600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads((out / "dist_result.json").read_text())
    single = run(cfg(out / "single"), teacher=tiny_bundle("dit"))  # the same run, one process
    return out, result, single.run_dir


def test_two_processes_equal_one_at_the_same_global_batch(launched):
    out, result, single = launched
    assert result["ddp"] == {"steps": 4, "world": 2, "stopped": True}  # with a checkpoint and resume at step 2
    assert _losses(out / "ddp") == pytest.approx(_losses(single), rel=1e-5)
    teacher = tiny_bundle("dit").denoiser.backbone.state_dict()
    for which in ("student", "student_ema"):
        assert _rel_diff(_weights(out / "ddp", which), _weights(single, which), teacher) < 1e-3


def test_fsdp2_trains_the_same_and_resumes_from_sharded_and_full_checkpoints(launched):
    out, result, single = launched
    ref_w, ref_l = _weights(single), _losses(single)
    teacher = tiny_bundle("dit").denoiser.backbone.state_dict()
    for kind in ("sharded", "full"):
        d = out / f"fsdp_{kind}"
        assert result[f"fsdp_{kind}"] == {"stopped": True, "steps": 4}
        card = json.loads((d / "run_card.json").read_text())
        assert card["sharded"] is True and card["processes"] == 2 and card["steps"] == 4
        assert _losses(d) == pytest.approx(ref_l, rel=1e-5)  # steps 1-2 before, 3-4 after the resume
        assert _rel_diff(_weights(d), ref_w, teacher) < 1e-3
    # resuming from a sharded or from a full checkpoint continues identically
    a, b = _weights(out / "fsdp_sharded"), _weights(out / "fsdp_full")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = out / "fsdp_sharded" / "checkpoints" / "step_0000002"
    assert json.loads((ck / "state.json").read_text())["format"] == "sharded"
    assert sorted(p.name for p in (ck / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    full = out / "fsdp_full" / "checkpoints" / "step_0000002"
    assert json.loads((full / "state.json").read_text())["format"] == "full"
    saved = load_file(str(full / "model.safetensors"))
    shapes = {f"student.backbone.{k}": tuple(v.shape) for k, v in ref_w.items()}
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes  # gathered, not shards


def test_fsdp2_dmd2_resume_is_identical_across_processes(launched):
    """DMD2 (generator and fake_score groups, global-RNG draws) sharded over two processes: stopped
    after 2 steps with a sharded checkpoint and resumed, it ends exactly where 4 straight steps end."""
    out, result, _ = launched
    assert result["dmd2"] == {"steps": 4}
    a, b = _weights(out / "dmd2_straight"), _weights(out / "dmd2_resumed")
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (out / "dmd2_straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (out / "dmd2_resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/fake_score"] for r in la] == [r["loss/fake_score"] for r in lb]
    assert any("loss/generator" in r for r in la)
    teacher = tiny_bundle("dit").denoiser.backbone.state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in teacher)


# ---- every objective: 2 processes (each in 2 micro-batches) train as 1 process with the whole batch ----
@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, equivalence_runs):
    """One torchrun launch that trains every registered objective with two gloo processes
    (tests/dist/run_equivalence.py); returns its output folder."""
    torchrun = _torchrun()
    out = tmp_path_factory.mktemp("equivalence_2p")
    shutil.copy(equivalence_runs.latents, out / "latents.safetensors")
    eq.generator_run(out / "nct_generator", out / "latents.safetensors")  # nct's generator, made once here
    proc = _launch_two(torchrun, "tests/dist/run_equivalence.py", out, 900)
    errors = {p.stem: p.read_text()[-3000:] for p in out.glob("*.error")}
    if proc.returncode != 0 or errors:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {errors or proc.stderr[-6000:]}")
    assert f"processes: 2 ({'MULTI_CPU'})" in proc.stdout, proc.stdout[-2000:]
    return out


@pytest.mark.parametrize("name", eq.NAMES)
def test_every_objective_trains_the_same_on_two_processes_as_on_one(name, two_process_runs, equivalence_runs):
    """The same global batch of 8: two processes with 4 samples each, in micro-batches of 2, give
    one process's per-step losses and gradient norms and its weights (every trained network) to
    float tolerance. Per-process draws from torch's generator (seeded by rank) fail here."""
    one, one_state = equivalence_runs(name)
    two = load_file(str(two_process_runs / f"{name}.safetensors"))
    la, lb = eq.records(one.run_dir), eq.records(two_process_runs / name)
    assert len(la) == eq.STEPS and [r.keys() for r in la] == [r.keys() for r in lb]
    for a, b in zip(la, lb):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7), (a, b)
    assert eq.rel_diff(two, one_state, name) < 1e-4
