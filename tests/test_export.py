"""`fewstep export`: every objective's student, exported from a run dir as a stock diffusers
pipeline folder, loaded in a separate Python process that never imports fewstep
(tests/export_check/run_pipeline.py), samples within 1e-4 of fewstep's own sampler on the same
noise at every step count the export card lists; LoRA students also load as an adapter on the
teacher; schedules no stock scheduler reproduces are refused with the reason; writing is atomic and
never replaces a non-empty folder unless asked.

Students are built by each objective's own builder around tiny teachers of every family (tests/
tiny.py pipelines saved with save_pretrained), their weights perturbed as training would, and
saved by the training entry point's own final-weights writer; one test trains for real."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch

from fewstep.conditioning import FluxConditioner
from fewstep.config import LoraConfig
from fewstep.evaluation.sources import load_source
from fewstep.export import CARD_NAME, ExportError, export_student, plan_scheduler
from fewstep.objectives.registry import BuildContext, build_objective, make_params
from fewstep.pipeline_teacher import load_teacher
from fewstep.samplers import initial_noise, sample
from fewstep.training.lora import make_factories
from tests.tiny import _WORDS, make_tiny, make_tiny_pipeline, tiny_vae

diffusers.utils.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "export_check" / "run_pipeline.py"
PROMPTS = ["a photo of a cat", "two red dogs"]
LABELS = [3, 7]
SIZE = 64  # pixels of the tiny text pipelines (8 x 8 latents)
GEN_SEED, NOISE_SEED = 11, 5  # fresh noise between steps; initial noise
HYBRID_W = 3.0  # the teacher's CFG scale in hybrid sampling

DMD4 = {"num_steps": 4, "student_times": [1.0, 0.75, 0.5, 0.25]}
# (case, teacher, objective, objective params, LoRA student, the step counts the export supports)
CASES = [
    ("dit-dsm", "dit", "dsm", {"sampling_steps": 4}, False, {4}),
    ("dit-dmd2-4", "dit", "dmd2", DMD4, False, {4}),
    ("dit-dmd2-1", "dit", "dmd2", {"num_steps": 1}, False, {1}),
    ("dit-dmd-1", "dit", "dmd", {"num_steps": 1}, False, {1}),
    ("dit-ddmd-4", "dit", "decoupled_dmd", DMD4, False, {4}),
    ("dit-lcm-4", "dit", "lcm", {"num_steps": 4}, False, {1, 2, 4}),
    ("dit-tdm-4", "dit", "tdm", {"num_steps": 4}, False, {1, 2, 4}),
    ("ditflow-dmd2-4", "dit_flow", "dmd2", DMD4, False, {4}),
    ("ditflow-scm-2", "dit_flow", "scm", {"num_steps": 2, "sigma_data": 1.0, "intermediate_angle": 1.1}, False, {2}),
    ("ditflow-tbcm-2", "dit_flow", "tbcm", {"num_steps": 2, "sigma_data": 1.0}, False, {2}),
    ("sd15-dmd2-1", "sd15", "dmd2", {"num_steps": 1}, False, {1}),
    ("sd15-lcm-w", "sd15", "lcm", {"num_steps": 4, "add_guidance_embedding": 8}, False, {1, 2, 4}),
    ("sd15v-dmd2-4", "sd15v", "dmd2", DMD4, False, {4}),
    ("sd15v-tdm-4", "sd15v", "tdm", {"num_steps": 4}, False, {1, 2, 4}),
    ("sdxl-dmd2-4-lora", "sdxl", "dmd2", DMD4, True, {4}),
    ("pixart-tdm-4", "pixart", "tdm", {"num_steps": 4}, False, {1, 2, 4}),
    ("pixart-dmd2-4", "pixart", "dmd2", DMD4, False, {4}),
    ("sd3-scm-2", "sd3", "scm", {"num_steps": 2}, False, {2}),
    ("sd3-tdm-4", "sd3", "tdm", {"num_steps": 4}, False, {1, 2, 4}),
    ("flux-dmd2-4", "flux", "dmd2", DMD4, False, {4}),
    # one TwinFlow network samples at any step count: SD3's pipeline takes the sigmas, so one folder
    # runs 1, 2 and 4 steps; DiTPipeline cannot, so its scheduler serves the default step count's grid
    ("sd3-twinflow", "sd3", "twinflow", {"num_steps": 1}, False, {1, 2, 4}),
    ("ditflow-twinflow-4", "dit_flow", "twinflow", {"num_steps": 4}, False, {2, 4}),
    ("ditflow-twinflow-1", "dit_flow", "twinflow", {"num_steps": 1}, False, {1}),
    ("dit-boot", "dit", "boot", {"input_time": 0.5}, False, {1}),
    ("ditflow-boot", "dit_flow", "boot", {}, False, {1}),
    ("sd15-boot", "sd15", "boot", {}, False, {1}),
]
DATA_FREE = {"boot"}  # objectives that refuse a run with real data
# schedules no stock scheduler reproduces in that pipeline class, and the reason the refusal names
REFUSED = [
    ("dit-scm-vp", "dit", "scm", {"num_steps": 2, "sigma_data": 1.0, "intermediate_angle": 1.1}, "between integer"),
    ("dit-tbcm-vp", "dit", "tbcm", {"num_steps": 2, "sigma_data": 1.0}, "between integer"),
    ("ditflow-tdm-4", "dit_flow", "tdm", {"num_steps": 4}, "passes no custom sigmas"),
    ("ditflow-lcm-4", "dit_flow", "lcm", {"num_steps": 4}, "off by"),
]


# embedded teachers by name, as the presets record them: (name, objective, params, supported steps, scheduler)
EMBEDDED = [
    ("digits-vp", "dmd2", DMD4, {4}, "LCMScheduler"),
    ("digits-flow", "dmd2", DMD4, {4}, "FlowMatchEulerDiscreteScheduler"),
    ("digits-vp", "dmd2", {"num_steps": 1}, {1}, "LCMScheduler"),
    ("digits-vp", "decoupled_dmd", DMD4, {4}, "LCMScheduler"),
    ("digits-vp", "lcm", {"num_steps": 4}, {1, 2, 4}, "LCMScheduler"),
    ("digits-vp", "tdm", {"num_steps": 2}, {1, 2, 4}, "DDIMScheduler"),
    ("digits-vp", "dsm", {"sampling_steps": 4}, {4}, "DDIMScheduler"),
    (
        "digits-flow",
        "scm",
        {"num_steps": 2, "sigma_data": 1.0, "intermediate_angle": 1.1},
        {2},
        "FlowMatchEulerDiscreteScheduler",
    ),
]


# ---- building teachers and run dirs -------------------------------------------------------------
def _teacher_folder(root: Path, kind: str) -> str:
    d = root / kind
    if kind == "dit_flow":  # a flow DiT, as the embedded digits-flow teacher
        tiny = make_tiny("dit")
        pipe = diffusers.DiTPipeline(
            transformer=tiny.backbone,
            vae=tiny_vae(),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
            id2label={i: w for i, w in enumerate(_WORDS[12:22])},
        )
    elif kind == "sd15v":  # a v-prediction teacher (as SD 2.x)
        pipe = make_tiny_pipeline("sd15", prediction="v_prediction")
    else:
        pipe = make_tiny_pipeline(kind)
    pipe.save_pretrained(d)
    return str(d)


def _perturb(backbone: torch.nn.Module, seed: int) -> None:
    """Move the trainable weights as training would (LoRA: its adapters, lora_B away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.02 if "lora_" in n else 0.01))


