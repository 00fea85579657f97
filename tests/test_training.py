"""The training entry point in one process: a run end to end, output-folder rules, phase order
and gradient zeroing, non-finite skipping and stopping, LoRA students, bf16 autocast, gradient
checkpointing, data batches, the dry run, and one step of every real-family preset at tiny size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config import ConfigError, load_config
from fewstep.objectives import registry
from fewstep.training import run
from fewstep.training.data import BatchSource
from fewstep.training.ema import EMA
from fewstep.training.loop import NonFiniteError
from fewstep.training.schedules import make_scheduler
from tests.dist import toy_objective
from tests.dist.bundles import K, gmm_bundle, tiny_bundle, true_means

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.trackers=[]", "log.progress=false"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "toy", "tests.dist.toy_objective:build")
    toy_objective.LAST.clear()
    return toy_objective


def cfg_for(tmp_path, *overrides, preset="digits/dsm.yaml", name="run"):
    """A preset (None: the built-in defaults) with overrides, writing under tmp_path/name."""
    path = ROOT / "configs" / preset if preset else None
    return load_config(path, [f"output_dir={tmp_path / name}", *QUIET, *overrides])


# ---------------------------------------------------------------------------------------------
def test_final_ema_of_a_student_saved_through_a_standalone_copy(tmp_path):
    """A student saved as a plain copy (a LoRA role view, a two-time student folded) writes its
    EMA's weights as final/student_ema, not the trained weights a second time."""
    from types import SimpleNamespace

    from torch import nn

    from fewstep.training.outputs import save_final

    class Viewed(nn.Module):  # the shape of a role view: a backbone, saved through standalone()
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(3, 2)

        def standalone(self):
            import copy

            return copy.deepcopy(self).requires_grad_(False)

    student = Viewed()
    ema = EMA(dict(student.named_parameters()), rate=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # trained weights now differ from the shadow
    files = save_final(tmp_path, student, ema, SimpleNamespace(is_main_process=True))
    raw = load_file(str(tmp_path / files["student"] / "model.safetensors"))
    avg = load_file(str(tmp_path / files["student_ema"] / "model.safetensors"))
    assert torch.equal(raw["weight"], student.backbone.weight.detach())
    assert torch.equal(avg["weight"], ema.shadow["backbone.weight"]) and not torch.equal(avg["weight"], raw["weight"])
    assert torch.equal(avg["bias"], ema.shadow["backbone.bias"])
    assert torch.equal(student.backbone.weight, ema.params["backbone.weight"])  # trained weights put back


# ---------------------------------------------------------------------------------------------
def test_dsm_run_learns_and_writes_outputs(tmp_path):
    """DSM fine-tuning of a student whose teacher's means are off by 0.5 moves it toward the data
    (exact mixture samples); the run writes weights, a run card, metrics and a sample grid."""
    bundle = gmm_bundle(shift=0.5)
    teacher_before = bundle.denoiser.backbone.means.detach().clone()
    cfg = cfg_for(
        tmp_path,
        "steps=40",
        "data.batch_size=32",
        "optim.default.lr=0.05",
        "optim.default.warmup_steps=0",
        "ema.rate=0.5",
        "log.every=10",
        "log.sample_every=20",
        "checkpoint.every=0",
        "log.sample_count=8",
    )
    res = run(cfg, teacher=bundle)
    out = res.run_dir
    student = load_file(str(out / "final" / "student" / "model.safetensors"))["means"]
    truth = true_means()
    before = (teacher_before - truth).norm().item()
    after = (student - truth).norm().item()
    assert after < 0.6 * before, (before, after)
    assert torch.equal(bundle.denoiser.backbone.means.detach(), teacher_before)  # the teacher is untouched
    ema = load_file(str(out / "final" / "student_ema" / "model.safetensors"))["means"]
    assert not torch.equal(ema, student) and (ema - truth).norm() < before
    card = json.loads((out / "run_card.json").read_text())
    assert card["steps"] == 40 and card["objective"] == "dsm" and card["nonfinite_skipped"] == 0
    assert card["sampling"]["renoise"] == "ddim" and card["sampling"]["times"][0] == 1.0
    assert card["sampling"]["times"][-1] == 0.0 and len(card["sampling"]["times"]) == 5
    assert card["objective_params"]["sampling_steps"] == 4 and card["config"]["steps"] == 40
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert all(math.isfinite(r["loss/generator"]) for r in recs)
    assert (out / "samples" / "step_0000020.png").is_file() and (out / "samples" / "step_0000040.png").is_file()
    assert (out / "config.yaml").is_file()


def test_run_returns_the_trained_student_and_objective(tmp_path):
    """`run` hands back the trained student (the objective's own 'student' network, holding the
    weights it saved) so a script needs no reload; a backbone that is not a diffusers model gets
    its class recorded beside its weights."""
    bundle = gmm_bundle(shift=0.5)
    cfg = cfg_for(
        tmp_path,
        "steps=6",
        "data.batch_size=16",
        "optim.default.lr=0.05",
        "optim.default.warmup_steps=0",
        "ema.rate=0",
        "log.sample_every=0",
        "checkpoint.every=0",
    )
    res = run(cfg, teacher=bundle)
    assert res.objective is not None and res.student is res.objective.nets["student"]
    saved = load_file(str(res.run_dir / "final" / "student" / "model.safetensors"))["means"]
    assert torch.equal(res.student.backbone.means.detach(), saved)
    assert not torch.equal(saved, bundle.denoiser.backbone.means.detach())  # it trained
    record = json.loads((res.run_dir / "final" / "student" / "backbone.json").read_text())
    assert record["class"] == "fewstep.testing.GaussianMixtureBackbone"


def test_final_folder_rebuilds_the_returned_student(tmp_path):
    """The final weights folder's config.json rebuilds the backbone with diffusers alone, and the
    rebuilt network computes what the returned student's backbone computes."""
    import diffusers

    bundle = tiny_bundle("dit")
    cfg = cfg_for(
        tmp_path,
        "steps=2",
        "data.batch_size=2",
        "data.real_data=false",
        "optim.default.lr=1e-2",
        "optim.default.warmup_steps=0",
        "ema.rate=0",
        "log.sample_every=0",
        "checkpoint.every=0",
    )
    res = run(cfg, teacher=bundle)
    folder = res.run_dir / "final" / "student"
    config = json.loads((folder / "config.json").read_text())
    rebuilt = getattr(diffusers, config["_class_name"]).from_pretrained(str(folder)).eval()
    student = res.student.backbone.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *bundle.latent_shape, generator=g)
    kw = {"timestep": torch.tensor([500, 20]), "class_labels": torch.tensor([1, 3]), "return_dict": False}
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, **kw)[0], student(x, **kw)[0], atol=1e-6)
        assert not torch.allclose(bundle.denoiser.backbone(x, **kw)[0], student(x, **kw)[0], atol=1e-6)


