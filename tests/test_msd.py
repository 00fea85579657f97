"""MSD (multi-student distillation): the partition rules and their start-up errors, the students'
training on the exact Gaussian-mixture teacher (each moves toward its own subset's mixture), the
smaller students' stages, the entry point's per-student sub-runs with resume, routing, and the
export (one stock pipeline folder per student, loaded by diffusers alone) with its evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewstep.conditioning import Conditioner
from fewstep.config import ConfigError, config_from_dict, load_config
from fewstep.denoiser import Denoiser
from fewstep.msd.partition import hash_student, partition_labels, partition_prompts
from fewstep.msd.routing import ROUTE_KEY, RoutedDenoiser, routing_record, student_for
from fewstep.objectives.base import trainable_parameters
from fewstep.objectives.msd import MSDParams, build
from fewstep.objectives.registry import make_params
from fewstep.paths import VPPath
from fewstep.testing import gmm_denoiser
from fewstep.training import run
from fewstep.training.bundle import TeacherBundle
from fewstep.training.data import BatchSource
from tests.dist.bundles import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "export_check" / "run_pipeline.py"
QUIET = {"trackers": [], "progress": False, "sample_every": 0, "sample_count": 2, "every": 1}


def _cfg(out: Path, teacher: str = "digits-vp", steps: int = 2, **objective) -> dict:
    return {
        "name": "msd-test",
        "output_dir": str(out),
        "steps": steps,
        "teacher": {"source": teacher},
        "objective": {"name": "msd", "num_students": 2, "guidance": 2.0, "fake_updates_per_generator": 1, **objective},
        "data": {"batch_size": 4},
        "log": dict(QUIET),
        "checkpoint": {"every": 0},
        "optim": {"default": {"lr": 1e-3}},
    }


def _real(bundle, n: int = 40):
    import dataclasses

    lat, lab = torch.randn(n, *bundle.latent_shape), torch.arange(n) % 10
    return dataclasses.replace(bundle, real_data=lambda: (lat, lab))


# ---- partitions ---------------------------------------------------------------------------------
def test_partition_rules():
    assert partition_labels(10, 2).subsets == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    five = partition_labels(10, 5).subsets
    assert five == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    three = partition_labels(10, 3).subsets
    assert sorted(c for s in three for c in s) == list(range(10)) and {len(s) for s in three} <= {3, 4}
    prompts = [f"a photo of thing {i}" for i in range(40)]
    h = partition_prompts(prompts, 3, "hash")
    assert all(hash_student(prompts[i], 3) == k for k, s in enumerate(h.subsets) for i in s)
    assert h.student_of("a prompt never seen") == hash_student("a prompt never seen", 3)  # hash routes any prompt
    # k-means on embeddings: two well separated blobs end up with different students
    emb = torch.cat([torch.randn(20, 8) * 0.1 + 5, torch.randn(20, 8) * 0.1 - 5])
    km = partition_prompts(prompts, 2, "kmeans", embeddings=emb)
    assert sorted(map(sorted, km.subsets)) == [list(range(20)), list(range(20, 40))]


def test_mapping_file_routes_prompts_and_lines(tmp_path):
    prompts = ["a cat", "a dog", "a bird"]
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"0": ["a dog"], "1": [0, "a bird"]}))
    part = partition_prompts(prompts, 2, "mapping", str(f))
    assert part.subsets == [[1], [0, 2]] and part.student_of("a bird") == 1
    with pytest.raises(KeyError, match="not in the routing table"):
        part.student_of("a fish")


# ---- bad input: clear errors at start-up naming the key ---------------------------------------------
@pytest.mark.parametrize(
    "case, key",
    [
        ("too_many_students", "objective.num_students"),
        ("overlap", "objective.partition_file"),
        ("empty_student", "objective.partition"),
        ("unassigned", "objective.partition_file"),
        ("hash_on_labels", "objective.partition"),
        ("width", "objective.student_width"),
    ],
)
def test_bad_partitions_fail_at_start_naming_the_key(tmp_path, case, key):
    f = tmp_path / "split.json"
    obj: dict = {}
    if case == "too_many_students":
        obj = {"num_students": 11}
    elif case == "overlap":
        f.write_text(json.dumps({"0": [0, 1, 2, 3, 4, 5], "1": [5, 6, 7, 8, 9]}))
        obj = {"partition": "mapping", "partition_file": str(f)}
    elif case == "empty_student":
        f.write_text(json.dumps({"0": list(range(10)), "1": []}))
        obj = {"partition": "mapping", "partition_file": str(f)}
    elif case == "unassigned":
        f.write_text(json.dumps({"0": [0, 1], "1": [2, 3]}))
        obj = {"partition": "mapping", "partition_file": str(f)}
    elif case == "hash_on_labels":
        obj = {"partition": "hash"}
    elif case == "width":
        obj = {"student_width": 1.5}
    bundle = tiny_bundle("dit")
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        run(config_from_dict(_cfg(tmp_path / "run", **obj)), teacher=bundle)
    assert not (tmp_path / "run" / "student_0").exists()  # nothing trained before the error


def test_hash_partition_leaving_a_student_empty_is_refused(tmp_path):
    prompts = [p for p in (f"prompt {i}" for i in range(50)) if hash_student(p, 2) == 0][:3]  # all to student 0
    with pytest.raises(ConfigError, match=r"objective.partition='hash' leaves student\(s\) \[1\]"):
        partition_prompts(prompts, 2, "hash")
    with pytest.raises(ConfigError, match=r"objective\.num_students=4 is larger than the number of prompts"):
        partition_prompts(prompts, 4, "hash")


def test_student_index_and_conditions_are_the_entry_points(tmp_path):
    bundle = tiny_bundle("dit")
    with pytest.raises(ConfigError, match="objective.student_index"):
        run(config_from_dict(_cfg(tmp_path / "a", student_index=0, num_students=1)), teacher=bundle)
    d = _cfg(tmp_path / "b")
    d["data"]["conditions"] = [1, 2]
    with pytest.raises(ConfigError, match="data.conditions"):
        run(config_from_dict(d), teacher=bundle)


# ---- each student moves toward its own subset's mixture (exact Gaussian-mixture teacher) ---------------
class _Out:
    def __init__(self, sample):
        self.sample = sample


class _CondMLP(nn.Module):
    """A class-conditional 1-step generator x0 = f(noise, one_hot(label))."""

    def __init__(self, d: int, classes: int, width: int = 64):
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(
            nn.Linear(d + classes, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )

    def forward(self, x, timestep, class_labels=None):
        oh = nn.functional.one_hot(class_labels, self.classes).float()
        return _Out(self.net(torch.cat([x.flatten(1), oh], 1)).view_as(x))


class _CondResidualFake(nn.Module):
    """The fake score: the teacher's exact output plus a zero-initialised correction of (x, t, label)."""

    def __init__(self, base, d: int, classes: int, width: int = 64):
        super().__init__()
        self.base, self.classes = base, classes
        self.net = nn.Sequential(
            nn.Linear(d + 1 + classes, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, timestep, class_labels=None):
        t = self.base.t_of(timestep).float().view(-1, 1)
        oh = nn.functional.one_hot(class_labels, self.classes).float()
        corr = self.net(torch.cat([x.flatten(1), t, oh], 1)).view_as(x)
        return _Out(self.base(x, timestep, class_labels).sample + corr)


class _Labels(Conditioner):
    def call(self, backbone, x, timestep, cond):
        return backbone(x, timestep, class_labels=cond["class_labels"]).sample

    def null(self, cond, batch):
        return cond


def _sliced_w2(a, b, n_proj=64, seed=3) -> float:
    g = torch.Generator().manual_seed(seed)
    a, b = a.flatten(1), b.flatten(1)
    th = torch.randn(a.shape[1], n_proj, generator=g)
    th = th / th.norm(dim=0)
    pa, pb = (a @ th).sort(0).values, (b @ th).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def test_msd_students_learn_their_own_subsets_mixture():
    """Two students, classes {0, 1} and {2, 3} of a 4-class mixture: each one-step student, trained
    by the msd objective on batches restricted to its subset (BatchSource with data.conditions),
    moves toward the exact class-conditional mixture of its own subset. Breaks when the sign of
    the DM gradient flips (the students then move away)."""
    path = VPPath.from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "sample"}
    )
    means = torch.tensor([[2.0, 2.0], [-2.0, -1.0], [1.5, -2.0], [-1.0, 2.5]]).view(4, 2, 1, 1)
    teacher = gmm_denoiser(path, means, std=0.3, classes=torch.arange(4))
    bundle = TeacherBundle(denoiser=teacher, latent_shape=(2, 1, 1), num_classes=4)
    part = partition_labels(4, 2)
    exact_gen = torch.Generator().manual_seed(1)
    report = []
    for k, subset in enumerate(part.subsets):
        torch.manual_seed(10 + k)
        ctx = SimpleNamespace(
            latent_shape=(2, 1, 1),
            has_real_data=False,
            seed=k,
            device=None,
            num_classes=4,
            steps=300,
            make_student=lambda t: Denoiser(_CondMLP(2, 4), path, _Labels()),
            make_copy=lambda t: Denoiser(_CondResidualFake(t.backbone, 2, 4), path, _Labels()),
        )
        params = make_params(
            "msd", {"num_students": 2, "student_index": k, "guidance": 1.0, "fake_updates_per_generator": 2}
        )
        obj = build(params, teacher, ctx)
        opts = {
            "generator": torch.optim.Adam(trainable_parameters(obj, "generator"), lr=1e-3),
            "fake_score": torch.optim.Adam(trainable_parameters(obj, "fake_score"), lr=1e-2),
        }
        source = BatchSource(bundle, 256, seed=k, conditions=subset)
        labels = torch.tensor(subset).repeat_interleave(1000)
        exact = teacher.backbone.sample_data(len(labels), labels, generator=exact_gen)
        z = torch.randn(len(labels), 2, 1, 1, generator=torch.Generator().manual_seed(2))
        cond = {"class_labels": labels}

        def distance(obj=obj, z=z, cond=cond, exact=exact):
            with torch.no_grad():
                return _sliced_w2(obj.nets["student"](z, 1.0, cond), exact)

        before = distance()
        seen = set()
        for step in range(300):
            batch = source(step)
            seen |= set(batch["cond"]["class_labels"].tolist())
            for phase in obj.phases(step):
                loss, _ = obj.loss(phase, batch, step)
                loss.backward()
                opts[phase].step()
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
        after = distance()
        report.append(f"student {k} (classes {subset}): sliced W2 to its subset's mixture {before:.3f} -> {after:.3f}")
        assert seen == set(subset)  # trained on its own conditions only
        assert after < 0.6 * before, report[-1]
    print("\n".join(report))


