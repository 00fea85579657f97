"""Bad and awkward input to `fewstep eval`: each case either converts as documented in
fewstep/evaluation/inputs.py or stops with a message naming the file, and no results file is
left behind as if complete."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.evaluation import EvalSpec, ImageFolder, InputError, evaluate
from fewstep.evaluation.inputs import atomic_write_json, list_images, read_image


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _gray(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def test_empty_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path)):
        ImageFolder(tmp_path)


def test_non_image_files_are_ignored_and_a_folder_of_only_them_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(InputError, match="holds no images"):
        ImageFolder(tmp_path)
    _png(tmp_path / "a.png", _gray(0))
    _png(tmp_path / "B.PNG", _gray(1))
    folder = ImageFolder(tmp_path)
    assert [f.name for f in folder.files] == ["B.PNG", "a.png"]
    assert folder[0].shape == (3, 32, 32) and folder[0].dtype == torch.uint8


def test_images_only_in_sub_folders_get_a_hint(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "a.png", _gray(0))
    with pytest.raises(InputError, match="sub-folders"):
        list_images(tmp_path)


def test_corrupt_png_is_an_error_naming_the_file(tmp_path):
    _png(tmp_path / "good.png", _gray(0))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError, match="bad.png"):
        ImageFolder(tmp_path)


def test_truncated_png_fails_when_read_naming_the_file(tmp_path):
    full = _png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])  # valid header, half the pixel data
    folder = ImageFolder(tmp_path)  # headers are fine
    with pytest.raises(InputError, match="cut.png"):
        [folder[i] for i in range(len(folder))]


def test_mixed_sizes_need_a_scoring_size_then_are_resized(tmp_path):
    _png(tmp_path / "a.png", _gray(0, 32))
    _png(tmp_path / "b.png", np.random.default_rng(1).integers(0, 256, (48, 64), dtype=np.uint8))
    with pytest.raises(InputError, match=r"mixes image sizes: 32x32 \(a.png\), 64x48 \(b.png\)"):
        ImageFolder(tmp_path)
    folder = ImageFolder(tmp_path, size=32)
    assert folder[0].shape == folder[1].shape == (3, 32, 32)
    # 64x48 -> shorter side 32 (43x32, bicubic), centre crop 32x32: as documented
    im = Image.open(tmp_path / "b.png").convert("RGB").resize((43, 32), Image.BICUBIC).crop((5, 0, 37, 32))
    assert torch.equal(folder[1], torch.from_numpy(np.array(im)).permute(2, 0, 1))


def test_grayscale_rgba_palette_and_16bit_convert_as_documented(tmp_path):
    g = _gray(0)
    x = read_image(_png(tmp_path / "g.png", g, "L"))
    assert x.shape == (3, 32, 32) and all(torch.equal(x[c], torch.from_numpy(g)) for c in range(3))

    rgba = np.random.default_rng(1).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the alpha is dropped, colours are kept (as torch-fidelity reads it)
    x = read_image(_png(tmp_path / "rgba.png", rgba, "RGBA"))
    assert torch.equal(x, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))

    la = Image.fromarray(np.stack([g, 255 - g], -1), mode="LA")
    la.save(tmp_path / "la.png")
    assert torch.equal(read_image(tmp_path / "la.png")[1], torch.from_numpy(g))

    g16 = g.astype(np.uint16) * 257  # 16-bit grayscale of the same picture
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert torch.equal(read_image(tmp_path / "g16.png")[0], torch.from_numpy(g))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"ok": 1, "bad": Boom()})
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    atomic_write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}


def _digits_folder(path, n=24, start=0):
    from fewstep.digits.data import load_digits_tensors, to_uint8_rgb

    path.mkdir(parents=True, exist_ok=True)
    x, _ = load_digits_tensors()
    for i, im in enumerate(to_uint8_rgb(x[start : start + n])):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path / f"{i:04d}.png")
    return path


def test_corrupt_reference_stops_before_generation_and_writes_nothing(tmp_path, monkeypatch):
    ref = _digits_folder(tmp_path / "ref")
    (ref / "zz_corrupt.png").write_bytes(b"not a png at all")

    def no_generation(*a, **k):
        raise AssertionError("the source was loaded although the reference is broken")

    monkeypatch.setattr("fewstep.evaluation.sources.load_source", no_generation)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="zz_corrupt.png"):
        evaluate(
            EvalSpec(
                pipeline="digits-vp",
                reference=str(ref),
                metrics=["fid"],
                num_samples=10,
                out=str(out),
                cache=False,
                progress=False,
            )
        )
    assert not (out / "results.json").exists() and not (out / "results.md").exists()


def test_missing_inception_weights_stop_before_generation_naming_file_and_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "fewstep.evaluation.sources.load_source",
        lambda *a, **k: pytest.fail("generation started without the Inception weights"),
    )
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(InputError, match=r"inception.pth.*--inception-weights"):
        evaluate(
            EvalSpec(
                pipeline="digits-vp",
                feature_extractor="inception-v3-compat",
                inception_weights=str(missing),
                metrics=["fid"],
                out=str(tmp_path / "out"),
            )
        )
    assert not (tmp_path / "out").exists()


def test_missing_clip_model_stops_naming_the_flag(tmp_path):
    with pytest.raises(InputError, match="--clip-model"):
        evaluate(EvalSpec(pipeline="digits-vp", metrics=["clip"], out=str(tmp_path / "out")))
    with pytest.raises(InputError, match=r"nope.*--clip-model"):
        evaluate(
            EvalSpec(
                pipeline="digits-vp", metrics=["clip"], clip_model=str(tmp_path / "nope"), out=str(tmp_path / "out")
            )
        )


def test_unpicklable_inception_file_is_refused(tmp_path):
    import pickle

    bad = tmp_path / "inception.pth"
    with open(bad, "wb") as f:
        pickle.dump({"w": object()}, f)
    with pytest.raises(InputError, match="weights_only=True"):
        evaluate(
            EvalSpec(
                images=str(tmp_path),
                feature_extractor="inception-v3-compat",
                inception_weights=str(bad),
                metrics=["fid"],
                reference="digits",
                out=str(tmp_path / "out"),
            )
        )


def test_bad_statistics_files_name_the_file(tmp_path):
    imgs = _digits_folder(tmp_path / "gen")
    np.savez(tmp_path / "stats.npz", mean=np.zeros(3))
    with pytest.raises(InputError, match=r"stats.npz.*'mu' and 'sigma'"):
        evaluate(
            EvalSpec(
                images=str(imgs),
                reference=str(tmp_path / "stats.npz"),
                metrics=["fid"],
                out=str(tmp_path / "out"),
                progress=False,
            )
        )
    np.savez(tmp_path / "s2.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(InputError, match="KID and precision/recall need reference features"):
        evaluate(
            EvalSpec(
                images=str(imgs),
                reference=str(tmp_path / "s2.npz"),
                metrics=["fid", "kid"],
                out=str(tmp_path / "out"),
                progress=False,
            )
        )
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_stats_file_with_kid_stops_before_generation(tmp_path, monkeypatch):
    np.savez(tmp_path / "s2.npz", mu=np.zeros(64), sigma=np.eye(64))
    monkeypatch.setattr(
        "fewstep.evaluation.sources.load_source",
        lambda *a, **k: pytest.fail("generation started although KID cannot be computed"),
    )
    with pytest.raises(InputError, match=r"s2.npz: KID"):
        evaluate(
            EvalSpec(
                pipeline="digits-vp",
                reference=str(tmp_path / "s2.npz"),
                metrics=["fid", "kid"],
                out=str(tmp_path / "out"),
                progress=False,
            )
        )


def test_a_run_that_fails_midway_leaves_only_a_partial_file(tmp_path, monkeypatch):
    from fewstep.evaluation import run as run_mod

    calls = []

    def one_steps(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory at the second step count")
        return {"steps": 1, "metrics": {}}

    class FakeSource:
        conditioning, num_classes, name = "labels", 10, "fake"

        def describe(self):
            return {"kind": "teacher", "name": "fake"}

    monkeypatch.setattr("fewstep.evaluation.sources.load_source", lambda *a, **k: FakeSource())
    monkeypatch.setattr(run_mod, "_one_steps", one_steps)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="second step count"):
        evaluate(EvalSpec(pipeline="fake", steps=[1, 2], metrics=["fid"], num_samples=10, out=str(out), progress=False))
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 1


def test_unknown_metric_and_protocol_are_errors(tmp_path):
    with pytest.raises(InputError, match="unknown.*lpips"):
        evaluate(EvalSpec(images=str(tmp_path), metrics=["fid", "lpips"], out=str(tmp_path / "o")))
    with pytest.raises(InputError, match="--protocol 'imagenet'"):
        evaluate(EvalSpec(images=str(tmp_path), protocol="imagenet", out=str(tmp_path / "o")))


def test_a_folder_of_samples_is_scored_with_the_condition_free_metrics(tmp_path):
    imgs = _digits_folder(tmp_path / "gen", n=30, start=100)
    res = evaluate(EvalSpec(images=str(imgs), out=str(tmp_path / "out"), progress=False))
    assert set(res["rows"][0]["metrics"]) == {"fid", "kid", "precision", "recall"}
    assert (
        res["rows"][0]["num_samples"] == 30 and json.loads((tmp_path / "out" / "results.json").read_text())["complete"]
    )
    with pytest.raises(InputError, match="need --pipeline"):
        evaluate(EvalSpec(images=str(imgs), metrics=["fid", "class_acc"], out=str(tmp_path / "o2")))


def test_inception_from_a_local_weights_file_matches_torch_fidelity(tmp_path):
    """--inception-weights reaches torch-fidelity's feature_extractor_weights_path (random weights in
    torch-fidelity's own format stand in for the real file, which is not shipped)."""
    from unittest import mock

    import torch_fidelity
    import torch_fidelity.feature_extractor_inceptionv3 as inc
    from PIL import Image

    with (
        mock.patch.object(inc, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        torch.manual_seed(0)
        state = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    from fewstep.digits.data import load_digits_tensors, to_uint8_rgb

    u8 = to_uint8_rgb(load_digits_tensors()[0])
    for name, part in (("gen", u8[:3]), ("ref", u8[500:503])):
        (tmp_path / name).mkdir()
        for i, im in enumerate(part):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i}.png")
    res = evaluate(
        EvalSpec(
            images=str(tmp_path / "gen"),
            reference=str(tmp_path / "ref"),
            metrics=["fid"],
            feature_extractor="inception-v3-compat",
            inception_weights=str(weights),
            out=str(tmp_path / "o"),
            progress=False,
        )
    )
    direct = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "gen"),
        input2=str(tmp_path / "ref"),
        fid=True,
        feature_extractor="inception-v3-compat",
        cuda=False,
        cache=False,
        feature_extractor_weights_path=str(weights),
        verbose=False,
        save_cpu_ram=True,
    )
    ours = res["rows"][0]["metrics"]["fid"]
    assert ours["extractor"] == "inception-v3-compat" and ours["layer"] == "2048"
    assert res["extractor"]["weights_file"] == str(weights)
    assert abs(ours["value"] - direct["frechet_inception_distance"]) <= 1e-6 * abs(ours["value"])