def make_run(
    root: Path,
    name: str,
    teacher_folder: str,
    objective: str,
    params: dict,
    lora: bool = False,
    seed: int = 0,
    source: str | None = None,
) -> Path:
    """A run dir as the training entry point writes it: the objective's own student (built by its
    registry builder), perturbed, saved by the entry point's final-weights writer, and a run card."""
    from fewstep.training.outputs import save_final

    t = load_teacher(teacher_folder)
    lcfg = LoraConfig(student=lora, rank=4, alpha=8.0)
    make_student, make_copy = make_factories(lcfg, family=t.family)
    text = t.family not in ("dit", "unet")
    ctx = BuildContext(
        latent_shape=t.latent_shape,
        num_classes=None if text else 10,
        text=text,
        has_real_data=objective not in DATA_FREE,
        family=t.family,
        lora=lcfg,
        make_student=make_student,
        make_copy=make_copy,
        null_class=None if text else 10,
    )
    p = make_params(objective, params)
    obj = build_objective(objective, p, t.denoiser, ctx)
    student = obj.nets["student"]
    _perturb(student.backbone, seed)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    files = save_final(run_dir, student, None, SimpleNamespace(is_main_process=True))
    card = {
        "name": name,
        "objective": objective,
        "objective_params": json.loads(json.dumps(dataclasses.asdict(p), default=str)),
        "teacher": {"source": source or teacher_folder, "family": t.family, "latent_shape": list(t.latent_shape)},
        "sampling": obj.sampling,
        "steps": 1,
        "files": files,
        "lora": {"student": True, "fake": False, "rank": 4, "alpha": 8.0} if lora else None,
    }
    (run_dir / "run_card.json").write_text(json.dumps(card, indent=1, default=str))
    return run_dir


