"""`fewstep eval` end to end: the harness's FID is torch-fidelity's own number on the same
images, the maths agrees with closed forms, results carry their provenance, generation is
seeded, CLIP score and diversity are what they claim, and the command line works."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.evaluation import EvalSpec, Extractor, ReferenceFeatures, evaluate, fidelity_from_features
from fewstep.evaluation.inputs import TensorImages
from fewstep.evaluation.scores import diversity, mean_pairwise_distance, vendi_score


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _own_cache(_module_cache, monkeypatch):
    """One reference-feature cache for this module (not the user's ~/.cache)."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(_module_cache))


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory):
    """A tiny random DiTPipeline folder (DDIM trailing): a stand-in class-conditional teacher."""
    from tests.tiny import make_tiny_pipeline

    d = tmp_path_factory.mktemp("tinydit")
    make_tiny_pipeline("dit", seed=0).save_pretrained(d, safe_serialization=True)
    return d


def _digits_u8():
    from fewstep.digits.data import load_digits_tensors, to_uint8_rgb

    x, y = load_digits_tensors()
    return to_uint8_rgb(x), y


# ---- the harness equals torch-fidelity ---------------------------------------------------------
def test_generated_fid_kid_equal_torch_fidelity_on_the_saved_images(tiny_dit_dir, tmp_path):
    import torch_fidelity

    out = tmp_path / "out"
    res = evaluate(
        EvalSpec(
            pipeline=str(tiny_dit_dir),
            steps=[2],
            num_samples=40,
            batch_size=16,
            metrics=["fid", "kid", "prc"],
            save_images=True,
            out=str(out),
            progress=False,
        )
    )
    row = res["rows"][0]
    ref, _ = _digits_u8()
    direct = torch_fidelity.calculate_metrics(
        input1=str(out / "images" / "steps2"),
        input2=TensorImages(ref),
        fid=True,
        kid=True,
        prc=True,
        kid_subset_size=40,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        **res["torch_fidelity_kwargs"],
    )
    for ours, theirs in (
        (row["metrics"]["fid"]["value"], direct["frechet_inception_distance"]),
        (row["metrics"]["kid"]["value"], direct["kernel_inception_distance_mean"]),
        (row["metrics"]["precision"]["value"], direct["precision"]),
        (row["metrics"]["recall"]["value"], direct["recall"]),
    ):
        assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)
    assert len(list((out / "images" / "steps2").glob("*.png"))) == 40


def test_folder_scoring_equals_fidelity_metrics_and_torch_fidelity(tmp_path):
    import torch_fidelity
    from PIL import Image

    from fewstep.evaluation.scores import fidelity_metrics

    u8, _ = _digits_u8()
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    for i, im in enumerate(u8[:200:2]):  # every other one of the first 200 real digits
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(gen / f"{i:03d}.png")
    for i, im in enumerate(u8[1000:1300]):  # 300 others as the reference folder
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(ref / f"{i:03d}.png")
    res = evaluate(
        EvalSpec(images=str(gen), reference=str(ref), metrics=["fid"], out=str(tmp_path / "o"), progress=False)
    )
    ours = res["rows"][0]["metrics"]["fid"]["value"]
    theirs = fidelity_metrics(u8[:200:2], u8[1000:1300], fid=True)["fid"]
    direct = torch_fidelity.calculate_metrics(
        input1=str(gen),
        input2=str(ref),
        fid=True,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        **res["torch_fidelity_kwargs"],
    )
    assert res["reference"]["kind"] == "folder" and res["reference"]["count"] == 300
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    assert abs(ours - direct["frechet_inception_distance"]) <= 1e-6 * abs(ours)