def test_too_few_samples_for_diversity_stop_before_generation(tmp_path, monkeypatch):
    class FakeSource:
        conditioning, num_classes, name = "labels", 10, "fake"

        def generate(self, *a, **k):
            raise AssertionError("generation started")

    monkeypatch.setattr("fewstep.evaluation.sources.load_source", lambda *a, **k: FakeSource())
    with pytest.raises(InputError, match="--num-samples >= 20"):
        evaluate(EvalSpec(pipeline="fake", metrics=["diversity"], num_samples=10, out=str(tmp_path / "o")))


def test_run_card_prediction_type_rereads_the_student(tmp_path):
    """A run card whose sampling names another prediction type (a v-read sCM student of an eps
    teacher) makes the loaded student read its output that way; a bad one is refused by name."""
    from fewstep.denoiser import copy_denoiser
    from fewstep.evaluation.inputs import InputError
    from fewstep.evaluation.sources import _with_card_prediction
    from tests.tiny import make_tiny

    tiny = make_tiny("dit", prediction="epsilon")
    card = {"sampling": {"times": [1.0, 0.0], "renoise": "fresh", "prediction_type": "v_prediction"}}
    student = _with_card_prediction(copy_denoiser(tiny.denoiser), card, tmp_path / "run_card.json")
    assert student.path.prediction_type == "v_prediction" and tiny.denoiser.path.prediction_type == "epsilon"
    plain = copy_denoiser(tiny.denoiser)
    assert _with_card_prediction(plain, {"sampling": {"times": [1.0, 0.0]}}, tmp_path).path is tiny.denoiser.path
    card["sampling"]["prediction_type"] = "flow"
    with pytest.raises(InputError, match="sampling.prediction_type"):
        _with_card_prediction(copy_denoiser(tiny.denoiser), card, tmp_path / "run_card.json")
