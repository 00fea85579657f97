"""The digits judge panel: several independently trained judges plus one judge-free measure, so
that a quality figure does not ride on one network.

Members (each a registered torch-fidelity feature extractor):
- `fewstep-digits-judge`: the project's judge (cnn3, width 32, geometric augmentation, seed 0);
- three more judges trained by `train/judge.py` with other seeds, architectures and augmentation
  recipes (`python train/judge.py --panel` prints their commands); weights and cards under
  `fewstep/digits/weights/panel/`;
- `fewstep-digits-pixel-pca64`: no network at all; the raw pixels (grayscale, [-1, 1], 32x32)
  projected on the real digits' top 64 principal components.

`register_panel()` registers every member (idempotent); `PANEL_JUDGES` and `PIXEL_PCA` name them.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from .data import IMAGE_SIZE, WEIGHTS_DIR
from .judge import JUDGE_NAME, JUDGE_WEIGHTS, DigitsJudge, JudgeFeatureExtractor, check_uint8_images

__all__ = [
    "PANEL_DIR",
    "PANEL_JUDGES",
    "PCA_COMPONENTS",
    "PIXEL_PCA",
    "PixelPCAExtractor",
    "member_card",
    "member_weights",
    "panel_members",
    "pca_basis",
    "register_panel",
]

PANEL_DIR = WEIGHTS_DIR / "panel"
PIXEL_PCA = "fewstep-digits-pixel-pca64"
PCA_COMPONENTS = 64
# name -> weights file (each with a card <file>.json written by train/judge.py next to it)
PANEL_JUDGES: dict[str, Path] = {
    JUDGE_NAME: JUDGE_WEIGHTS,
    f"{JUDGE_NAME}-cnn3-s1": PANEL_DIR / "cnn3-s1.safetensors",
    f"{JUDGE_NAME}-vgg-s2": PANEL_DIR / "vgg-s2.safetensors",
    f"{JUDGE_NAME}-vgg-s3": PANEL_DIR / "vgg-s3.safetensors",
}


def panel_members() -> list[str]:
    """Every member's extractor name: the judges, then the pixel-PCA measure."""
    return [*PANEL_JUDGES, PIXEL_PCA]


def member_weights(name: str) -> Path:
    if name not in PANEL_JUDGES:
        raise KeyError(f"{name!r} is not a judge of the panel (judges: {sorted(PANEL_JUDGES)})")
    return PANEL_JUDGES[name]


def member_card(name: str) -> dict:
    """The training card of a judge (train/judge.py writes it next to the weights)."""
    card = member_weights(name).with_suffix(".json")
    if not card.is_file():
        raise FileNotFoundError(f"panel judge card {card} not found (train it: `python train/judge.py --panel`)")
    return json.loads(card.read_text())


# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def pca_basis() -> tuple[Tensor, Tensor]:
    """(mean (1024,), components (1024, 64)) of the 1,797 real digits' pixels, float64; each
    component's sign fixed so that its largest-magnitude entry is positive."""
    from .data import load_digits_tensors, to_uint8_rgb

    # the pixels as a scored image holds them: rounded to uint8, back to [-1, 1]
    x = to_uint8_rgb(load_digits_tensors()[0])[:, 0].double().div(127.5).sub(1).reshape(-1, IMAGE_SIZE**2)
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:PCA_COMPONENTS].T.contiguous()
    sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    return mean, comps * sign


def _pca_sha() -> str:
    mean, comps = pca_basis()
    return hashlib.sha256(mean.float().numpy().tobytes() + comps.float().numpy().tobytes()).hexdigest()


class PixelPCAExtractor(FeatureExtractorBase):
    """torch-fidelity extractor with no network: uint8 (B, 3, H, W) -> grayscale [-1, 1] at 32x32
    -> the coordinates on the real digits' top 64 principal components ("pca64")."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        mean, comps = pca_basis()
        self.register_buffer("mean", mean.float())
        self.register_buffer("comps", comps.float())

    def forward(self, x):
        check_uint8_images(self.name, x)
        g = DigitsJudge.prepare(x).reshape(x.shape[0], -1).to(self.mean.device)
        return ((g - self.mean) @ self.comps,)

    @staticmethod
    def get_provided_features_list():
        return ("pca64",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pca64"

    @staticmethod
    def can_be_compiled():
        return False

    get_dummy_input_for_compile = staticmethod(JudgeFeatureExtractor.get_dummy_input_for_compile)


# ----------------------------------------------------------------------------------------------
_CLASSES: dict[str, type] = {}


def _judge_class(name: str, weights: Path) -> type:
    if name == JUDGE_NAME:
        return JudgeFeatureExtractor
    if name not in _CLASSES:
        qual = "PanelJudge_" + name.removeprefix(JUDGE_NAME + "-").replace("-", "_")
        _CLASSES[name] = type(
            qual, (JudgeFeatureExtractor,), {"default_weights": weights, "__module__": __name__, "__qualname__": qual}
        )
    return _CLASSES[name]


def register_panel() -> list[str]:
    """Register every panel member with torch-fidelity (safe to call again); returns their names.
    Raises if a name is taken by another extractor."""
    from torch_fidelity.registry import (
        FEATURE_EXTRACTORS_REGISTRY,
        register_feature_extractor,
    )

    if PixelPCAExtractor.__dict__.get("weights_sha256") is None:
        PixelPCAExtractor.weights_sha256 = _pca_sha()  # read by fewstep.evaluation.scores.Extractor
    wanted = {name: _judge_class(name, w) for name, w in PANEL_JUDGES.items()}
    wanted[PIXEL_PCA] = PixelPCAExtractor
    for name, cls in wanted.items():
        have = FEATURE_EXTRACTORS_REGISTRY.get(name)
        if have is None:
            register_feature_extractor(name, cls)
        elif have is not cls:
            if (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"torch-fidelity feature extractor {name!r} is already registered as {have!r}")
            FEATURE_EXTRACTORS_REGISTRY[name] = cls  # a reloaded copy of this module
    return list(wanted)