# ---- maths against closed forms ----------------------------------------------------------------
def _exact_moments(n, mean, std, seed):
    """n x d samples whose empirical mean and (unbiased) covariance are exactly mean, diag(std^2)."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    z = z @ torch.linalg.inv(chol).T  # whitened: covariance exactly I
    return (z * std + mean).float()


def test_fid_on_gaussian_features_equals_the_closed_form():
    d = 8
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    s1, s2 = torch.full((d,), 1.0, dtype=torch.float64), torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    f1, f2 = _exact_moments(4000, mu1, s1, 0), _exact_moments(3000, mu2, s2, 1)
    ext = Extractor()  # the judge: only its layer names are used here
    ref = ReferenceFeatures({"kind": "test"}, features={"features": f2})
    got = fidelity_from_features({"features": f1}, ref, ext, fid=True)["fid"]
    # FID of N(mu1, S1), N(mu2, S2) with diagonal covariances
    closed = float(((mu1 - mu2) ** 2).sum() + (s1**2 + s2**2 - 2 * s1 * s2).sum())
    assert abs(got - closed) < 1e-4 * closed
    self_fid = fidelity_from_features({"features": f1}, ReferenceFeatures({}, features={"features": f1}), ext)["fid"]
    assert abs(self_fid) < 1e-6


def test_statistics_file_reference_gives_the_same_fid(tmp_path):
    u8, _ = _digits_u8()
    ext = Extractor().check()
    feats = ext.features(TensorImages(u8[:600]))["features"].double().numpy()
    np.savez(tmp_path / "digits_stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    g = ext.features(TensorImages(u8[1000:1300]))
    via_stats = fidelity_from_features(g, ReferenceFeatures.from_file(tmp_path / "digits_stats.npz", ext), ext)["fid"]
    via_feats = fidelity_from_features(
        g, ReferenceFeatures({}, features={"features": torch.from_numpy(feats).float()}), ext
    )["fid"]
    assert abs(via_stats - via_feats) < 1e-4 * via_feats


def test_diversity_and_vendi_known_values():
    e = torch.eye(4) * 3.0  # 4 orthogonal points, pairwise distance 3 sqrt(2)
    assert math.isclose(mean_pairwise_distance(e), 3 * math.sqrt(2), rel_tol=1e-9)
    assert math.isclose(vendi_score(e), 4.0, rel_tol=1e-9)
    same = torch.ones(5, 4)
    assert math.isclose(vendi_score(same), 1.0, rel_tol=1e-9) and mean_pairwise_distance(same) == 0.0
    # two groups: a collapsed one and a spread one; the result is their average
    feats = torch.cat([same[:4], e])
    d = diversity(feats, ["a"] * 4 + ["b"] * 4)
    assert math.isclose(d["vendi"], 2.5, rel_tol=1e-9) and d["diversity_groups"] == 2
    assert math.isclose(d["diversity"], 1.5 * math.sqrt(2), rel_tol=1e-9)


# ---- provenance, seeding, caching ----------------------------------------------------------------
def test_results_record_provenance_and_outputs(tiny_dit_dir, tmp_path):
    from fewstep.digits.judge import JUDGE_WEIGHTS, weights_sha256

    out = tmp_path / "o"
    evaluate(
        EvalSpec(
            pipeline=str(tiny_dit_dir),
            steps=[1, 3],
            num_samples=20,
            batch_size=8,
            guidance=1.0,
            out=str(out),
            progress=False,
        )
    )
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and res["backend"]["torch_fidelity"] == "0.4.0"
    assert [r["steps"] for r in res["rows"]] == [1, 3]
    assert res["rows"][1]["times"] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]
    sha = weights_sha256(JUDGE_WEIGHTS)
    for r in res["rows"]:
        for name in ("fid", "kid", "precision", "recall", "class_acc", "diversity", "vendi"):
            m = r["metrics"][name]
            assert m["weights_sha256"] == sha and m["n_generated"] == 20 and m["steps"] == r["steps"]
            assert m["guidance"] == 1.0 and m["seed"] == 0 and "backend" in m
        assert r["metrics"]["fid"]["n_reference"] == 1797 and r["samples_per_second"] > 0
        assert (out / f"grid_steps{r['steps']}.png").is_file()
    md = (out / "results.md").read_text()
    table = md.split("\n\n")[0].splitlines()
    assert len(table) == 4 and table[2].startswith(f"| {tiny_dit_dir} | 1 | 1 | 1.0 |") and "torch-fidelity 0.4.0" in md
    # the digits protocol's default metrics include the judge panel: every member, in results and table
    from fewstep.digits.panel import panel_members

    for r in res["rows"]:
        pan = r["metrics"]["panel"]
        assert [m["name"] for m in pan["members"]] == panel_members() and pan["n"] == 20
        assert pan["panel"]["fid_range"][0] <= pan["panel"]["fid_median"] <= pan["panel"]["fid_range"][1]
    assert "Judge panel" in md and "FID pixel-pca64" in md and "Real-vs-real floor at n = 20" in md


def test_generation_is_seeded_and_does_not_depend_on_the_batch(tiny_dit_dir):
    from fewstep.evaluation.sources import load_source

    src = load_source(str(tiny_dit_dir))
    labels = torch.arange(6) % 10
    a, _ = src.generate(2, [5, 6, 7, 8, 9, 10], labels=labels, batch_size=6, progress=False)
    b, _ = src.generate(2, [5, 6, 7, 8, 9, 10], labels=labels, batch_size=4, progress=False)
    c, _ = src.generate(2, [9, 10], labels=labels[4:], batch_size=2, progress=False)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[4:], c, atol=1e-5)
    d, _ = src.generate(2, [6, 7, 8, 9, 10, 11], labels=labels, batch_size=6, progress=False)
    assert not torch.allclose(a, d, atol=1e-3)


def test_stock_pipeline_sampler_matches_the_fewstep_sampler(tiny_dit_dir):
    from fewstep.evaluation.sources import load_source

    src = load_source(str(tiny_dit_dir))
    labels = torch.tensor([0, 3, 7])
    # 4 steps: DDIM "trailing" indices 999, 749, 499, 249 are exactly fewstep's times 1, .75, .5, .25
    ours, _ = src.generate(4, [0, 1, 2], labels=labels, progress=False)
    stock, _ = src.generate(4, [0, 1, 2], labels=labels, sampler="pipeline", progress=False)
    assert stock.shape == ours.shape
    assert torch.allclose(ours, stock, atol=1e-4)


def test_reference_cache_is_keyed_by_the_extractor_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from fewstep.digits.judge import JUDGE_WEIGHTS
    from fewstep.evaluation.scores import cache_dir

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    u8, _ = _digits_u8()
    imgs = TensorImages(u8[:64])
    ext_a = Extractor().check()
    r1 = ReferenceFeatures.compute(imgs, ext_a, {"k": "x"}, {"kind": "test"})
    r2 = ReferenceFeatures.compute(imgs, ext_a, {"k": "x"}, {"kind": "test"})
    assert not r1.description["cached"] and r2.description["cached"]
    assert torch.equal(r1.features["features"], r2.features["features"])
    # a different judge file (perturbed weights) must not reuse the first judge's features
    state = load_file(str(JUDGE_WEIGHTS))
    state = {k: v + 0.05 if k.startswith("to_features") else v for k, v in state.items()}
    from safetensors import safe_open

    with safe_open(str(JUDGE_WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    other = tmp_path / "judge_b.safetensors"
    save_file(state, str(other), metadata=meta)
    ext_b = Extractor(weights=str(other)).check()
    r3 = ReferenceFeatures.compute(imgs, ext_b, {"k": "x"}, {"kind": "test"})
    assert not r3.description["cached"] and r3.description["cache_key"] != r1.description["cache_key"]
    assert not torch.allclose(r3.features["features"], r1.features["features"])
    assert len(list((cache_dir() / "eval-reference").glob("*.safetensors"))) == 2


# ---- CLIP score -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + processor saved to a folder (offline tokenizer from tests/tiny.py);
    the text projection's sign is chosen so that the test's mean cosine is positive."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.tiny import tiny_clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = tiny_clip_tokenizer(max_length=16)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    if _direct_clip(model, proc, *_clip_inputs()).mean() < 0:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


def _clip_inputs():
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return imgs, ["a red cat", "a dog", "the blue photo", "two", "seven"]


def _direct_clip(model, proc, imgs, caps):
    inp = proc(text=caps, images=list(imgs), return_tensors="pt", padding=True)
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=inp["pixel_values"])
        te = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
    return torch.nn.functional.cosine_similarity(ie, te)


def test_clip_score_is_100_times_the_mean_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    from fewstep.evaluation.scores import ClipScorer

    imgs, caps = _clip_inputs()
    cos = _direct_clip(
        CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir), imgs, caps
    )
    score = ClipScorer(tiny_clip_dir)(imgs, caps, batch_size=2)
    assert score > 0 and abs(score - 100 * cos.mean().item()) < 1e-3


def test_caption_protocol_end_to_end(tiny_clip_dir, tmp_path):
    """A tiny SD1.5 pipeline on a caption protocol: captions from a COCO-style JSON, a reference
    folder, the judge as extractor (no Inception offline), CLIP score and per-caption diversity."""
    from PIL import Image

    from tests.tiny import make_tiny_pipeline

    pipe_dir = tmp_path / "sd15"
    make_tiny_pipeline("sd15").save_pretrained(pipe_dir, safe_serialization=True)
    words = ["a red cat", "a blue dog", "the small photo", "two big dogs", "a green cat"]
    (tmp_path / "captions.json").write_text(
        json.dumps(
            {
                "annotations": [{"image_id": i, "caption": w} for i, w in enumerate(words)]
                + [{"image_id": 0, "caption": "second"}]
            }
        )
    )
    ref = tmp_path / "ref"
    ref.mkdir()
    u8, _ = _digits_u8()
    for i, im in enumerate(u8[:12]):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(ref / f"{i}.png")
    out = tmp_path / "out"
    res = evaluate(
        EvalSpec(
            pipeline=str(pipe_dir),
            protocol="coco2014-30k",
            steps=[2],
            num_samples=6,
            batch_size=6,
            captions=str(tmp_path / "captions.json"),
            reference=str(ref),
            image_size=32,
            feature_extractor="fewstep-digits-judge",
            clip_model=str(tiny_clip_dir),
            metrics=["fid", "clip", "diversity"],
            guidance=2.0,
            out=str(out),
            progress=False,
        )
    )
    row = res["rows"][0]
    assert set(row["metrics"]) == {"fid", "clip", "diversity", "vendi"}
    assert row["nfe"] == 4 and row["metrics"]["clip"]["n_generated"] == 6
    assert row["metrics"]["diversity"]["groups"] == 5 and res["captions"]["sha256"]
    assert res["reference"]["kind"] == "folder" and res["reference"]["count"] == 12
    assert 0 <= row["metrics"]["clip"]["value"] <= 100


# ---- the command line -------------------------------------------------------------------------------
def test_cli_and_module_entry_point(tiny_dit_dir, tmp_path, capsys):
    from fewstep.cli import main as cli_main
    from fewstep.eval_cmd import main as module_main

    rc = cli_main(
        [
            "eval",
            "--pipeline",
            str(tiny_dit_dir),
            "--steps",
            "1",
            "--num-samples",
            "12",
            "--metrics",
            "fid,class_acc",
            "--no-progress",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert rc == 0 and "| " in capsys.readouterr().out
    rc = module_main(
        [
            "--pipeline",
            str(tiny_dit_dir),
            "--steps",
            "1",
            "--num-samples",
            "12",
            "--metrics",
            "fid",
            "--no-progress",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert rc == 0 and res["command"].startswith("python -m eval.eval_cmd --pipeline")
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["rows"][0]["metrics"]["fid"]["value"] == res["rows"][0]["metrics"]["fid"]["value"]
    rc = cli_main(
        [
            "eval",
            "--pipeline",
            str(tiny_dit_dir),
            "--feature-extractor",
            "inception-v3-compat",
            "--inception-weights",
            str(tmp_path / "missing.pth"),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pth" in err and "--inception-weights" in err
    assert not (tmp_path / "c").exists()


def test_module_entry_point_runs_as_a_script():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "eval.eval_cmd", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--inception-weights" in r.stdout


# ---- students: run dirs as the training entry point writes them ----------------------------------------
def _fake_run_dir(root, teacher_dir, sampling, perturb=0.05):
    """A run dir shaped like fewstep/training/loop.py's output: run_card.json naming the teacher and
    the student's sampler, and final/student/ (a diffusers model folder) with changed weights."""
    from diffusers import DiTTransformer2DModel

    bb = DiTTransformer2DModel.from_pretrained(teacher_dir / "transformer")
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    bb.save_pretrained(root / "final" / "student", safe_serialization=True)
    card = {
        "name": "tiny",
        "objective": "dmd2",
        "teacher": {"source": str(teacher_dir), "family": "dit"},
        "sampling": sampling,
        "steps": 2,
        "files": {"student": "final/student"},
    }
    (root / "run_card.json").write_text(json.dumps(card))
    return root


