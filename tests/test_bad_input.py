"""Bad input and faults through the real command lines, each in its own process.

Every user mistake ends with exit status 2, one line on stderr naming the problem, no traceback,
and every file that existed before unchanged (hashed before and after). The faults: a truncated
latest checkpoint is passed over by resume=latest (which says so); resuming an older checkpoint
with checkpoint.keep=1 loses no later checkpoint; overwrite=true with a damaged teacher leaves the
old run as it was. One tiny run (a 4-step DSM run on a tiny DiT pipeline folder, checkpoints at
steps 1, 2, 3) is trained once for the module and copied where a case changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "digits" / "dsm.yaml")
FAST = [
    "data.real_data=false",
    "data.batch_size=2",
    "objective.teacher_steps=2",
    "log.sample_count=2",
    "log.sample_every=0",
    "log.trackers=[]",
    "log.progress=false",
    "ema.rate=0",
]


def _env(cache: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        FEWSTEP_CACHE=str(cache),
        PYTHONWARNINGS="ignore",
    )
    env.pop("FEWSTEP_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def fewstep(work):
    env = _env(work / "cache")

    def call(*args: str, cwd: Path | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, sys.executable, "-m", "fewstep.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(cwd or work),
            timeout=300,
        )

    return call


def train_args(teacher, out, *overrides, preset: str = PRESET) -> list[str]:
    fast = FAST if preset == PRESET else [f for f in FAST if not f.startswith("objective.")]
    return ["train", "--config", preset, f"teacher.source={teacher}", f"output_dir={out}", *fast, *overrides]


@pytest.fixture(scope="module")
def tiny_dit(work):
    """A tiny random DiT pipeline folder (10 classes): the teacher of every case."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_pipeline

    d = work / "tiny_dit"
    make_tiny_pipeline("dit", seed=0).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def trained(work, tiny_dit, fewstep):
    """A finished 4-step run with checkpoints at steps 1, 2 and 3."""
    out = work / "trained"
    res = fewstep(*train_args(tiny_dit, out, "steps=4", "checkpoint.every=1", "checkpoint.keep=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_000000{i}" for i in (1, 2, 3)]
    return out


def damaged(src: Path, dst: Path, part: str) -> Path:
    """A copy of `src` with `part` cut to 1000 bytes."""
    shutil.copytree(src, dst)
    f = dst / part
    f.write_bytes(f.read_bytes()[:1000])
    return dst


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (a missing root hashes as absent)."""
    out = {}
    for r in roots:
        if r.is_file():
            out[str(r)] = hashlib.sha256(r.read_bytes()).hexdigest()
        for f in sorted(r.rglob("*")) if r.is_dir() else []:
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def each_user_error(fewstep, cases, **kw) -> None:
    """Run the (args, names) cases, two processes at a time (they are independent), and check each."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: fewstep(*c[0], **kw), cases))
    for (_, names), res in zip(cases, results):
        user_error(res, *names)


def user_error(res: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, one error line on stderr naming every one of `names`; returns it."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, res.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- fewstep train -------------------------------------------------------------------------------------
def test_train_refuses_before_touching_anything(work, tiny_dit, fewstep, tmp_path):
    """Each mistake is named before the output folder is created (or touched) and before the teacher loads."""
    new = tmp_path / "new"
    existing_file = tmp_path / "a_file"
    existing_file.write_text("keep me")
    cases = [
        (train_args(tmp_path / "no_teacher", new), ["teacher.source", "no_teacher"]),  # missing teacher folder
        (
            train_args(tiny_dit, new, "objective.num_steps=-1", preset=str(ROOT / "configs/digits/dmd2_4step_vp.yaml")),
            ["objective.num_steps"],
        ),
        (
            train_args(tiny_dit, new, f"data.prompts={ROOT / 'configs/prompts/example_prompts.txt'}"),
            ["data.prompts", "class-conditional"],
        ),
        (train_args(tiny_dit, new, "log.trackers=[nosuchtracker]"), ["log.trackers", "nosuchtracker"]),
        (train_args(tiny_dit, existing_file), ["output_dir", "existing file"]),
        (train_args(tiny_dit, new, "objective.teacher_guidance=nan"), ["objective.teacher_guidance", "finite"]),
        (train_args(tiny_dit, new, "optim.default.lr=.inf"), ["optim.default.lr", "finite"]),
        (train_args(tiny_dit, new, "data.batch_size=0"), ["data.batch_size"]),
        (train_args(tiny_dit, "."), ["output_dir", "current folder"]),
        (train_args(tiny_dit, Path.home()), ["output_dir", "home folder"]),
        (train_args(tiny_dit, ROOT), ["output_dir"]),
    ]
    before = hashes(existing_file, ROOT / "configs")
    each_user_error(fewstep, cases, cwd=tmp_path)
    assert not new.exists()
    assert hashes(existing_file, ROOT / "configs") == before


def test_train_read_only_output_folder(tiny_dit, fewstep, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.txt").write_text("old")
    ro.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        prefix = (
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--inh-caps",
            "-dac_override,-dac_read_search",
        )
    try:
        user_error(fewstep(*train_args(tiny_dit, ro / "run"), prefix=prefix), "output_dir", "cannot write")
        user_error(fewstep(*train_args(tiny_dit, ro, "overwrite=true"), prefix=prefix), "output_dir", "cannot write")
        assert sorted(p.name for p in ro.iterdir()) == ["old.txt"]
    finally:
        ro.chmod(0o755)


def test_train_damaged_teacher_and_overwrite_keeps_the_old_run(tiny_dit, trained, fewstep, tmp_path):
    """A damaged pipeline folder is named in one line; with overwrite=true the old run is back intact."""
    bad = damaged(tiny_dit, tmp_path / "bad_teacher", "transformer/diffusion_pytorch_model.safetensors")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = hashes(run)
    user_error(
        fewstep(*train_args(bad, run, "overwrite=true", "steps=4", "checkpoint.every=1")),
        "diffusion_pytorch_model.safetensors",
    )
    assert hashes(run) == before
    assert not (tmp_path / ".run.replaced").exists()
    # a pipeline folder whose model_index.json is not JSON: refused before anything is touched
    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_dit, garbled)
    (garbled / "model_index.json").write_text("{not json")
    user_error(fewstep(*train_args(garbled, run, "overwrite=true")), "model_index.json")
    assert hashes(run) == before


def test_resume_refusals_leave_the_run_unchanged(trained, fewstep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = hashes(run)
    older = run / "checkpoints" / "step_0000001"
    teacher = trained_teacher(run)
    cases = [
        (
            train_args(teacher, run, "resume=latest", "steps=4", "lora.student=true", "lora.rank=2"),
            ["resume", "step_0000003"],
        ),  # another network shape: the checkpoint does not fit
        (
            train_args(teacher, run, "resume=latest", "steps=4", "optim.default.lr=1e-3"),
            ["optim.generator.lr", "0.0001", "0.001"],
        ),  # the restored optimizer would keep the old lr
        (train_args(teacher, run, "resume=latest", "steps=2"), ["steps=2", "3"]),
        (train_args(teacher, run, f"resume={older}", "steps=4"), ["resume.branch=true", "step_0000003"]),
        (
            train_args(
                teacher, run, "resume=latest", "steps=4", preset=str(ROOT / "configs/digits/dmd2_4step_vp.yaml")
            ),
            ["objective", "dsm", "dmd2"],
        ),
    ]
    each_user_error(fewstep, cases)
    assert hashes(run) == before


def trained_teacher(run: Path) -> str:
    return json.loads((run / "run_card.json").read_text())["teacher"]["source"]


def test_truncated_latest_checkpoint_falls_back_and_says_so(trained, fewstep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    bad = run / "checkpoints" / "step_0000003" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:500])
    damaged_hashes = {k.replace(str(run / "checkpoints"), ""): v for k, v in hashes(bad.parent).items()}
    res = fewstep(*train_args(trained_teacher(run), run, "resume=latest", "steps=4", "checkpoint.every=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "skipped step_0000003 (model.safetensors has 500 bytes" in res.stdout
    assert "resuming from" in res.stdout and "step_0000002" in res.stdout
    # the damaged checkpoint is set aside, not deleted; the run went on from step 2
    aside = list((run / "checkpoints" / "set_aside").glob("*/step_0000003"))
    assert len(aside) == 1
    moved = {k.replace(str(aside[0].parent), ""): v for k, v in hashes(aside[0]).items()}
    assert moved == damaged_hashes
    card = json.loads((run / "run_card.json").read_text())
    assert card["steps"] == 4
    from fewstep.training.checkpoint import checkpoint_problem

    assert checkpoint_problem(run / "checkpoints" / "step_0000003") is None  # rewritten by the resumed run


def test_branch_from_an_older_checkpoint_with_keep_1_loses_nothing(trained, fewstep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    later = {n: hashes(run / "checkpoints" / n) for n in ("step_0000002", "step_0000003")}
    res = fewstep(
        *train_args(
            trained_teacher(run),
            run,
            f"resume={run / 'checkpoints' / 'step_0000001'}",
            "resume.branch=true",
            "steps=4",
            "checkpoint.every=1",
            "checkpoint.keep=1",
        )
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "moved step_0000002, step_0000003 aside" in res.stdout
    aside = next((run / "checkpoints" / "set_aside").iterdir())
    for n, h in later.items():  # every later checkpoint kept, byte for byte
        assert {k.replace(str(aside), ""): v for k, v in hashes(aside / n).items()} == {
            k.replace(str(run / "checkpoints"), ""): v for k, v in h.items()
        }
    # keep=1 pruned only this branch's own older checkpoints: its newest (step 3) remains
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_0000003"]


def test_launch_reports_errors_in_one_line(tiny_dit, trained, fewstep, tmp_path):
    """`fewstep launch` (accelerate launch of the train entry point): a config mistake is found before any
    process starts; an error inside the training process is its one line, without the launcher's traceback."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = hashes(run)
    bad = damaged(tiny_dit, tmp_path / "bad_teacher", "transformer/diffusion_pytorch_model.safetensors")
    accel = [
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        "--",
    ]
    each_user_error(
        fewstep,
        [
            ([*accel, *train_args(tiny_dit, run, "optim.default.lrr=1")[1:]], ["optim.default.lrr"]),
            ([*accel, *train_args(bad, run, "overwrite=true")[1:]], ["diffusion_pytorch_model.safetensors"]),
        ],
    )
    assert hashes(run) == before


# ---- fewstep sample --------------------------------------------------------------------------------------
def test_sample_bad_options(tiny_dit, fewstep, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "keep.png").write_bytes(b"x")
    before = hashes(folder)
    out = tmp_path / "grid.png"
    common = ["sample", "--teacher", tiny_dit, "--steps", "2", "--per-row", "1"]
    cases = [
        ([*common, "--batch-size", "0", "--out", out], ["--batch-size"]),
        ([*common, "--guidance", "nan", "--out", out], ["--guidance", "finite"]),
        ([*common, "--times", "1,0.5,0.5,0", "--out", out], ["--times", "decreasing"]),
        ([*common, "--out", folder], ["--out", "folder"]),
        (["sample", "--teacher", tmp_path / "nowhere", "--out", out], ["nowhere"]),
        ([*common, "--classes", "3,10", "--out", out], ["--classes", "10", "0..9"]),
    ]
    each_user_error(fewstep, cases)
    assert not out.exists()
    assert hashes(folder) == before


# ---- fewstep eval ---------------------------------------------------------------------------------------
def test_eval_bad_options(tiny_dit, fewstep, tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    common = ["eval", "--pipeline", tiny_dit, "--steps", "1", "--num-samples", "4"]
    cases = [
        ([*common, "--guidance", "nan", "--out", out], ["--guidance", "finite"]),
        ([*common, "--batch-size", "0", "--out", out], ["--batch-size"]),
        ([*common, "--out", a_file], ["--out", "existing file"]),
        (["eval", "--pipeline", tmp_path / "nowhere", "--out", out], ["nowhere"]),
    ]
    each_user_error(fewstep, cases)
    assert not out.exists()
    assert a_file.read_text() == "not a folder"


# ---- fewstep export --------------------------------------------------------------------------------------
def test_export_refuses_a_teacher_with_damaged_vae_weights(tiny_dit, trained, fewstep, tmp_path):
    bad = damaged(tiny_dit, tmp_path / "bad_vae", "vae/diffusion_pytorch_model.safetensors")
    out = tmp_path / "export"
    user_error(
        fewstep("export", "--checkpoint", trained, "--teacher", bad, "--out", out),
        "vae",
        "diffusion_pytorch_model.safetensors",
    )
    assert not out.exists()


# ---- in-process: JSON and the reference cache -------------------------------------------------------------
def test_json_never_holds_nan(tmp_path):
    from fewstep.errors import dumps_json
    from fewstep.evaluation.inputs import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"fid": float("nan"), "rows": [1.0, float("inf")], "guidance": 2.0})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "fid": None,
        "rows": [1.0, None],
        "guidance": 2.0,
    }
    assert dumps_json({"a": float("-inf")}) == '{"a": null}'


def test_truncated_reference_cache_is_recomputed(tmp_path, monkeypatch, capsys):
    import torch

    from fewstep.evaluation import ReferenceFeatures

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))

    class Counting:
        name, weights_sha256, calls = "counting", "0" * 64, 0

        def layers(self):
            return ["f"]

        def features(self, images):
            Counting.calls += 1
            return {"f": torch.arange(6, dtype=torch.float32).reshape(3, 2)}

    ext = Counting()
    first = ReferenceFeatures.compute(None, ext, "ref", {})
    cache = Path(first.description["cache"])
    assert Counting.calls == 1 and cache.is_file()
    assert ReferenceFeatures.compute(None, ext, "ref", {}).description["cached"] and Counting.calls == 1
    cache.write_bytes(cache.read_bytes()[:40])
    again = ReferenceFeatures.compute(None, ext, "ref", {})
    assert Counting.calls == 2 and not again.description["cached"]
    assert torch.equal(again.features["f"], first.features["f"])
    assert "recomputing" in capsys.readouterr().err
    assert ReferenceFeatures.compute(None, ext, "ref", {}).description["cached"]  # the rewritten cache reads


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch):
    """In process, on the exact Gaussian-mixture teacher: a replacing run that fails before its first
    checkpoint puts the old run back byte for byte; one that writes a checkpoint replaces it."""
    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    from bundles import gmm_bundle

    from fewstep.config import load_config
    from fewstep.objectives import registry
    from fewstep.training import run
    from fewstep.training.loop import NonFiniteError

    monkeypatch.setitem(registry.REGISTRY, "toy", "toy_objective:build")
    old = tmp_path / "run"
    (old / "checkpoints" / "step_0000005").mkdir(parents=True)
    (old / "checkpoints" / "step_0000005" / "model.safetensors").write_bytes(b"old weights")
    (old / "run_card.json").write_text("{}")
    before = hashes(old)

    def cfg(*ov):
        return load_config(
            None,
            [
                f"output_dir={old}",
                "objective.name=toy",
                "data.batch_size=4",
                "overwrite=true",
                "log.trackers=[]",
                "log.progress=false",
                *ov,
            ],
        )

    with pytest.raises(NonFiniteError):  # every update non-finite: stops at step 2, before checkpoint.every=5
        run(
            cfg(
                "steps=10",
                "checkpoint.every=5",
                "objective.nan_steps=[0,1,2,3]",
                "objective.nan_phase=guidance",
                "faults.max_consecutive_nonfinite=2",
            ),
            teacher=gmm_bundle(),
        )
    assert hashes(old) == before and not (tmp_path / ".run.replaced").exists()
    run(cfg("steps=3", "checkpoint.every=1"), teacher=gmm_bundle())
    assert (old / "run_card.json").read_text() != "{}"
    assert not (old / "checkpoints" / "step_0000005").exists() and not (tmp_path / ".run.replaced").exists()