def _noise(shape) -> torch.Tensor:
    return initial_noise(shape, torch.Generator().manual_seed(NOISE_SEED))


def fewstep_sample(run_dir: Path, card: dict, steps: int, monkeypatch=None) -> torch.Tensor:
    """fewstep's own sampler on the run dir's student (the evaluation command's loader), with the
    noise the pipeline gets: the same initial noise, and fresh noise from a generator seeded as the
    pipeline's source of fresh noise (its generator, or torch's global RNG)."""
    src = load_source(str(run_dir))
    times = card["supported_steps"][str(steps)]["times"]
    w, embedded = src.cfg_and_embedded(None)
    if card["conditioning"] == "labels":
        cond = src.conds(torch.tensor(LABELS), None, "cpu", embedded)
    else:
        cond = src.conds(None, PROMPTS, "cpu", embedded)
    noise = _noise((2, 4, 8, 8))
    gen = torch.Generator().manual_seed(GEN_SEED)
    if card["pipeline_class"] == "FluxPipeline" and monkeypatch is not None:
        # FluxPipeline's scheduler draws its fresh noise in the packed layout: draw it the same way
        import fewstep.samplers as samplers

        def packed(shape, generator=None, device=None):
            z = torch.randn(FluxConditioner.pack(torch.zeros(shape)).shape, generator=generator)
            return FluxConditioner.unpack(z, shape[2], shape[3])

        monkeypatch.setattr(samplers, "initial_noise", packed)
    return sample(src.denoiser, noise, cond, times, guidance=w, renoise=card["sampling"]["renoise"], generator=gen)


def pipeline_jobs(case: str, folder: Path, card: dict, work: Path, lora_base: str | None = None) -> list[dict]:
    """One job per supported step count for the separate process."""
    from safetensors.torch import save_file

    jobs = []
    noise = _noise((2, 4, 8, 8))
    lat_file = work / f"{case}-noise.safetensors"
    latents = FluxConditioner.pack(noise) if card["pipeline_class"] == "FluxPipeline" else noise
    save_file({"latents": latents.contiguous()}, str(lat_file))
    for n, s in card["supported_steps"].items():
        job = {
            "folder": str(folder),
            "out": str(work / f"{case}-{n}.safetensors"),
            "steps": int(n),
            "guidance_scale": card["guidance_scale"],
            "call_kwargs": s["call_kwargs"],
            "generator_seed": GEN_SEED if card["conditioning"] == "text" else NOISE_SEED,
            "global_seed": GEN_SEED,
            "patch": bool(card["requires_patch"]),
            "height": SIZE,
            "width": SIZE,
            "extra": {"use_resolution_binning": False} if card["pipeline_class"] == "PixArtAlphaPipeline" else {},
        }
        job.update(
            {"labels": LABELS} if card["conditioning"] == "labels" else {"prompts": PROMPTS, "latents": str(lat_file)}
        )
        jobs.append(job)
        if lora_base is not None:
            jobs.append(
                {
                    **job,
                    "out": str(work / f"{case}-{n}-lora.safetensors"),
                    "lora": {"base": lora_base, "adapter": str(folder / "lora")},
                }
            )
    return jobs