def test_run_dir_student_samples_with_its_recorded_times(tiny_dit_dir, tmp_path):
    from fewstep.evaluation.sources import load_source
    from fewstep.samplers import initial_noise, sample

    run = _fake_run_dir(
        tmp_path / "run",
        tiny_dit_dir,
        {"times": [1.0, 0.6, 0.0], "renoise": "fresh", "times_by_steps": {"4": [1.0, 0.8, 0.5, 0.2, 0.0]}},
    )
    src = load_source(str(run))
    teacher = load_source(str(tiny_dit_dir))
    assert src.kind == "student" and src.default_guidance == 1.0 and src.info["weights_sha256"]
    assert src.schedule(2) == ([1.0, 0.6, 0.0], "fresh", "card (training times)")
    assert src.schedule(4)[0] == [1.0, 0.8, 0.5, 0.2, 0.0]
    assert src.schedule(1)[0] == [1.0, 0.0] and src.schedule(1)[2].startswith("uniform")
    labels = torch.tensor([1, 2])
    got, _ = src.generate(2, [3, 4], labels=labels, progress=False)
    noise = torch.cat([initial_noise((1, 4, 8, 8), torch.Generator().manual_seed(s)) for s in (3, 4)])
    lat = sample(
        src.denoiser,
        noise,
        {"class_labels": labels},
        [1.0, 0.6, 0.0],
        renoise="fresh",
        generator=torch.Generator().manual_seed(3 * 1_000_003 + 7),
    )
    assert torch.allclose(got, src.decode(lat).clamp(-1, 1), atol=1e-5)
    t_img, _ = teacher.generate(2, [3, 4], labels=labels, progress=False)
    assert not torch.allclose(got, t_img, atol=1e-2)  # the student's weights, not the teacher's
    res = evaluate(
        EvalSpec(
            pipeline=str(run),
            steps=[1, 2],
            num_samples=10,
            metrics=["fid", "class_acc"],
            out=str(tmp_path / "o"),
            progress=False,
        )
    )
    assert res["source"]["kind"] == "student" and res["rows"][1]["renoise"] == "fresh"
    assert res["rows"][1]["times_source"] == "card (training times)" and res["rows"][0]["nfe"] == 1