# ---- smaller students -----------------------------------------------------------------------------
def test_smaller_student_config_and_stages():
    from fewstep.msd.small import smaller_config, smaller_student

    cfg = {"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 6, "caption_projection_dim": 128}
    small, _ = smaller_config(cfg, 0.5, 0.5)
    assert small["num_attention_heads"] == 2 and small["num_layers"] == 3 and small["caption_projection_dim"] == 64
    unet, _ = smaller_config({"block_out_channels": [64, 128], "norm_num_groups": 32, "layers_per_block": 2}, 0.5, 0.5)
    assert unet["block_out_channels"] == [32, 64] and unet["layers_per_block"] == 1
    t = tiny_bundle("dit").denoiser
    den, info = smaller_student(t, 0.5)
    assert info["parameter_ratio"] < 0.6
    x = torch.randn(2, 4, 8, 8)
    assert den(x, 0.5, {"class_labels": torch.tensor([1, 2])}).shape == x.shape
    p = MSDParams(student_width=0.5)
    assert p.stages(100) == (20, 60)  # pre-training, then DM, then DM + GAN
    assert MSDParams().stages(100) == (0, 0)  # same-size students: DMD2 (with its GAN) from the start


def test_smaller_student_pretraining_matches_the_teacher_then_distils(tmp_path):
    """Stage 1 trains only the generator group on the score-matching loss (which falls); stage 2 is
    DMD2 without the GAN term; stage 3 adds it."""
    bundle = _real(tiny_bundle("dit"))
    from fewstep.objectives.registry import BuildContext

    params = make_params(
        "msd",
        {
            "num_students": 1,
            "student_index": 0,
            "student_width": 0.5,
            "gan": True,
            "pretrain_steps": 30,
            "gan_start_step": 31,
            "fake_updates_per_generator": 1,
        },
    )
    ctx = BuildContext(latent_shape=bundle.latent_shape, num_classes=10, has_real_data=True, steps=40, family="dit")
    obj = build(params, bundle.denoiser, ctx)
    assert obj.nets["student"].backbone.config.num_attention_heads < bundle.denoiser.backbone.config.num_attention_heads
    opt = {g: torch.optim.Adam(trainable_parameters(obj, g), lr=3e-3) for g in obj.groups}
    source = BatchSource(bundle, 8, real_data=True)
    fake_before = [p.detach().clone() for p in obj.nets["fake"].parameters()]
    sm = []
    stages = []
    for step in range(33):
        stages.append((obj.stage(step), obj.phases(step)))
        for phase in obj.phases(step):
            loss, logs = obj.loss(phase, source(step), step)
            loss.backward()
            opt[phase].step()
            for o in opt.values():
                o.zero_grad(set_to_none=True)
            if step < 30:
                sm.append(logs["score_matching"])
            elif phase == "generator":
                assert ("gan_g" in logs) == (step >= 31)
        if step == 29:  # pre-training leaves the fake score alone
            assert all(torch.equal(a, b) for a, b in zip(fake_before, obj.nets["fake"].parameters()))
    assert stages[0] == ("pretrain", ["generator"]) and stages[30][0] == "dm" and stages[32][0] == "dm+gan"
    assert sum(sm[-5:]) / 5 < 0.7 * sum(sm[:5]) / 5, (sm[:5], sm[-5:])


# ---- routing -------------------------------------------------------------------------------------------
class _Const(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.path = VPPath.from_config({})

    def forward(self, x_t, t, cond=None, guidance=1.0, output="x0"):
        assert cond["class_labels"].shape[0] == x_t.shape[0]
        return torch.full_like(x_t, self.value) + cond["class_labels"].view(-1, 1, 1, 1) * 0


def test_routing_sends_each_label_to_its_student():
    part = partition_labels(10, 3)
    rec = routing_record(part, ["student_0", "student_1", "student_2"])
    route = torch.tensor([student_for(rec, c) for c in range(10)])
    assert route.tolist() == [k for k, s in enumerate(part.subsets) for _ in s]
    den = RoutedDenoiser([_Const(float(k)) for k in range(3)], route)
    labels = torch.tensor([9, 0, 4, 7, 3, 3])
    out = den(torch.zeros(6, 1, 2, 2), torch.full((6,), 0.5), {"class_labels": labels})
    assert out[:, 0, 0, 0].tolist() == [float(route[c]) for c in labels]
    with pytest.raises(ValueError, match="class label"):
        den(torch.zeros(1, 1, 2, 2), 0.5, {"class_labels": torch.tensor([10])})
    # text: per-sample student indices travel in the condition (the evaluation source puts them there)
    prompts = [f"p{i}" for i in range(12)]
    prec = routing_record(partition_prompts(prompts, 2, "hash"), ["a", "b"])
    who = torch.tensor([student_for(prec, p) for p in prompts])
    assert who.tolist() == [hash_student(p, 2) for p in prompts] and set(who.tolist()) == {0, 1}
    text = RoutedDenoiser([_Const(0.0), _Const(1.0)])
    out = text(torch.zeros(12, 1, 2, 2), 0.5, {"class_labels": torch.zeros(12, dtype=torch.long), ROUTE_KEY: who})
    assert out[:, 0, 0, 0].tolist() == who.float().tolist()


# ---- the entry point: one run dir, a sub-run per student, resume per student ------------------------------
def test_entry_point_trains_each_student_on_its_subset_and_resumes(tmp_path):
    bundle = _real(tiny_bundle("dit"))
    d = _cfg(tmp_path / "run", steps=2, gan=True)
    d["data"]["real_data"] = True
    d["checkpoint"] = {"every": 1}
    stopped = run(config_from_dict({**d, "stop_after": 1}), teacher=bundle)
    assert stopped.stopped_early and (tmp_path / "run" / "student_0" / "checkpoints").is_dir()
    assert not (tmp_path / "run" / "student_1").exists()
    res = run(config_from_dict({**d, "resume": "latest"}), teacher=bundle)
    assert not res.stopped_early and res.steps == 4
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    assert card["objective"] == "msd" and [s["conditions"] for s in card["msd"]["students"]] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
    ]
    for k, subset in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        sub = tmp_path / "run" / f"student_{k}"
        scfg = load_config(sub / "config.yaml")
        assert scfg.data.conditions == subset and scfg.objective.params["student_index"] == k
        assert (sub / "final" / "student" / "diffusion_pytorch_model.safetensors").is_file()
        # the student resumed from its step-1 checkpoint: its metrics hold steps 1 and 2 once each
        steps = [json.loads(ln)["step"] for ln in (sub / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
    with pytest.raises(ConfigError, match="finished MSD run"):
        run(config_from_dict({**d, "resume": "latest"}), teacher=bundle)
    other = {**d, "resume": "latest", "objective": {**d["objective"], "num_students": 5}}
    (tmp_path / "run" / "run_card.json").unlink()
    with pytest.raises(ConfigError, match="another partition"):
        run(config_from_dict(other), teacher=bundle)


# ---- export: one stock pipeline folder per student + routing; eval routes -------------------------------
@pytest.fixture(scope="module")
def msd_export(tmp_path_factory):
    import diffusers

    from fewstep.export import export_student
    from tests.tiny import make_tiny, tiny_vae

    root = tmp_path_factory.mktemp("msd")
    tiny = make_tiny("dit", seed=3)
    sched = diffusers.DDIMScheduler(
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon"
    )
    diffusers.DiTPipeline(transformer=tiny.backbone, vae=tiny_vae(), scheduler=sched).save_pretrained(root / "teacher")
    cfg = config_from_dict(
        _cfg(
            root / "run", teacher=str(root / "teacher"), steps=2, student_depth=0.5, student_width=0.5, pretrain_steps=1
        )
    )
    run(cfg)
    res = export_student(root / "run", root / "export")
    return root, res


def test_msd_export_loads_per_student_with_stock_diffusers(msd_export):
    from safetensors.torch import load_file

    from fewstep.pipelines import MultiStudentPipeline

    root, res = msd_export
    out = res.out
    rec = json.loads((out / "routing.json").read_text())
    assert (
        rec["students"] == ["student_0", "student_1"]
        and rec["routes"]["3"] == "student_0"
        and rec["routes"]["7"] == "student_1"
    )
    assert (
        "routing.json" in (out / "README.md").read_text()
        and "| `student_1` | 5, 6, 7, 8, 9 |" in (out / "README.md").read_text()
    )
    cfg = json.loads((out / "student_0" / "transformer" / "config.json").read_text())
    assert cfg["num_attention_heads"] == 1  # the smaller students are exported with their own config
    jobs = []
    for label, folder in ((3, "student_0"), (7, "student_1")):
        jobs.append(
            {
                "folder": str(out / folder),
                "out": str(root / f"{folder}.safetensors"),
                "steps": 1,
                "guidance_scale": rec["guidance_scale"],
                "call_kwargs": {},
                "labels": [label],
                "generator_seed": 5,
                "global_seed": 11,
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, str(CHECK), str(root / "jobs.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fewstep_imported"] is False
    stock = torch.cat([load_file(j["out"])["images"] for j in jobs])
    # the plain-Python router gives each label's image from its student's stock pipeline
    pipe = MultiStudentPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(11)
    routed = pipe(
        class_labels=[3, 7],
        num_inference_steps=1,
        generator=[torch.Generator().manual_seed(5) for _ in range(2)],
        output_type="pt",
    ).images
    assert torch.allclose(routed.float(), stock, atol=1e-5)
    assert pipe.pipelines[1].vae is pipe.pipelines[0].vae  # teacher components loaded once
    with pytest.raises(ValueError, match="supports"):
        pipe(class_labels=[3], num_inference_steps=3)


def test_eval_source_of_an_msd_export_routes_like_the_students(msd_export):
    from fewstep.evaluation.sources import load_source

    root, res = msd_export
    src = load_source(str(res.out))
    labels = torch.tensor([3, 7, 0, 9])
    imgs, _ = src.generate(1, seeds=range(4), labels=labels, progress=False)
    for k in (0, 1):
        one = load_source(str(res.out / f"student_{k}"))
        mine = [i for i, c in enumerate(labels.tolist()) if (c >= 5) == bool(k)]
        ref, _ = one.generate(1, seeds=mine, labels=labels[mine], progress=False)
        assert torch.allclose(imgs[mine], ref, atol=1e-5)
    assert src.describe()["msd"]["routing"]["num_students"] == 2
    # the run dir scores the same images as its export
    run_src = load_source(str(root / "run"))
    again, _ = run_src.generate(1, seeds=range(4), labels=labels, progress=False)
    assert torch.allclose(again, imgs, atol=1e-5)


# ---- the real-family preset at tiny size ----------------------------------------------------------------
def test_sd15_msd_preset_runs_each_student_at_tiny_size(tmp_path):
    """configs/sd15/msd_4students.yaml on a tiny SD1.5-class UNet: four students, one step each, each
    on its hash-partitioned prompts; k-means on the tiny encoder's embeddings also splits them."""
    from fewstep.msd.train import make_partition
    from fewstep.training.data import read_prompts

    preset = ROOT / "configs" / "sd15" / "msd_4students.yaml"
    cfg = load_config(
        preset,
        [
            f"output_dir={tmp_path / 'run'}",
            "steps=1",
            "data.batch_size=2",
            "checkpoint.every=0",
            "log.sample_count=2",
            "log.trackers=[]",
            "log.progress=false",
            "precision.mixed_precision=no",
        ],
    )
    bundle = tiny_bundle("sd15")
    before = {k: v.clone() for k, v in bundle.denoiser.backbone.state_dict().items()}
    res = run(cfg, teacher=bundle)
    assert res.steps == 4 and res.skipped == 0
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    prompts = read_prompts(ROOT / cfg.data.prompts)
    subsets = [s["conditions"] for s in card["msd"]["students"]]
    assert sorted(i for s in subsets for i in s) == list(range(len(prompts)))
    assert all(hash_student(prompts[i], 4) == k for k, s in enumerate(subsets) for i in s)
    for k in range(4):
        assert (
            tmp_path / "run" / f"student_{k}" / "final" / "student" / "diffusion_pytorch_model.safetensors"
        ).is_file()
    assert all(torch.equal(before[k], v) for k, v in bundle.denoiser.backbone.state_dict().items())
    cfg.objective.params["partition"] = "kmeans"
    km = make_partition(cfg, make_params("msd", cfg.objective.params), bundle)
    assert km.rule == "kmeans" and sorted(i for s in km.subsets for i in s) == list(range(len(prompts)))


def test_batches_hold_only_the_students_conditions():
    """data.conditions: class labels balanced over the subset (real latents of those classes with
    them), prompt lines of the subset only; a condition out of range names the key."""
    import dataclasses

    b = tiny_bundle("dit")
    lat, lab = torch.randn(40, *b.latent_shape), torch.arange(40) % 10
    b = dataclasses.replace(b, real_data=lambda: (lat, lab))
    src = BatchSource(b, 12, real_data=True, conditions=[2, 7, 9])
    for step in range(3):
        batch = src(step)
        labels = batch["cond"]["class_labels"]
        assert sorted(labels.tolist()) == [2] * 4 + [7] * 4 + [9] * 4
        for x, c in zip(batch["x0"], labels):  # each real latent is one of its label's
            assert any(torch.equal(x, lat[i]) for i in range(40) if lab[i] == c)
    assert src.grid_cond(4)["class_labels"].tolist() == [2, 7, 9, 2]
    t = tiny_bundle("sd15")
    prompts = [f"prompt number {i}" for i in range(6)]
    src = BatchSource(t, 8, prompts=prompts, conditions=[1, 4])
    key = next(k for k, v in src.text_cond.items() if torch.is_tensor(v) and v.ndim == 3)
    allowed = src.text_cond[key][[1, 4]]
    for step in range(3):
        for row in src(step)["cond"][key]:
            assert any(torch.equal(row, a) for a in allowed)
    with pytest.raises(ValueError, match=r"data\.conditions: \[6\] out of range"):
        BatchSource(t, 8, prompts=prompts, conditions=[1, 6])


def test_overwrite_keeps_the_old_msd_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch):
    """overwrite=true sets the old run aside: a new run that fails before any student's checkpoint
    puts it back byte for byte; one that finishes removes it."""
    import fewstep.msd.train as msd_train

    out = tmp_path / "run"
    out.mkdir()
    (out / "old.bin").write_bytes(b"the previous run")

    def fail(cfg, params, teacher, run_dir, accelerator, t0):
        (run_dir / "partial").mkdir(parents=True)
        raise RuntimeError("failed before any checkpoint")

    monkeypatch.setattr(msd_train, "_train_students", fail)
    d = {**_cfg(out), "overwrite": True}
    with pytest.raises(RuntimeError, match="before any checkpoint"):
        run(config_from_dict(d), teacher=tiny_bundle("dit"))
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert (out / "old.bin").read_bytes() == b"the previous run"
    assert not msd_train.aside_path(out).exists()

    monkeypatch.undo()
    run(config_from_dict({**d, "steps": 1}), teacher=tiny_bundle("dit"))
    assert not (out / "old.bin").exists() and (out / "run_card.json").is_file()
    assert not msd_train.aside_path(out).exists()
