"""The digits judge: committed weights meet the accuracy bar, both input conventions agree, the
torch-fidelity extractor follows the interface, and the training script reproduces itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from fewstep.digits.data import load_digits_tensors, split_indices, to_uint8_rgb
from fewstep.digits.judge import (
    JUDGE_CARD,
    JUDGE_NAME,
    JUDGE_WEIGHTS,
    JudgeFeatureExtractor,
    load_judge,
    load_judge_card,
    register_judge_extractor,
    weights_sha256,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_committed_judge_meets_heldout_bar_and_matches_its_card(judge, digits):
    x, y = digits
    _, val = split_indices(x.shape[0])
    acc = (judge.predict(x[val]) == y[val]).float().mean().item()
    assert acc >= 0.97, f"held-out accuracy {acc:.4f} < 0.97"
    assert not judge.training and all(not p.requires_grad and p.device.type == "cpu" for p in judge.parameters())
    card = load_judge_card()
    assert card["weights_sha256"] == weights_sha256(JUDGE_WEIGHTS)
    assert card["heldout_accuracy"] == pytest.approx(acc, abs=1e-5)
    assert card["heldout_n"] == val.numel() and card["seed"] == 0 and card["epochs"] > 0
    assert JUDGE_WEIGHTS.stat().st_size < 1_000_000


def test_missing_or_damaged_weights_give_errors_naming_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_judge(missing)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_judge(bad)
    with pytest.raises(FileNotFoundError, match="card.json"):
        load_judge_card(tmp_path / "card.json")


def test_uint8_forward_agrees_with_float_path(judge, digits):
    x, y = digits
    xs = x[:300]
    logits_f = judge.logits(xs)
    logits_u = judge(to_uint8_rgb(xs))  # torch-fidelity's convention: uint8 (B, 3, H, W)
    # uint8 quantisation moves logits a little, never the decision on real digits
    assert (logits_f.argmax(1) == logits_u.argmax(1)).all()
    assert (logits_f - logits_u).abs().max() < 0.05 * logits_f.abs().max()
    # three-channel float input is read as grayscale
    assert torch.allclose(judge.logits(xs.expand(-1, 3, -1, -1)), logits_f, atol=1e-5)
    # other sizes are resized to 32x32: a 2x upsampled digit keeps its label
    big = to_uint8_rgb(xs).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # 64x64 uint8
    assert (judge(big).argmax(1) == y[:300]).float().mean() > 0.95
    with pytest.raises(ValueError, match="uint8"):
        judge(xs)
    with pytest.raises(ValueError, match="shape"):
        judge.logits(torch.zeros(2, 2, 32, 32))


def test_feature_extractor_interface_and_idempotent_registration(judge, digits):
    register_judge_extractor()
    register_judge_extractor()
    assert FEATURE_EXTRACTORS_REGISTRY[JUDGE_NAME] is JudgeFeatureExtractor
    assert issubclass(JudgeFeatureExtractor, FeatureExtractorBase)
    provided = JudgeFeatureExtractor.get_provided_features_list()
    assert set(provided) == {"features", "logits", "conv_pooled"}
    assert JudgeFeatureExtractor.get_default_feature_layer_for_metric("fid") == "features"
    assert JudgeFeatureExtractor.get_default_feature_layer_for_metric("isc") == "logits"

    fe = JudgeFeatureExtractor(JUDGE_NAME, ["logits", "features"], cuda=False, verbose=False)
    dummy = fe.get_dummy_input_for_compile()
    assert dummy.dtype == torch.uint8 and dummy.shape[1] == 3
    out = fe(to_uint8_rgb(digits[0][:5]))
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (5, 10) and out[1].shape == (5, judge.feature_dim)  # requested order
    assert torch.equal(out[1], judge.features(to_uint8_rgb(digits[0][:5])))
    with pytest.raises(ValueError, match="uint8"):
        fe(digits[0][:5])

    class Other(FeatureExtractorBase):
        pass

    FEATURE_EXTRACTORS_REGISTRY["fewstep-test-clash"] = Other
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_judge_extractor("fewstep-test-clash")
    finally:
        del FEATURE_EXTRACTORS_REGISTRY["fewstep-test-clash"]


def _train_module():
    spec = importlib.util.spec_from_file_location("fewstep_train_judge", REPO / "train" / "judge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_script_is_deterministic_and_writes_a_loadable_card(tmp_path):
    train = _train_module()
    cards = []
    for run in ("a", "b"):
        out = tmp_path / run / "judge.safetensors"
        cards.append(train.main(["--epochs", "1", "--out", str(out)]))
        card = json.loads(out.with_suffix(".json").read_text())
        assert card["weights_sha256"] == weights_sha256(out)
        assert card["command"].startswith("python train/judge.py --epochs 1")
        judge = load_judge(out)
        assert judge.feature_dim == card["architecture"]["feature_dim"]
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]
    # one epoch already reads most held-out digits; far above chance (0.1)
    assert cards[0]["heldout_accuracy"] > 0.7
    assert JUDGE_CARD.is_file()
    # another architecture and augmentation recipe (the panel's options) load back as what they are
    out = tmp_path / "vgg" / "j.safetensors"
    card = train.main(
        [
            "--epochs",
            "1",
            "--width",
            "8",
            "--arch",
            "vgg",
            "--recipe",
            "strong",
            "--seed",
            "5",
            "--name",
            "fewstep-test-judge",
            "--out",
            str(out),
        ]
    )
    assert card["architecture"]["arch"] == "vgg" and card["augmentation"]["recipe"] == "strong"
    assert card["name"] == "fewstep-test-judge" and card["seed"] == 5
    assert load_judge(out).config() == card["architecture"]