def test_times_override_samples_a_student_at_other_times(tiny_dit_dir, tmp_path):
    """--times replaces the run card's times for the one step count asked (e.g. another sCM
    intermediate time), records where they came from, and refuses bad lists or teachers."""
    from fewstep.evaluation import InputError

    run = _fake_run_dir(tmp_path / "run", tiny_dit_dir, {"times": [1.0, 0.6, 0.0], "renoise": "fresh"})
    card_before = (run / "run_card.json").read_text()
    spec = dict(pipeline=str(run), steps=[2], num_samples=6, metrics=["class_acc"], progress=False)
    res = evaluate(EvalSpec(**spec, times=[1.0, 0.3, 0.0], out=str(tmp_path / "o")))
    row = res["rows"][0]
    assert row["times"] == [1.0, 0.3, 0.0] and row["times_source"] == "--times"
    base = evaluate(EvalSpec(**spec, out=str(tmp_path / "b")))["rows"][0]
    assert base["times"] == [1.0, 0.6, 0.0] and base["times_source"] == "card (training times)"
    assert (run / "run_card.json").read_text() == card_before  # the run dir is not touched
    for times, steps, msg in [
        ([1.0, 0.0], [2], "N \\+ 1 times"),
        ([1.0, 0.5, 0.0], [1, 2], "exactly one"),
        ([1.0, 0.5, 0.6], [2], "decrease"),
        ([1.2, 0.5, 0.0], [2], "at most 1"),
    ]:
        with pytest.raises(InputError, match=msg):
            evaluate(EvalSpec(**{**spec, "steps": steps}, times=times, out=str(tmp_path / "x")))
    with pytest.raises(InputError, match="--times sets fewstep's sampler"):
        evaluate(EvalSpec(**spec, times=[1.0, 0.3, 0.0], sampler="pipeline", out=str(tmp_path / "x")))
    with pytest.raises(InputError, match="applies to students"):
        evaluate(
            EvalSpec(
                pipeline=str(tiny_dit_dir),
                steps=[2],
                num_samples=6,
                metrics=["class_acc"],
                progress=False,
                times=[1.0, 0.3, 0.0],
                out=str(tmp_path / "t"),
            )
        )
    assert not (tmp_path / "x" / "results.json").exists()