def test_output_dir_rules(tmp_path):
    cfg = cfg_for(tmp_path, "steps=1", "data.batch_size=4", "checkpoint.every=0")
    run(cfg, teacher=gmm_bundle())
    with pytest.raises(ConfigError, match="resume=latest .*overwrite=true"):
        run(cfg, teacher=gmm_bundle())
    marker = tmp_path / "run" / "marker.txt"
    marker.write_text("x")
    run(cfg_for(tmp_path, "steps=1", "data.batch_size=4", "overwrite=true"), teacher=gmm_bundle())
    assert not marker.exists() and (tmp_path / "run" / "run_card.json").is_file()
    with pytest.raises(ConfigError, match="finished run"):
        run(cfg_for(tmp_path, "steps=2", "data.batch_size=4", "resume=latest"), teacher=gmm_bundle())
    with pytest.raises(ConfigError, match="optim.fake_score"):  # dsm has one group, "generator"
        run(
            cfg_for(tmp_path, "steps=1", "data.batch_size=4", "optim.fake_score.lr=1e-3", name="g"),
            teacher=gmm_bundle(),
        )


def test_phase_order_zeroes_all_grads_and_steps_one_group(tmp_path, toy):
    cfg = cfg_for(
        tmp_path,
        "objective.name=toy",
        "steps=4",
        "data.batch_size=4",
        "optim.default.lr=0.05",
        "checkpoint.every=0",
        preset=None,
    )
    run(cfg, teacher=gmm_bundle())
    obj = toy.LAST[-1]
    assert [(r["step"], r["phase"]) for r in obj.records] == [
        (0, "guidance"),
        (0, "generator"),
        (1, "guidance"),
        (2, "guidance"),
        (2, "generator"),
        (3, "guidance"),
    ]
    # every phase starts with no gradient anywhere (the generator phase gives the fake score gradients)
    assert all(r["grads_none"] for r in obj.records)
    # a guidance update changes only the fake score, a generator update only the student
    rec = obj.records
    assert rec[1]["fake"] != rec[0]["fake"] and rec[1]["student"] == rec[0]["student"]
    assert rec[2]["student"] != rec[1]["student"] and rec[2]["fake"] == rec[1]["fake"]
    assert int(obj.after_calls) == 6