def run_in_fresh_process(jobs: list[dict], work: Path) -> dict:
    spec = work / "jobs.json"
    spec.write_text(json.dumps(jobs))
    res = subprocess.run(
        [sys.executable, str(CHECK), str(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def pipeline_latents(file: str, card: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    lat = load_file(file)["latents"]
    if card["pipeline_class"] == "FluxPipeline":
        lat = FluxConditioner.unpack(lat, 8, 8)
    return lat


# ---- everything exported up front; every pipeline runs in one fresh process ------------------------
def _digits_weights(root: Path, mp: pytest.MonkeyPatch) -> str:
    """The shipped digits teacher folders when this checkout has them; otherwise stand-ins laid out
    as train/train_teacher.py writes them (a tiny DiT with its VP DDIM or flow Euler scheduler), put where
    the embedded names resolve."""
    import fewstep.digits.data as data
    import fewstep.digits.embedded_teachers as dteacher

    if all((dteacher.teacher_dir(k) / "model_index.json").is_file() for k in ("vp", "flow")):
        return "shipped"
    for kind, sched in (
        (
            "vp",
            diffusers.DDIMScheduler(
                timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon"
            ),
        ),
        ("flow", diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)),
    ):
        tiny = make_tiny("dit", seed=3)
        diffusers.DiTPipeline(transformer=tiny.backbone, vae=tiny_vae(), scheduler=sched).save_pretrained(
            root / f"teacher_{kind}"
        )
    mp.setattr(data, "WEIGHTS_DIR", root)
    mp.setattr(dteacher, "WEIGHTS_DIR", root)
    return "stand-in"


def _trained_run(root: Path, teacher: str, preset: str, name: str, *extra: str) -> Path:
    """A real two-step run of a preset on a tiny teacher folder, with a checkpoint after step 1."""
    from fewstep.config import load_config
    from fewstep.training import run

    cfg = load_config(
        ROOT / "configs" / preset,
        [
            f"teacher.source={teacher}",
            f"output_dir={root / name}",
            "steps=2",
            "data.batch_size=2",
            "checkpoint.every=1",
            "log.sample_count=2",
            "log.trackers=[]",
            "log.progress=false",
            "objective.fake_updates_per_generator=1",
            *(extra or ("ema.rate=0",)),
        ],
    )
    return run(cfg).run_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import fewstep.digits.embedded_teachers as dteacher

    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        weights = _digits_weights(root / "weights", mp)
        teachers = {k: _teacher_folder(root / "teachers", k) for k in {c[1] for c in CASES + REFUSED}}
        out, jobs = {}, []
        for i, (case, kind, objective, params, lora, _) in enumerate(CASES):
            run_dir = make_run(root / "runs", case, teachers[kind], objective, params, lora=lora, seed=i)
            res = export_student(run_dir, root / "exports" / case, link_components=kind == "pixart")
            card = json.loads((res.out / CARD_NAME).read_text())
            out[case] = (run_dir, res, card)
            jobs += pipeline_jobs(case, res.out, card, root, lora_base=teachers[kind] if lora else None)
        # the model card's diffusers-only hybrid recipe (SDXL: one teacher DDIM step with CFG, then the student)
        case = "sdxl-dmd2-4-lora"
        _, res, card = out[case]
        job = pipeline_jobs(case, res.out, card, root)[0]
        jobs.append(
            {
                **job,
                "out": str(root / f"{case}-hybrid.safetensors"),
                "hybrid": {
                    "teacher": teachers["sdxl"],
                    "teacher_steps": 1,
                    "guidance": HYBRID_W,
                    "timesteps": card["supported_steps"]["4"]["timesteps"][1:],
                },
            }
        )
        # the embedded teachers by name (all cases with the shipped weights; two with the stand-ins)
        embedded = []
        for i, (name, objective, params, supported, cls) in enumerate(
            EMBEDDED if weights == "shipped" else EMBEDDED[:2]
        ):
            case = f"{name}-{objective}-{i}"
            run_dir = make_run(
                root / "runs",
                case,
                str(dteacher.teacher_dir(name.split("-")[1])),
                objective,
                params,
                seed=i,
                source=name,
            )
            res = export_student(run_dir, root / "exports" / case)
            embedded.append((case, run_dir, res, supported, cls))
            jobs += pipeline_jobs(case, res.out, res.card, root)
        # real training runs, exported from their run dir and from their first checkpoint: DMD2 on the
        # DiT, and the SDXL LoRA preset (a LoRA checkpoint holds adapters only: merged at export)
        trained = {}
        for key, preset, kind, extra in (
            (
                "full",
                "digits/dmd2_4step_vp.yaml",
                "dit",
                # no warm-up: its first update has learning rate 0, and the student must move
                ("ema.rate=0.5", "objective.gan=false", "data.real_data=false", "optim.default.warmup_steps=0"),
            ),
            (
                "lora",
                "sdxl/dmd2_4step_lora.yaml",
                "sdxl",
                (
                    "teacher.dtype=float32",
                    "teacher.resolution=64",
                    "lora.rank=4",
                    "precision.mixed_precision=no",
                    "precision.gradient_checkpointing=false",
                ),
            ),
        ):
            run_dir = _trained_run(root, teachers[kind], preset, f"trained-{key}", *extra)
            ck = run_dir / "checkpoints" / "step_0000001"
            pair = (
                export_student(run_dir, root / "exports" / f"trained-{key}"),
                export_student(ck, root / "exports" / f"trained-{key}-ckpt"),
            )
            base = teachers[kind] if key == "lora" else None
            jobs += pipeline_jobs(f"trained-{key}", pair[0].out, pair[0].card, root, lora_base=base)
            jobs += pipeline_jobs(f"trained-{key}-ckpt", pair[1].out, pair[1].card, root, lora_base=base)
            trained[key] = (run_dir, ck, *pair)
        status = run_in_fresh_process(jobs, root)
        yield {
            "root": root,
            "teachers": teachers,
            "cases": out,
            "status": status,
            "weights": weights,
            "embedded": embedded,
            "trained": trained,
        }


def test_the_pipelines_ran_without_fewstep(exported):
    st = exported["status"]
    assert st["fewstep_imported"] is False
    assert st["jobs"] >= len(CASES)


@pytest.mark.parametrize("case,supported", [(c[0], c[5]) for c in CASES], ids=[c[0] for c in CASES])
def test_exported_pipeline_matches_fewstep_sampler(exported, case, supported, monkeypatch):
    run_dir, res, card = exported["cases"][case]
    root = exported["root"]
    assert str(card["trained_steps"]) in card["supported_steps"]
    assert {int(n) for n in card["supported_steps"]} == supported, card["scheduler"]
    for n in card["supported_steps"]:
        ref = fewstep_sample(run_dir, card, int(n), monkeypatch)
        got = pipeline_latents(str(root / f"{case}-{n}.safetensors"), card)
        scale = max(1.0, ref.abs().max().item())
        assert ref.abs().max() > 0.1 and torch.isfinite(got).all()
        err = (got - ref).abs().max().item()
        assert err < 1e-4 * scale, f"{case} at {n} steps: max |pipeline - fewstep| = {err:.3g} (scale {scale:.3g})"
        if card["lora_adapter"] and card["lora_adapter"]["written"]:
            via_adapter = pipeline_latents(str(root / f"{case}-{n}-lora.safetensors"), card)
            err = (via_adapter - ref).abs().max().item()
            assert err < 1e-4 * scale, f"{case}: teacher + LoRA adapter differs from fewstep by {err:.3g}"
        monkeypatch.undo()


def test_export_card_and_readme(exported):
    run_dir, res, card = exported["cases"]["dit-dmd2-4"]
    assert card["pipeline_class"] == "DiTPipeline" and card["scheduler"]["class"] == "LCMScheduler"
    assert card["supported_steps"]["4"]["timesteps"] == [999, 749, 499, 249]
    assert card["guidance_scale"] == 1.0 and card["teacher"]["source"] == exported["teachers"]["dit"]
    # the boundary scalings are configured away for a student that predicts x0 directly, and quantified
    b = card["scheduler"]["boundary_scalings"]
    assert b["max_c_skip"] < 1e-12 and b["steps"][-1]["c_skip_at_default_10"] > 1e-8
    cfg = json.loads((res.out / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "LCMScheduler" and cfg["original_inference_steps"] == 4
    index = json.loads((res.out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"] and index["_class_name"] == "DiTPipeline"
    readme = (res.out / "README.md").read_text()
    for needle in (
        "DMD2",
        "num_inference_steps=4",
        "guidance_scale=1",
        "torch.manual_seed",
        "--hybrid",
        exported["teachers"]["dit"],
    ):
        assert needle in readme, needle
    # the student's weights, not the teacher's, are in the folder
    from safetensors.torch import load_file

    mine = load_file(str(res.out / "transformer" / "diffusion_pytorch_model.safetensors"))
    teacher = load_file(str(Path(exported["teachers"]["dit"]) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(mine) == set(teacher) and any(not torch.equal(mine[k], teacher[k]) for k in mine)
    # TDM: DDIM over a 900-step grid reaches [899, 674, 449, 224] with the teacher's full noise table
    tdm = exported["cases"]["dit-tdm-4"][2]
    assert tdm["scheduler"]["class"] == "DDIMScheduler"
    assert tdm["supported_steps"]["4"]["timesteps"] == [899, 674, 449, 224]
    # a flow DiT needs the documented one-line fix; text pipelines need none
    assert "scale_model_input" in exported["cases"]["ditflow-dmd2-4"][2]["requires_patch"]
    assert "scale_model_input = lambda" in (exported["cases"]["ditflow-dmd2-4"][1].out / "README.md").read_text()
    assert exported["cases"]["flux-dmd2-4"][2]["requires_patch"] is None
    # LoRA: adapter written for SDXL, with rank and the folded scale
    lora = exported["cases"]["sdxl-dmd2-4-lora"][2]["lora_adapter"]
    assert lora["written"] and lora["rank"] == 4 and lora["scale_folded_into_lora_B"] == 2.0
    # the LCM student with a guidance embedding is sampled with its embedded scale, not CFG
    assert exported["cases"]["sd15-lcm-w"][2]["guidance_scale"] == 8.5


def test_teacher_components_are_copied_or_linked(exported):
    """The VAE and text encoders are the teacher's files: copies, or hard links on request."""
    import filecmp
    import os

    for case, linked in (("sd15-dmd2-1", False), ("pixart-tdm-4", True)):
        _, res, card = exported["cases"][case]
        teacher = Path(card["teacher"]["folder"])
        for comp in ("vae", "text_encoder"):
            for f in (teacher / comp).iterdir():
                mine = res.out / comp / f.name
                assert filecmp.cmp(f, mine, shallow=False)
                assert (os.stat(f).st_ino == os.stat(mine).st_ino) == linked, (case, f)


def test_hybrid_recipe_of_the_model_card(exported):
    """The README's diffusers-only hybrid sampling equals fewstep's `sample_hybrid` (the teacher
    with CFG for the first step, the student for the rest, fresh noise from the same generator)."""
    from fewstep.samplers import sample_hybrid

    case = "sdxl-dmd2-4-lora"
    run_dir, res, card = exported["cases"][case]
    readme = (res.out / "README.md").read_text()
    assert "callback_on_step_end=stop_after_first" in readme and "timesteps=[749, 499, 249]" in readme
    src = load_source(str(run_dir))
    teacher = load_teacher(exported["teachers"]["sdxl"])
    cond = src.conds(None, PROMPTS, "cpu")
    times = card["sampling"]["times"]
    ref = sample_hybrid(
        teacher.denoiser,
        src.denoiser,
        _noise((2, 4, 8, 8)),
        cond,
        times[:2],
        times[1:],
        guidance=HYBRID_W,
        generator=torch.Generator().manual_seed(GEN_SEED),
    )
    got = pipeline_latents(str(exported["root"] / f"{case}-hybrid.safetensors"), card)
    assert (got - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    # and it is not simply the student's own sampler
    own = fewstep_sample(run_dir, card, 4)
    assert (own - ref).abs().max() > 1e-2


def test_evaluation_reads_the_export_card(exported):
    """`fewstep eval --pipeline <export>` treats the folder as a student with the card's times and
    finds its teacher for --hybrid."""
    _, res, card = exported["cases"]["dit-lcm-4"]
    src = load_source(str(res.out))
    assert src.kind == "student" and src.schedule(2)[0] == card["supported_steps"]["2"]["times"]
    assert src.hybrid_teacher().kind == "teacher"


@pytest.mark.parametrize("case,kind,objective,params,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_unrepresentable_schedules_are_refused(exported, tmp_path, case, kind, objective, params, reason):
    run_dir = make_run(tmp_path, case, exported["teachers"][kind], objective, params)
    with pytest.raises(ExportError, match=reason):
        export_student(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


@pytest.mark.parametrize("pipeline_class", ["DiTPipeline", "StableDiffusionPipeline"])
def test_a_refusal_names_schedules_that_export(pipeline_class):
    """sCM at angle 1.1 on a VP teacher lands between DDPM indices; the refusal lists the nearest
    schedules the pipeline class reproduces (DiTPipeline: only LCMScheduler's own grids; SD: the
    neighbouring integer indices, passed as timesteps), and the first of them does export."""
    import re

    from fewstep.objectives import _trigflow as tf
    from fewstep.paths import VPPath

    cfg = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
    }
    path = VPPath.from_config(cfg)
    params = {"sigma_data": 1.0}
    times = tf.times_from_angles([tf.HALF_PI, 1.1, 0.0], path)
    with pytest.raises(ExportError, match="between integer timesteps") as e:
        plan_scheduler(pipeline_class, cfg, {"times": times, "renoise": "fresh"}, "scm", params)
    angles = json.loads(re.search(r"sampling_angles=(\[[^]]*\])", str(e.value)).group(1))
    plan = plan_scheduler(
        pipeline_class, cfg, {"times": tf.times_from_angles(angles + [0.0], path), "renoise": "fresh"}, "scm", params
    )
    want = [999, 499] if pipeline_class == "DiTPipeline" else [999, 392]
    assert plan.supported[2]["timesteps"] == want


def test_output_folder_rules(exported, tmp_path, capsys):
    from fewstep.cli import main

    run_dir = exported["cases"]["dit-dmd2-1"][0]
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert "num_inference_steps 1" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / CARD_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # renamed into place, nothing left over
    # never over the run, its parent or the teacher
    for bad in (run_dir, run_dir.parent, Path(exported["teachers"]["dit"])):
        with pytest.raises(ExportError, match="an input of this export"):
            export_student(run_dir, bad, overwrite=True)


def test_bad_inputs_give_clear_errors(exported, tmp_path):
    with pytest.raises(ExportError, match="no run_card.json"):
        export_student(tmp_path, tmp_path / "o1")
    run_dir = exported["cases"]["dit-dmd2-1"][0]
    with pytest.raises(ExportError, match="no student_ema weights"):
        export_student(run_dir, tmp_path / "o2", weights="student_ema")
    # another family's teacher; weights that do not fit the backbone their config describes
    with pytest.raises(ExportError, match="the student is a DiTTransformer2DModel"):
        export_student(run_dir, tmp_path / "o3", teacher=exported["teachers"]["sd15"])
    import shutil

    bad = tmp_path / "bad_run"
    shutil.copytree(run_dir, bad)
    cfg_file = bad / "final" / "student" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["attention_head_dim"] = 4
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="do not fit a DiTTransformer2DModel"):
        export_student(bad, tmp_path / "o3")
    with pytest.raises(ExportError, match="lora='required'"):
        export_student(run_dir, tmp_path / "o4", lora="required")
    # a pipeline class export does not handle
    unet = tmp_path / "unet"
    make_tiny_pipeline("unet").save_pretrained(unet)
    card = json.loads((run_dir / "run_card.json").read_text())
    with pytest.raises(ExportError, match="DDPMPipeline"):
        export_student(run_dir, tmp_path / "o5", teacher=str(unet))
    with pytest.raises(ExportError, match="end at t=0.5"):
        plan_scheduler("DiTPipeline", {"_class_name": "DDIMScheduler"}, {"times": [1.0, 0.5], "renoise": "fresh"})
    assert card["objective"] == "dmd2"


def test_metrics_beside_the_run_go_into_the_card(exported, tmp_path):
    run_dir = exported["cases"]["dit-dmd2-1"][0]
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(
        json.dumps(
            {
                "format": "fewstep-eval/1",
                "complete": True,
                "command": "fewstep eval --pipeline run",
                "protocol": {"name": "digits"},
                "rows": [
                    {
                        "steps": 1,
                        "guidance": 1.0,
                        "hybrid": None,
                        "sampler": "fewstep",
                        "num_samples": 100,
                        "metrics": {"fid": {"value": 12.5}, "class_acc": {"value": 0.91}},
                    }
                ],
            }
        )
    )
    res = export_student(run_dir, tmp_path / "out", eval_results=[ev / "results.json"])
    m = res.card["metrics"]
    assert len(m) == 1 and m[0]["rows"][0]["metrics"] == {"fid": 12.5, "class_acc": 0.91}
    assert "fid 12.5" in (res.out / "README.md").read_text()


def test_trained_runs_and_their_checkpoints_export(exported):
    """Real (two-step) runs: the run dir and its first checkpoint export. The run dir's pipeline
    reproduces fewstep's sampler on the run's student, the checkpoint's on the checkpoint's; a LoRA
    checkpoint (adapters only) is merged into the teacher's weights, and its adapter file, loaded by
    diffusers onto the teacher, samples the same as the merged weights."""
    root = exported["root"]
    for key, (run_dir, ck, from_run, from_ckpt) in exported["trained"].items():
        assert from_run.card["supported_steps"].keys() == {"4"} == from_ckpt.card["supported_steps"].keys()
        assert from_run.card["weights"]["sha256"] != from_ckpt.card["weights"]["sha256"]  # a training step apart
        assert from_ckpt.card["weights"]["checkpoint"] == str(ck)
        ref = fewstep_sample(run_dir, from_run.card, 4)
        got = pipeline_latents(str(root / f"trained-{key}-4.safetensors"), from_run.card)
        scale = max(1.0, ref.abs().max().item())
        assert (got - ref).abs().max() < 1e-4 * scale, key
        ck_fused = pipeline_latents(str(root / f"trained-{key}-ckpt-4.safetensors"), from_ckpt.card)
        assert (ck_fused - got).abs().max() > 1e-6  # a different student
        if key == "full":
            ref_ck = fewstep_sample(ck, from_ckpt.card, 4)
            assert (ck_fused - ref_ck).abs().max() < 1e-4 * max(1.0, ref_ck.abs().max().item())
            # the EMA weights the run kept, from the run dir and from the checkpoint
            for src, other in ((run_dir, from_run), (ck, from_ckpt)):
                ema = export_student(src, root / "exports" / f"ema-{src.name}", weights="student_ema")
                assert ema.card["weights"]["which"] == "student_ema"
                assert ema.card["weights"]["sha256"] != other.card["weights"]["sha256"]
        else:
            assert from_ckpt.card["lora_adapter"]["written"] and from_run.card["lora_adapter"]["written"]
            for tag, fused in (("", got), ("-ckpt", ck_fused)):
                via = pipeline_latents(str(root / f"trained-{key}{tag}-4-lora.safetensors"), from_run.card)
                assert (via - fused).abs().max() < 1e-4 * scale, f"LoRA adapter{tag} vs fused weights"


def test_embedded_default_teachers_export(exported, tmp_path):
    """Students of the embedded teachers, named as the presets name them ("digits-vp",
    "digits-flow"): the export finds the teacher's folder, and the exported DiTPipeline samples
    what fewstep samples at every supported step count."""
    import fewstep.digits.embedded_teachers as dteacher

    assert exported["embedded"], exported["weights"]
    for case, run_dir, res, supported, cls in exported["embedded"]:
        name = res.card["teacher"]["source"]
        assert name in ("digits-vp", "digits-flow")
        assert res.card["teacher"]["folder"] == str(dteacher.teacher_dir(name.split("-")[1]))
        assert res.plan.scheduler_class == cls and {int(n) for n in res.card["supported_steps"]} == supported
        assert (res.plan.needs_patch is not None) == (name == "digits-flow")
        for n in res.card["supported_steps"]:
            ref = fewstep_sample(run_dir, res.card, int(n))
            got = pipeline_latents(str(exported["root"] / f"{case}-{n}.safetensors"), res.card)
            err = (got - ref).abs().max().item()
            assert err < 1e-4 * max(1.0, ref.abs().max().item()), f"{exported['weights']} {case} at {n}: {err:.3g}"
    # the presets' sCM / TBCM angles fall between DDPM indices of the VP teacher: refused, with the reason
    run_dir = make_run(
        tmp_path,
        "vp-scm",
        str(dteacher.teacher_dir("vp")),
        "scm",
        {"num_steps": 2, "sigma_data": 1.0, "intermediate_angle": 1.1},
        source="digits-vp",
    )
    with pytest.raises(ExportError, match="between integer timesteps"):
        export_student(run_dir, tmp_path / "vp-scm-export")


def test_a_v_read_student_of_an_eps_teacher_exports_as_v_prediction():
    """A student trained to be read as v-prediction (the run card's sampling.prediction_type) gets
    a stock scheduler configured for v-prediction, checked against fewstep's sampler on that path;
    a flow teacher cannot change its prediction type and the refusal names the key."""
    cfg = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
    }
    sampling = {"times": [1.0, 0.5, 0.0], "renoise": "fresh", "prediction_type": "v_prediction"}
    plan = plan_scheduler("DiTPipeline", cfg, sampling, "scm", {"sigma_data": 1.0})
    assert plan.config["prediction_type"] == "v_prediction"
    assert plan.supported[2]["timesteps"] == [999, 499] and plan.supported[2]["max_rel_error"] < 1e-4
    plain = plan_scheduler(
        "DiTPipeline", cfg, {"times": [1.0, 0.5, 0.0], "renoise": "fresh"}, "scm", {"sigma_data": 1.0}
    )
    assert plain.config["prediction_type"] == "epsilon"
    flow_cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    with pytest.raises(ExportError, match="prediction_type"):
        plan_scheduler("StableDiffusion3Pipeline", flow_cfg, dict(sampling, times=[1.0, 0.0]), "scm", {})