def test_broken_run_dirs_are_named(tiny_dit_dir, tmp_path):
    from fewstep.evaluation import InputError
    from fewstep.evaluation.sources import load_source

    run = _fake_run_dir(tmp_path / "run", tiny_dit_dir, {"times": [1.0, 0.0], "renoise": "fresh"})
    card = json.loads((run / "run_card.json").read_text())
    with pytest.raises(InputError, match="student_ema"):
        load_source(str(run), student_weights="student_ema")
    (run / "run_card.json").write_text(json.dumps({**card, "teacher": {}}))
    with pytest.raises(InputError, match=r"run_card.json does not name its teacher"):
        load_source(str(run))
    with pytest.raises(InputError, match="neither a teacher name"):
        load_source(str(tmp_path / "nothing-here"))


def test_guidance_embedded_students_get_their_w_as_an_input():
    from fewstep.evaluation.sources import Source
    from fewstep.objectives.consistency import guidance_scale_embedding

    src = Source(
        kind="student",
        name="lcm",
        denoiser=None,
        decode=lambda z: z,
        latent_shape=(4, 8, 8),
        conditioning="labels",
        sampling={
            "times": [1.0, 0.0],
            "renoise": "fresh",
            "guidance_embedding": {"key": "timestep_cond", "dim": 16, "guidance": 8.5},
        },
    )
    assert src.cfg_and_embedded(None) == (1.0, 8.5) and src.cfg_and_embedded(3.0) == (1.0, 3.0)
    cond = src.conds(torch.tensor([1, 2]), None, "cpu", embedded=8.5)
    assert torch.equal(cond["timestep_cond"], guidance_scale_embedding(torch.full((2,), 7.5), 16))