def test_generator_steps_sets_the_step_count_and_both_counts_are_reported(tmp_path, toy):
    """The toy objective updates its fake score every step and the student every other step:
    generator_steps=2 makes a 3-step run; the card, the metrics and the summary line give both
    counts; steps given as well must agree, else a ConfigError names both keys."""
    common = ["objective.name=toy", "data.batch_size=4", "optim.default.lr=0.05", "checkpoint.every=0", "log.every=1"]
    res = run(cfg_for(tmp_path, *common, "generator_steps=2", preset=None), teacher=gmm_bundle())
    card = json.loads((res.run_dir / "run_card.json").read_text())
    assert res.steps == 3 and card["steps"] == 3
    assert card["updates"] == {"guidance": 3, "generator": 2}
    recs = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["updates/guidance"], r["updates/generator"]) for r in recs] == [(1, 1), (2, 1), (3, 2)]
    run(cfg_for(tmp_path, *common, "generator_steps=2", "steps=3", preset=None, name="same"), teacher=gmm_bundle())
    with pytest.raises(ConfigError, match=r"steps=4 and generator_steps=2 disagree.*steps=3"):
        run(cfg_for(tmp_path, *common, "generator_steps=2", "steps=4", preset=None, name="bad"), teacher=gmm_bundle())


def test_nonfinite_skips_then_stops_with_last_checkpoint_intact(tmp_path, toy):
    common = ["objective.name=toy", "data.batch_size=4", "optim.default.lr=0.05"]
    res = run(
        cfg_for(
            tmp_path,
            *common,
            "steps=6",
            "objective.nan_steps=[2]",
            "checkpoint.every=0",
            "log.every=1",
            name="skip",
            preset=None,
        ),
        teacher=gmm_bundle(),
    )
    assert res.skipped == 1
    recs = toy.LAST[-1].records
    after_nan = next(r for r in recs if r["step"] == 3)
    before_nan = next(r for r in recs if r["step"] == 2 and r["phase"] == "generator")
    assert after_nan["student"] == before_nan["student"]  # the NaN update was not applied
    assert json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[2])["skipped"] == 1.0

    cfg = cfg_for(
        tmp_path,
        *common,
        "steps=20",
        "objective.nan_steps=[4,5,6,7,8,9,10,11,12]",
        "objective.nan_phase=guidance",
        "faults.max_consecutive_nonfinite=2",
        "checkpoint.every=2",
        "checkpoint.keep=5",
        name="stop",
        preset=None,
    )
    # step_0000006 was written two non-finite updates into the streak: it is not the last good one
    with pytest.raises(NonFiniteError, match=r"3 non-finite updates in a row.*good checkpoint is \S*step_0000004"):
        run(cfg, teacher=gmm_bundle())
    from fewstep.training.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(tmp_path / "stop")] == [2, 4, 6]
    marks = [
        json.loads((p / "state.json").read_text())["nonfinite_streak"] for _, p in list_checkpoints(tmp_path / "stop")
    ]
    assert marks == [0, 0, 2]
    # resume=latest passes over the marked checkpoint (moved aside, not deleted) and finishes once the fault is gone
    res = run(
        cfg_for(tmp_path, *common, "steps=8", "objective.nan_steps=[]", "resume=latest", name="stop", preset=None),
        teacher=gmm_bundle(),
    )
    assert res.steps == 8 and res.skipped == 0
    assert len(list((tmp_path / "stop" / "checkpoints" / "set_aside").glob("*/step_0000006/state.json"))) == 1


