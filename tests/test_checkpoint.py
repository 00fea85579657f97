"""Checkpoints: a run stopped after k steps and resumed ends bit-identical to an uninterrupted run
(two optimizer groups, EMA, cosine schedule, objective state, global-RNG draws; and a LoRA student);
a crash mid-save never leaves a checkpoint that resume picks up; the last N are kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config import ConfigError, load_config
from fewstep.objectives import registry
from fewstep.training import checkpoint as ck
from fewstep.training import loop, run
from tests.dist import toy_objective
from tests.dist.bundles import gmm_bundle, tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.trackers=[]", "log.progress=false"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "toy", "tests.dist.toy_objective:build")
    toy_objective.LAST.clear()
    return toy_objective


def _cfg(out, *ov, preset=None):
    return load_config(ROOT / "configs" / preset if preset else None, [f"output_dir={out}", *QUIET, *ov])


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{f.name}:{k}"] = v
    return out


def _losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


TOY = [
    "objective.name=toy",
    "steps=9",
    "data.batch_size=4",
    "optim.default.lr=0.02",
    "optim.default.scheduler=cosine",
    "optim.default.warmup_steps=2",
    "optim.generator.lr=0.05",
    "ema.rate=0.8",
    "log.every=1",
    "log.sample_every=4",
    "checkpoint.every=0",
]


def test_resume_is_bit_identical(tmp_path, toy):
    ref = run(_cfg(tmp_path / "ref", *TOY), teacher=gmm_bundle())
    ref_calls = int(toy.LAST[-1].after_calls)
    part = run(_cfg(tmp_path / "cut", *TOY, "stop_after=4"), teacher=gmm_bundle())
    assert part.stopped_early and part.steps == 4 and not (tmp_path / "cut" / "final").exists()
    assert ck.latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    res = run(_cfg(tmp_path / "cut", *TOY, "stop_after=4", "resume=latest"), teacher=gmm_bundle())
    assert res.steps == 9 and not res.stopped_early
    _assert_identical(_final(ref.run_dir), _final(res.run_dir))  # student and its EMA, bit for bit
    assert int(toy.LAST[-1].after_calls) == ref_calls  # the objective's own state came back too
    a, b = _losses(ref.run_dir), _losses(res.run_dir)
    assert sorted(b) == list(range(1, 10))  # one record per step, none repeated
    for s in range(1, 10):
        assert a[s]["loss/guidance"] == b[s]["loss/guidance"] and a[s]["lr/guidance"] == b[s]["lr/guidance"]


def test_resume_lora_student_bit_identical(tmp_path):
    common = [
        "steps=4",
        "data.batch_size=2",
        "data.real_data=false",
        "lora.student=true",
        "lora.rank=4",
        "objective.teacher_steps=1",
        "optim.default.lr=1e-2",
        "log.every=1",
        "checkpoint.every=0",
    ]
    ref = run(_cfg(tmp_path / "ref", *common, preset="digits/dsm.yaml"), teacher=tiny_bundle("dit"))
    run(_cfg(tmp_path / "cut", *common, "stop_after=2", preset="digits/dsm.yaml"), teacher=tiny_bundle("dit"))
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    res = run(_cfg(tmp_path / "cut", *common, "resume=latest", preset="digits/dsm.yaml"), teacher=tiny_bundle("dit"))
    _assert_identical(_final(ref.run_dir), _final(res.run_dir))


def test_crash_mid_save_is_never_resumed(tmp_path, toy, monkeypatch):
    """The second save dies after writing its weights: the folder stays a .tmp-*, resume takes the
    first checkpoint, and the resumed run still ends exactly like an uninterrupted one."""
    common = [*TOY, "checkpoint.every=3", "log.sample_every=0"]
    ref = run(_cfg(tmp_path / "ref", *common), teacher=gmm_bundle())
    real_save = ck.save_checkpoint
    calls = []

    def flaky(*a, **kw):
        calls.append(a[1])
        if len(calls) == 2:
            kw["_fail_after"] = "model"
        return real_save(*a, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", flaky)
    with pytest.raises(ck.CheckpointError, match="simulated failure"):
        run(_cfg(tmp_path / "cut", *common), teacher=gmm_bundle())
    root = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_0000006", "step_0000003"]
    assert ck.latest_checkpoint(tmp_path / "cut").name == "step_0000003"
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    res = run(_cfg(tmp_path / "cut", *common, "resume=latest"), teacher=gmm_bundle())
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())  # stale temp folders are cleared
    _assert_identical(_final(ref.run_dir), _final(res.run_dir))


@pytest.mark.parametrize("part", ["model", "rng", "state"])
def test_failed_save_leaves_no_checkpoint(tmp_path, part):
    holder = torch.nn.ModuleDict({"student": torch.nn.Linear(3, 2)})
    opt = {"generator": torch.optim.AdamW(holder.parameters(), lr=0.1)}
    sched = {"generator": torch.optim.lr_scheduler.LambdaLR(opt["generator"], lambda n: 1.0)}
    keys = {"student.weight", "student.bias"}
    kw = dict(accelerator=None, holder=holder, keys=keys, optimizers=opt, schedulers=sched)
    ck.save_checkpoint(tmp_path, 1, **kw)
    with pytest.raises(ck.CheckpointError):
        ck.save_checkpoint(tmp_path, 2, _fail_after=part, **kw)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    ck.clean_stale(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]


def test_keeps_last_n_and_restores_everything(tmp_path):
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"student": torch.nn.Linear(3, 2), "fake": torch.nn.Linear(2, 2)})
    opts = {
        "generator": torch.optim.AdamW(holder["student"].parameters(), lr=0.1),
        "guidance": torch.optim.AdamW(holder["fake"].parameters(), lr=0.01, betas=(0.0, 0.95)),
    }
    scheds = {g: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 1.0 / (n + 1)) for g, o in opts.items()}
    for g, o in opts.items():
        for p in holder["student" if g == "generator" else "fake"].parameters():
            p.grad = torch.randn_like(p)
        o.step()
        scheds[g].step()
    keys = {k for k in holder.state_dict()}
    kw = dict(accelerator=None, holder=holder, keys=keys, optimizers=opts, schedulers=scheds)
    for step in range(1, 5):
        ck.save_checkpoint(tmp_path, step, keep=2, counters={"skipped": step}, **kw)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    want_w = {k: v.clone() for k, v in holder.state_dict().items()}
    want_o = {g: copy.deepcopy(o.state_dict()) for g, o in opts.items()}
    draw = torch.rand(3)
    # scramble, then restore
    with torch.no_grad():
        for p in holder.parameters():
            p.add_(1.0)
    for g, o in opts.items():
        o.step()
        scheds[g].step()
    state = ck.load_checkpoint(tmp_path / "checkpoints" / "step_0000004", **kw)
    assert state["step"] == 4 and state["skipped"] == 4
    assert torch.equal(torch.rand(3), draw)  # the RNG is back where it was saved
    for k, v in holder.state_dict().items():
        assert torch.equal(v, want_w[k])
    for g, o in opts.items():
        got = o.state_dict()
        assert tuple(got["param_groups"][0]["betas"]) == tuple(want_o[g]["param_groups"][0]["betas"])
        for i, st in got["state"].items():
            for name, t in st.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(want_o[g]["state"][i][name]))
        assert scheds[g].last_epoch == 1


def test_a_checkpoint_of_the_old_fake_score_group_name_resumes(tmp_path):
    holder = torch.nn.ModuleDict({"student": torch.nn.Linear(3, 2), "fake": torch.nn.Linear(2, 2)})
    opts = {
        "generator": torch.optim.AdamW(holder["student"].parameters(), lr=0.1),
        "guidance": torch.optim.AdamW(holder["fake"].parameters(), lr=0.01),
    }
    scheds = {g: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 1.0 / (n + 1)) for g, o in opts.items()}
    for _ in range(3):
        scheds["guidance"].step()
    kw = dict(accelerator=None, holder=holder, keys=set(holder.state_dict()))
    ck.save_checkpoint(tmp_path, 1, optimizers=opts, schedulers=scheds, **kw)
    renamed = {"generator": opts["generator"], "fake_score": opts["guidance"]}
    new = {g: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 1.0) for g, o in renamed.items()}
    ck.load_checkpoint(tmp_path / "checkpoints" / "step_0000001", optimizers=renamed, schedulers=new, **kw)
    assert new["fake_score"].last_epoch == 3 and new["generator"].last_epoch == 0


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run(_cfg(tmp_path / "r", f"resume={tmp_path / 'nowhere'}", "steps=1"), teacher=gmm_bundle())