def test_a_real_training_run_and_its_checkpoint_are_evaluated(tiny_dit_dir, tmp_path):
    """Three dsm steps of the training entry point on the tiny teacher: the run dir and its
    checkpoint load as students with the run card's sampler."""
    from fewstep.config import load_config
    from fewstep.evaluation.sources import load_source
    from fewstep.training import run

    preset = Path(__file__).resolve().parents[1] / "configs" / "digits" / "dsm.yaml"
    cfg = load_config(
        preset,
        [
            f"teacher.source={tiny_dit_dir}",
            "steps=3",
            "data.real_data=false",
            "objective.teacher_steps=2",
            "data.batch_size=4",
            "log.sample_every=0",
            "checkpoint.every=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    run(cfg)
    student = load_source(str(tmp_path / "run"))
    ckpt = load_source(str(tmp_path / "run" / "checkpoints" / "step_0000002"))
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    assert student.kind == ckpt.kind == "student" and student.sampling == ckpt.sampling == card["sampling"]
    labels = torch.tensor([0, 5])
    a, _ = student.generate(4, [0, 1], labels=labels, progress=False)
    b, _ = ckpt.generate(4, [0, 1], labels=labels, progress=False)
    assert a.shape == b.shape and (a - b).abs().max() < 0.1  # one training step apart
    with pytest.raises(Exception, match="run_card.json"):
        (tmp_path / "run" / "run_card.json").unlink()
        load_source(str(tmp_path / "run" / "checkpoints" / "step_0000002"))


def test_hybrid_sampling_hands_over_from_teacher_to_student(tiny_dit_dir, tmp_path):
    from fewstep.evaluation import InputError
    from fewstep.evaluation.sources import load_source
    from fewstep.samplers import initial_noise, sample_hybrid

    run = _fake_run_dir(tmp_path / "run", tiny_dit_dir, {"times": [1.0, 0.75, 0.5, 0.0], "renoise": "fresh"})
    src = load_source(str(run))
    labels = torch.tensor([2, 9])
    got, _ = src.generate(3, [0, 1], labels=labels, hybrid=1, teacher_guidance=1.0, progress=False)
    teacher = load_source(str(tiny_dit_dir))
    noise = torch.cat([initial_noise((1, 4, 8, 8), torch.Generator().manual_seed(s)) for s in (0, 1)])
    lat = sample_hybrid(
        teacher.denoiser,
        src.denoiser,
        noise,
        {"class_labels": labels},
        [1.0, 0.75],
        [0.75, 0.5, 0.0],
        guidance=1.0,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.allclose(got, src.decode(lat).clamp(-1, 1), atol=1e-5)
    plain, _ = src.generate(3, [0, 1], labels=labels, progress=False)
    assert not torch.allclose(got, plain, atol=1e-3)
    res = evaluate(
        EvalSpec(
            pipeline=str(run),
            steps=[3],
            hybrid=1,
            num_samples=10,
            metrics=["fid"],
            out=str(tmp_path / "o"),
            progress=False,
        )
    )
    assert res["rows"][0]["hybrid"]["teacher_times"] == [1.0, 0.75] and res["rows"][0]["nfe"] == 3
    with pytest.raises(InputError, match="--hybrid needs a student"):
        evaluate(EvalSpec(pipeline=str(tiny_dit_dir), steps=[3], hybrid=1, num_samples=10, out=str(tmp_path / "p")))


def test_an_exported_student_folder_scores_alike_with_both_samplers(tiny_dit_dir, tmp_path):
    """A run exported as a stock DiTPipeline folder: fewstep's sampler with the card's times and
    the folder's own pipeline give the same images; unsupported step counts are refused."""
    import fewstep.export as export
    from fewstep.evaluation import InputError
    from fewstep.evaluation.sources import load_source

    run = _fake_run_dir(tmp_path / "run", tiny_dit_dir, {"times": [1.0, 0.5, 0.0], "renoise": "ddim"})
    export.export_student(run, tmp_path / "export")
    src = load_source(str(tmp_path / "export"))
    assert src.kind == "student" and src.sampling["times"] == [1.0, 0.5, 0.0] and src.pipeline is not None
    labels = torch.tensor([0, 3, 7])
    ours, _ = src.generate(2, [0, 1, 2], labels=labels, progress=False)
    stock, _ = src.generate(2, [0, 1, 2], labels=labels, sampler="pipeline", progress=False)
    assert torch.allclose(ours, stock, atol=1e-4)
    with pytest.raises(InputError, match="supports"):
        evaluate(
            EvalSpec(
                pipeline=str(tmp_path / "export"),
                steps=[1, 2],
                sampler="pipeline",
                num_samples=4,
                metrics=["fid"],
                out=str(tmp_path / "o"),
            )
        )


# ---- the benchmark table script ------------------------------------------------------------------------
def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "eval" / "benchmark_table.py"
    spec = importlib.util.spec_from_file_location("benchmark_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_table_rewrites_only_its_own_section(tiny_dit_dir, tmp_path, capsys):
    bt = _benchmark_module()
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Teachers\n\nteacher rows\n\n## Export\n\nexport rows\n")
    args = [
        "--teachers",
        "",
        "--students",
        str(tiny_dit_dir),
        "--student-steps",
        "1,2",
        "--num-samples",
        "20",
        "--out",
        str(tmp_path / "bench"),
        "--work",
        str(tmp_path / "work"),
    ]
    rc = bt.main(args + ["--write", str(md)])
    first = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    assert bt.main(args + ["--reuse"]) == 0 and "reusing" in capsys.readouterr().err
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["results"] == first
    text = md.read_text()
    assert rc == 0 and text.startswith("# Benchmarks\n\n## Teachers\n\nteacher rows\n\n## Export\n\nexport rows\n")
    assert text.count(bt.SECTION) == 1 and text.count(bt.START) == 1
    cmd = f"python eval/benchmark_table.py --teachers '' --students {tiny_dit_dir} --student-steps 1,2"
    assert cmd in text and len([ln for ln in text.splitlines() if ln.startswith(f"| `{tiny_dit_dir}`")]) == 2
    for f in ("fid_vs_steps.png", "grids.png", "results.json"):
        assert (tmp_path / "bench" / f).is_file()
    # a second run replaces the section in place, and a later section stays after it
    md.write_text(text + "\n## Later\n\nlater rows\n")
    bt.write_section(
        md,
        bt.section_text(
            json.loads((tmp_path / "bench" / "results.json").read_text())["results"],
            "python eval/benchmark_table.py --again",
            tmp_path / "bench",
        ),
    )
    again = md.read_text()
    assert again.count(bt.SECTION) == 1 and "--again" in again and cmd not in again
    assert again.endswith("## Later\n\nlater rows\n") and "## Export\n\nexport rows" in again


def test_benchmark_teacher_guidance_per_teacher_and_bad_names():
    import argparse

    bt = _benchmark_module()
    ap = argparse.ArgumentParser()
    both = ["digits-vp", "digits-flow"]
    assert bt.teacher_jobs(both, None, ap) == [("digits-vp", None), ("digits-flow", None)]
    assert bt.teacher_jobs(both, ["2"], ap) == [("digits-vp", 2.0), ("digits-flow", 2.0)]
    got = bt.teacher_jobs(both, ["digits-vp=1.5", "digits-vp=2", "digits-flow=2"], ap)
    assert got == [("digits-vp", 1.5), ("digits-vp", 2.0), ("digits-flow", 2.0)]
    assert bt.teacher_jobs(both, ["digits-flow=1.25"], ap) == [("digits-vp", None), ("digits-flow", 1.25)]
    for bad in (["digits-xx=2"], ["digits-vp=high"]):
        with pytest.raises(SystemExit):
            bt.teacher_jobs(both, bad, ap)


def test_benchmark_finds_run_dirs_and_exported_students(tiny_dit_dir, tmp_path):
    bt = _benchmark_module()
    runs = tmp_path / "runs"
    _fake_run_dir(runs / "a", tiny_dit_dir, {"times": [1.0, 0.0], "renoise": "fresh"})
    (runs / "group" / "b").mkdir(parents=True)
    (runs / "group" / "b" / "run_card.json").write_text("{}")
    (runs / "cache").mkdir()  # not a run
    (runs / "exp").mkdir()
    (runs / "exp" / "model_index.json").write_text("{}")
    (runs / "exp" / "fewstep_card.json").write_text("{}")
    assert bt.find_students(runs) == [str(runs / "a"), str(runs / "exp"), str(runs / "group" / "b")]


def test_embedded_teacher_end_to_end(tmp_path):
    """The shipped digits teacher through the command's Python entry: its recommended guidance
    (teachers.json) is used and recorded, CFG doubles the NFE, class accuracy is far above chance
    at 8 steps."""
    from fewstep.digits.data import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / "teachers.json").read_text())["vp"]
    res = evaluate(
        EvalSpec(
            pipeline="digits-vp",
            steps=[8],
            num_samples=40,
            metrics=["fid", "class_acc"],
            out=str(tmp_path / "o"),
            progress=False,
        )
    )
    row, src = res["rows"][0], res["source"]
    want = float(card.get("guidance", 1.0))
    assert row["guidance"] == want and (("teachers.json" in src["guidance_source"]) == ("guidance" in card))
    assert row["nfe"] == (16 if want != 1.0 else 8) and row["times"][:2] == [1.0, 0.875]
    assert row["metrics"]["class_acc"]["value"] > 0.5 and row["metrics"]["fid"]["n_reference"] == 1797


def test_benchmark_reuse_needs_same_times_and_a_students_batch(tiny_dit_dir, tmp_path):
    """--reuse keeps a teacher's results across batch sizes (its sampler draws no noise after the
    per-sample start) but not a student's (fresh noise is drawn per batch), and never when the
    student's sampling times changed."""
    bt = _benchmark_module()
    run = _fake_run_dir(tmp_path / "run", tiny_dit_dir, {"times": [1.0, 0.6, 0.0], "renoise": "fresh"})

    def spec(src, out, batch):
        return EvalSpec(
            pipeline=str(src),
            steps=[2],
            num_samples=8,
            metrics=["fid"],
            batch_size=batch,
            out=str(tmp_path / out),
            progress=False,
        )

    evaluate(spec(run, "s", 4))
    evaluate(spec(tiny_dit_dir, "t", 4))
    assert bt.reusable(spec(run, "s", 4)) is not None
    assert bt.reusable(spec(run, "s", 8)) is None
    assert bt.reusable(spec(tiny_dit_dir, "t", 8)) is not None
    card = json.loads((run / "run_card.json").read_text())
    card["sampling"]["times"] = [1.0, 0.4, 0.0]
    (run / "run_card.json").write_text(json.dumps(card))
    assert bt.reusable(spec(run, "s", 4)) is None