def test_lora_student_saves_adapters_and_a_loadable_merged_model(tmp_path):
    from diffusers import DiTTransformer2DModel

    bundle = tiny_bundle("dit")
    cfg = cfg_for(
        tmp_path,
        "steps=2",
        "data.batch_size=2",
        "data.real_data=false",
        "lora.student=true",
        "lora.rank=4",
        "lora.alpha=4",
        "optim.default.lr=1e-2",
        "optim.default.warmup_steps=0",
        "objective.teacher_steps=1",
        "precision.mixed_precision=bf16",
        "checkpoint.every=1",
    )
    res = run(cfg, teacher=bundle)
    ck = load_file(str(res.run_dir / "checkpoints" / "step_0000001" / "model.safetensors"))
    assert ck and all("lora_" in k for k in ck)  # only the adapters: frozen weights are the teacher's
    lora = load_file(str(res.run_dir / "final" / "student_lora.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # it trained
    model = DiTTransformer2DModel.from_pretrained(str(res.run_dir / "final" / "student"))
    tsd = bundle.denoiser.backbone.state_dict()
    msd = model.state_dict()
    assert set(msd) == set(tsd)
    assert any(not torch.equal(msd[k], tsd[k]) for k in msd)  # merged adapters changed some weights


def test_lora_merge_matches_peft(tmp_path):
    """The merged weights equal peft's own merge (Linear and Conv2d adapters, SDXL-like UNet)."""
    from fewstep.training.lora import add_lora, lora_targets, merge_lora_state_dict
    from tests.tiny import make_tiny

    bb = make_tiny("sdxl").backbone
    add_lora(bb, 4, 8.0, lora_targets(bb, None, "sdxl"))
    assert {type(m).__name__ for m in bb.modules()} >= {"Linear", "Conv2d"}
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ours = merge_lora_state_dict({k: v.clone() for k, v in bb.state_dict().items()}, 8.0 / 4)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(bb.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(bb.get_submodule(parent) if parent else bb, child, m.get_base_layer())
    theirs = bb.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_the_backbone_only_in_bf16():
    from fewstep.training.parallel import wrap_autocast

    bundle = tiny_bundle("dit")
    den = bundle.denoiser
    seen = []
    den.backbone.proj_out_2.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, *bundle.latent_shape)
    cond = {"class_labels": torch.tensor([1, 2])}
    ref = den(x, 0.5, cond)
    wrap_autocast(den.backbone, "cpu")
    out = den(x, 0.5, cond)
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32 and den.dtype == torch.float32  # weights stay float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05  # same function, bf16 rounding


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    runs = {}
    for gc in ("false", "true"):
        cfg = cfg_for(
            tmp_path,
            "steps=2",
            "data.batch_size=2",
            "data.real_data=false",
            "objective.teacher_steps=1",
            f"precision.gradient_checkpointing={gc}",
            "optim.default.warmup_steps=0",
            "log.every=1",
            "checkpoint.every=0",
            name=f"gc_{gc}",
        )
        res = run(cfg, teacher=tiny_bundle("dit"))
        runs[gc] = (
            load_file(str(res.run_dir / "final" / "student" / "diffusion_pytorch_model.safetensors")),
            [json.loads(ln)["loss/generator"] for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()],
        )
    assert runs["false"][1] == pytest.approx(runs["true"][1], rel=1e-6)
    for k, v in runs["false"][0].items():
        torch.testing.assert_close(runs["true"][0][k], v, rtol=1e-5, atol=1e-7)


def test_batches_balanced_and_process_invariant():
    b = gmm_bundle()
    one = BatchSource(b, 8, seed=3, real_data=True)
    parts = [BatchSource(b, 8, seed=3, process_index=r, num_processes=2, real_data=True) for r in range(2)]
    for step in (0, 5):
        full = one(step)
        halves = [p(step) for p in parts]
        assert torch.equal(torch.cat([h["cond"]["class_labels"] for h in halves]), full["cond"]["class_labels"])
        assert torch.equal(torch.cat([h["x0"] for h in halves]), full["x0"])
        assert torch.equal(torch.cat([h["index"] for h in halves]), torch.arange(8))
        counts = torch.bincount(full["cond"]["class_labels"], minlength=K)
        assert counts.tolist() == [2, 2, 2, 2]
        # real latents come from the class they are labelled with (nearest true mean)
        d = ((full["x0"][:, None] - true_means()[None]) ** 2).flatten(2).sum(-1)
        assert torch.equal(d.argmin(1), full["cond"]["class_labels"])
    assert not torch.equal(one(0)["x0"], one(1)["x0"])
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible"):
        BatchSource(b, 6, num_processes=4)


def _lr_factors(name, warmup, total, cycles=1):
    """The learning-rate factor before each of `total` + 1 updates (lr 1.0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, warmup, total, cycles)
    out = []
    for _ in range(total + 1):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_and_ema():
    # diffusers' get_scheduler: linear warm-up from 0, then the named shape over the group's updates
    f = _lr_factors("cosine", 10, 110)
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == 1.0
    assert f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0, abs=1e-12)
    assert _lr_factors("constant", 0, 5) == [1.0] * 6
    c = _lr_factors("constant", 4, 8)  # fewstep's constant keeps its warm-up (diffusers' constant_with_warmup)
    assert c[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and c[-1] == 1.0
    r = _lr_factors("cosine_restarts", 0, 100, cycles=2)  # the old name of cosine_with_restarts
    assert r == _lr_factors("cosine_with_restarts", 0, 100, cycles=2)
    assert r[0] == 1.0 and r[49] < 0.01 and r[50] == pytest.approx(1.0)
    lin = _lr_factors("linear", 0, 10)
    assert lin[5] == pytest.approx(0.5) and lin[10] == 0.0
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, rate=0.9)
    for _ in range(3):
        with torch.no_grad():
            p.add_(1.0)
        ema.update(step=10)
    expect = 0.1 * 3 * 0.9**0 + 0.1 * 2 * 0.9 + 0.1 * 1 * 0.81
    assert torch.allclose(ema.shadow["p"], torch.full((3,), expect))
    with ema.swapped():
        assert torch.allclose(p, ema.shadow["p"])
    assert torch.equal(p.detach(), torch.full((3,), 3.0))


# ---- dry run --------------------------------------------------------------------------------
def _tiny_pipeline_folder(tmp_path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    bb = tiny_bundle("dit").denoiser.backbone
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    folder = tmp_path / "tiny_pipe"
    DiTPipeline(transformer=bb, vae=vae, scheduler=DDIMScheduler()).save_pretrained(str(folder))
    return folder


def test_dry_run_builds_on_meta_and_estimates_memory(tmp_path, capsys):
    from fewstep.train_cmd import main
    from fewstep.training.bundle import meta_bundle
    from fewstep.training.dry_run import dry_run

    folder = _tiny_pipeline_folder(tmp_path)
    real_params = sum(p.numel() for p in tiny_bundle("dit").denoiser.backbone.parameters())
    cfg = load_config(ROOT / "configs" / "digits" / "dsm.yaml", [f"teacher.source={folder}", "ema.rate=0"])
    mb = meta_bundle(cfg.teacher)
    assert all(p.is_meta for p in mb.denoiser.parameters())  # nothing was read
    assert mb.latent_shape == (4, 8, 8) and mb.family == "dit"

    def total(report):  # "total ... <bytes>" line -> bytes
        last = next(ln for ln in report.splitlines() if ln.startswith("total")).split()
        units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
        return float(last[-2]) * units[last[-1]]

    one = dry_run(cfg, num_processes=1, sharding="none")
    rows = {ln.split()[0]: ln for ln in one.splitlines() if ln.split() and ln.split()[0] in ("teacher", "student")}
    assert set(rows) == {"teacher", "student"}
    assert f"{real_params / 1e3:.1f}K" in rows["teacher"]
    # teacher: weights only (4 B/param); student: weights + grads + 2 AdamW moments (16 B/param)
    assert total(one) == pytest.approx(20 * real_params, rel=0.02)
    two = dry_run(cfg, num_processes=2, sharding="fsdp")
    assert "FSDP2" in two and total(two) == pytest.approx(total(one) / 2, rel=0.02)
    lora = dry_run(
        load_config(
            ROOT / "configs" / "digits" / "dsm.yaml",
            [f"teacher.source={folder}", "lora.student=true", "lora.rank=4", "ema.rate=0"],
        )
    )
    st = next(ln for ln in lora.splitlines() if ln.startswith("student")).split()
    assert "shared" in " ".join(st)  # the LoRA student reuses the teacher's frozen weights
    assert total(lora) < 0.5 * total(one)
    assert (
        main(
            [
                "--config",
                str(ROOT / "configs" / "digits" / "dsm.yaml"),
                f"teacher.source={folder}",
                "--dry-run",
                "--processes",
                "4",
                "--sharding",
                "fsdp",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "processes 4, FSDP2" in printed and "estimated memory per process" in printed


def test_cli_reports_config_errors(capsys):
    from fewstep.train_cmd import main

    assert main(["--config", str(ROOT / "configs" / "digits" / "dsm.yaml"), "optim.generator.lrr=1", "--dry-run"]) == 2
    assert "optim.generator.lrr" in capsys.readouterr().err


# ---- real-family presets at tiny size ------------------------------------------------------------
REAL = [
    "sd15/dmd2_1step.yaml",
    "sdxl/dmd2_4step_lora.yaml",
    "pixart/tdm_4step.yaml",
    "sd3/scm_2step.yaml",
    "flux/dmd2_4step.yaml",
    "sd15/boot_1step.yaml",
    "sd3/twinflow.yaml",
]
IN_PLACE = {"twinflow"}  # objectives that train the teacher's own network (one network, no frozen copy)


@pytest.mark.parametrize("preset", REAL)
def test_real_preset_runs_one_step_at_tiny_size(tmp_path, preset):
    cfg = load_config(ROOT / "configs" / preset)
    family = preset.split("/")[0]
    bundle = tiny_bundle(family)
    before = {k: v.clone() for k, v in bundle.denoiser.backbone.state_dict().items()}
    extra = []
    if cfg.data.real_latents is None and "real_latents" in (ROOT / "configs" / preset).read_text():
        # the preset trains on real latents: one random latent per prompt of its prompt file
        from safetensors.torch import save_file

        from fewstep.training.data import read_prompts

        n = len(read_prompts(ROOT / cfg.data.prompts))
        save_file({"latents": torch.randn(n, *bundle.latent_shape)}, str(tmp_path / "latents.safetensors"))
        extra.append(f"data.real_latents={tmp_path / 'latents.safetensors'}")
    batch = 4 if cfg.objective.name in IN_PLACE else 2  # twinflow splits each batch into 4 parts
    cfg = cfg_for(
        tmp_path,
        "steps=1",
        f"data.batch_size={batch}",
        "checkpoint.every=0",
        "log.sample_count=2",
        "precision.mixed_precision=no",
        "lora.rank=4",
        *extra,
        preset=preset,
    )
    res = run(cfg, teacher=bundle)
    assert res.steps == 1 and res.skipped == 0
    card = json.loads((res.run_dir / "run_card.json").read_text())
    assert card["objective"] == cfg.objective.name and card["sampling"]["times"][-1] == 0.0
    assert (res.run_dir / "final" / "student" / "diffusion_pytorch_model.safetensors").is_file()
    if cfg.lora.student:
        assert (res.run_dir / "final" / "student_lora.safetensors").is_file()
    after = bundle.denoiser.backbone.state_dict()
    if cfg.objective.name in IN_PLACE:  # the teacher's own network was trained; the saved one has its keys
        from safetensors.torch import load_file

        saved = load_file(str(res.run_dir / "final" / "student" / "diffusion_pytorch_model.safetensors"))
        assert saved.keys() == before.keys() and any(not torch.equal(before[k], saved[k].to(before[k])) for k in before)
    else:
        assert all(torch.equal(before[k], after[k]) for k in before)  # the frozen teacher is untouched
