"""fewstep.evaluation's one-call metrics (scores.fidelity_metrics, digits.class_accuracy,
digits.digits_scores): numbers equal torch-fidelity's own, FID matches the closed form on Gaussians,
separates real from wrong digits, the reference cache is keyed by the judge's weights, and class
accuracy reads labels."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from fewstep.digits.data import load_digits_tensors, to_uint8_rgb
from fewstep.digits.judge import JUDGE_NAME, JUDGE_WEIGHTS, load_judge, save_judge, weights_sha256
from fewstep.evaluation.digits import class_accuracy, digits_scores, digits_uint8
from fewstep.evaluation.inputs import TensorImages as UInt8ImageDataset
from fewstep.evaluation.scores import cache_dir as default_cache_dir
from fewstep.evaluation.scores import fidelity_metrics

FID = "fid"
DIRECT_FID = "frechet_inception_distance"


def digits_reference_dataset():
    return UInt8ImageDataset(digits_uint8())


def _cached_weights(folder):
    """{file: weights_sha256 in its metadata} of the cached reference features in `folder`."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out[f] = (h.metadata() or {}).get("weights_sha256")
    return out


@pytest.fixture(scope="module", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """One reference cache for the module (the digits' features are computed once), never ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x, y, perm


def _direct_fid(a, b, **kw) -> float:
    """torch-fidelity called directly, its cache off."""
    extractor = kw.pop("extractor", JUDGE_NAME)
    return torch_fidelity.calculate_metrics(
        input1=a,
        input2=b,
        fid=True,
        feature_extractor=extractor,
        cuda=False,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
        **kw,
    )[DIRECT_FID]


def test_fid_equals_a_direct_torch_fidelity_call(digits, tmp_path):
    x, _, perm = digits
    u8 = to_uint8_rgb(x)
    a, b = u8[perm[:600]], u8[perm[600:1200]]
    ours = fidelity_metrics(a, b, batch_size=64)[FID]
    theirs = _direct_fid(UInt8ImageDataset(a), UInt8ImageDataset(b), batch_size=64)
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    # against "digits": first call fills the cache, the second reads it; both equal the direct call
    first = fidelity_metrics(a, "digits", batch_size=64, cache_dir=tmp_path)[FID]
    cached = _cached_weights(tmp_path / "eval-reference")
    assert list(cached.values()) == [weights_sha256(JUDGE_WEIGHTS)]
    second = fidelity_metrics(a, "digits", batch_size=64, cache_dir=tmp_path)[FID]
    theirs = _direct_fid(UInt8ImageDataset(a), digits_reference_dataset(), batch_size=64)
    assert first == second and abs(first - theirs) <= 1e-6 * abs(theirs)
    assert len(digits_reference_dataset()) == 1797


def test_folder_input_reads_the_same_images(digits, tmp_path):
    from PIL import Image

    x, _, perm = digits
    u8 = to_uint8_rgb(x[perm[:80]])
    for i, im in enumerate(u8):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    from_folder = fidelity_metrics(str(tmp_path), "digits")[FID]
    from_tensor = fidelity_metrics(u8, "digits")[FID]
    assert from_folder == pytest.approx(from_tensor, rel=1e-9)


def test_fid_separates_real_digits_from_wrong_ones(digits):
    x, y, perm = digits
    u8 = to_uint8_rgb(x)
    same = fidelity_metrics(u8, "digits")[FID]
    halves = fidelity_metrics(u8[perm[:898]], u8[perm[898:]])[FID]
    # wrong distributions of the same size as a half, against all real digits (cached features)
    noise = torch.rand(898, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fid_noise = fidelity_metrics(to_uint8_rgb(noise), "digits")[FID]
    shifted = fidelity_metrics(to_uint8_rgb(torch.roll(x[perm[:898]], 3, dims=-1)), "digits")[FID]
    half_classes = x[perm[:898]][y[perm[:898]] < 5]
    dropped = fidelity_metrics(to_uint8_rgb(half_classes), "digits")[FID]
    assert abs(same) < 1e-6
    assert 0 < halves < 60
    assert fid_noise > 20 * halves and shifted > 5 * halves and dropped > 10 * halves
    # with no cache_dir, the reference features went under $FEWSTEP_CACHE
    assert str(default_cache_dir()) == os.environ["FEWSTEP_CACHE"]
    assert len(list((default_cache_dir() / "eval-reference").glob(f"{JUDGE_NAME}-*.safetensors"))) == 1


def test_reference_cache_is_keyed_by_judge_weights(digits, tmp_path):
    x, _, perm = digits
    gen = to_uint8_rgb(x[perm[:300]])
    base = fidelity_metrics(gen, "digits", cache_dir=tmp_path / "c")[FID]
    other_judge = load_judge()
    with torch.no_grad():
        other_judge.to_features.weight.mul_(1.5)
    other = tmp_path / "judge_b.safetensors"
    save_judge(other_judge, other)
    changed = fidelity_metrics(gen, "digits", cache_dir=tmp_path / "c", weights=str(other))[FID]
    files = _cached_weights(tmp_path / "c" / "eval-reference")
    assert sorted(files.values()) == sorted([weights_sha256(JUDGE_WEIGHTS), weights_sha256(other)])  # never shared
    # scaling the features by 1.5 scales FID by 2.25: the second judge's features were really used
    assert changed == pytest.approx(2.25 * base, rel=1e-4)


def test_kid_and_prc_with_few_samples(digits):
    x, _, perm = digits
    u8 = to_uint8_rgb(x)
    noise = to_uint8_rgb(torch.rand(60, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    real = fidelity_metrics(u8[perm[:60]], u8[perm[60:110]], fid=False, kid=True, prc=True, kid_subsets=10)
    fake = fidelity_metrics(noise, u8[perm[60:110]], fid=False, kid=True, prc=True, kid_subsets=10)
    assert FID not in real  # only what was asked for
    # kid_subset_size (default 1000) was clamped to 50 samples; noise is far from digits
    assert fake["kid_mean"] > 10 * abs(real["kid_mean"])
    assert real["precision"] > 0.5 and real["recall"] > 0.5 and fake["recall"] == 0.0
    # with 50 references the k-NN balls are wide; against all 1,797 digits noise lies outside them
    assert fidelity_metrics(noise, "digits", fid=False, prc=True)["precision"] == 0.0


def test_bad_inputs_give_clear_errors(digits, tmp_path):
    x, _, _ = digits
    with pytest.raises(ValueError, match="to_uint8_rgb"):
        fidelity_metrics(x[:10], "digits")
    with pytest.raises(TypeError, match="kid_subset_sise"):
        fidelity_metrics(to_uint8_rgb(x[:10]), "digits", kid_subset_sise=5)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        fidelity_metrics(str(tmp_path / "no_such_folder"), "digits")
    with pytest.raises(ValueError, match="not registered"):
        fidelity_metrics(to_uint8_rgb(x[:10]), "digits", extractor="no-such-extractor")
    with pytest.raises(ValueError, match="feature layer 'pool3'"):
        fidelity_metrics(to_uint8_rgb(x[:10]), "digits", feature_layer="pool3")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        class_accuracy(x[:3], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float images"):
        digits_scores(to_uint8_rgb(x[:3]), torch.tensor([0, 1, 2]))


# ---- FID against the closed form on Gaussian features ------------------------------------------
class _Identity(FeatureExtractorBase):
    """Features are the input vectors themselves, so their statistics are known exactly."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x):
        return (x.float(),)

    @staticmethod
    def get_provided_features_list():
        return ("identity",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "identity"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 4)


class _Vectors(Dataset):
    def __init__(self, v):
        self.v = v

    def __len__(self):
        return self.v.shape[0]

    def __getitem__(self, i):
        return self.v[i]


def _exact_sample(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n vectors whose sample mean is mu and sample covariance (ddof=1) is cov, exactly."""
    z = np.random.default_rng(seed).standard_normal((n, mu.size))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance -> I
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mu).float()


@pytest.mark.parametrize("diagonal", [True, False])
def test_torch_fidelity_fid_equals_the_closed_form(diagonal):
    if "fewstep-test-identity" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("fewstep-test-identity", _Identity)
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    if diagonal:
        s1, s2 = np.diag(rng.uniform(0.5, 2, d)), np.diag(rng.uniform(0.5, 2, d))
        # FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances
        expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    else:
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    f1, f2 = _exact_sample(mu1, s1, 400, 1), _exact_sample(mu2, s2, 500, 2)
    direct = _direct_fid(_Vectors(f1), _Vectors(f2), extractor="fewstep-test-identity")
    ours = fidelity_metrics(_Vectors(f1), _Vectors(f2), extractor="fewstep-test-identity")[FID]
    assert direct == pytest.approx(expected, rel=1e-4)
    assert ours == pytest.approx(direct, rel=1e-9)
    # a shifted mean adds exactly |shift|^2
    shift = torch.full((d,), 0.25)
    moved = fidelity_metrics(_Vectors(f1 + shift), _Vectors(f1), extractor="fewstep-test-identity")[FID]
    assert moved == pytest.approx(d * 0.25**2, rel=1e-4)


# ---- class accuracy and the digits scores -------------------------------------------------------
def test_class_accuracy_reads_labels(digits):
    x, y, perm = digits
    idx = perm[:500]
    assert class_accuracy(x[idx], y[idx]) > 0.97
    assert class_accuracy(x[idx], (y[idx] + 1) % 10) < 0.05
    assert class_accuracy(x[idx].expand(-1, 3, -1, -1), y[idx]) > 0.97


def test_digits_scores(digits):
    x, y, perm = digits
    idx = perm[:400]
    s = digits_scores(x[idx], y[idx])
    assert set(s) == {"fid", "class_acc", "n"} and s["n"] == 400
    assert s["fid"] == pytest.approx(fidelity_metrics(to_uint8_rgb(x[idx]), "digits")[FID], rel=1e-12)
    assert s["class_acc"] > 0.97
    # read from the uint8-rounded images: equal to class_accuracy on them up to one sample
    rounded = to_uint8_rgb(x[idx])[:, :1].float() / 127.5 - 1
    assert abs(s["class_acc"] - class_accuracy(rounded, y[idx])) <= 1 / 400
    noise = torch.rand(400, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    bad = digits_scores(noise, y[idx])
    assert bad["fid"] > 20 * s["fid"] and bad["class_acc"] < 0.5
    assert np.isnan(digits_scores(x[idx], None)["class_acc"])
