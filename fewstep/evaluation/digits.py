"""The embedded default's scores: the real digits as the reference, class accuracy read by the
digits judge, and `digits_scores` (FID + class accuracy from one pass of the judge).

    digits_reference(extractor)         all 1,797 real digits' features (cached on disk)
    class_accuracy(images, labels)      share of float images the judge reads as their label
    digits_scores(images, labels)       {"fid", "class_acc", "n"}
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .inputs import InputError, TensorImages
from .scores import Extractor, ReferenceFeatures, fidelity_from_features

__all__ = ["class_accuracy", "digits_reference", "digits_scores", "digits_uint8"]


@lru_cache(maxsize=1)
def digits_uint8() -> Tensor:
    """All 1,797 real digits, 32x32, as uint8 RGB (N, 3, 32, 32)."""
    from ..digits.data import load_digits_tensors, to_uint8_rgb

    return to_uint8_rgb(load_digits_tensors()[0])


def digits_reference(extractor: Extractor, use_cache: bool = True, root: str | Path | None = None) -> ReferenceFeatures:
    """The real digits' features in `extractor`, cached under its weights' sha256."""
    from ..digits.data import IMAGE_SIZE

    imgs = TensorImages(digits_uint8())
    return ReferenceFeatures.compute(
        imgs,
        extractor,
        {"kind": "digits", "count": len(imgs), "size": IMAGE_SIZE},
        {"kind": "digits", "count": len(imgs), "what": "all 1,797 scikit-learn digits at 32x32"},
        use_cache=use_cache,
        root=root,
    )


def _check_float_images(images: Tensor, fn: str) -> None:
    ok = torch.is_tensor(images) and images.is_floating_point() and images.dim() == 4 and images.shape[1] in (1, 3)
    if not ok:
        desc = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise InputError(f"{fn}: expected float images in [-1, 1] of shape (B, 1 or 3, H, W), got {desc}")


def _labels(labels, n: int, fn: str) -> Tensor:
    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    if labels.shape[0] != n:
        raise InputError(f"{fn}: {n} images but {labels.shape[0]} labels")
    return labels


@lru_cache(maxsize=4)
def _judge(path: str | None):
    from ..digits.judge import load_judge

    return load_judge(path)


@torch.no_grad()
def class_accuracy(images: Tensor, labels: Tensor, judge=None) -> float:
    """Share of `images` (float, [-1, 1], (B, 1 or 3, 32, 32)) that the judge (default the
    project's) labels as `labels` (B,)."""
    _check_float_images(images, "class_accuracy")
    labels = _labels(labels, images.shape[0], "class_accuracy")
    if images.shape[0] == 0:
        raise InputError("class_accuracy: no images")
    judge = judge if judge is not None else _judge(None)
    pred = judge.predict(images.detach().float().cpu())
    return (pred == labels).float().mean().item()


def digits_scores(
    images: Tensor, labels: Tensor | None, cache_dir: str | Path | None = None, weights: str | None = None
) -> dict[str, Any]:
    """FID (digits-judge features against all 1,797 real digits) and class accuracy, from one
    pass of the judge over the images quantised to uint8 as a saved image would be.

    Args:
        images: float (B, 1, 32, 32) in [-1, 1].
        labels: (B,) requested classes, or None for unconditional samples (class_acc is then nan).
        weights: another judge file (default the project's).

    Returns:
        {"fid": float, "class_acc": float, "n": int}
    """
    from ..digits.data import to_uint8_rgb

    _check_float_images(images, "digits_scores")
    if labels is not None:
        labels = _labels(labels, images.shape[0], "digits_scores")
    ext = Extractor(weights=weights, extra_layers=("logits",)).check()
    feats = ext.features(TensorImages(to_uint8_rgb(images.detach().float().cpu())))
    fid = fidelity_from_features(feats, digits_reference(ext, root=cache_dir), ext)["fid"]
    acc = (feats["logits"].argmax(1) == labels).float().mean().item() if labels is not None else float("nan")
    return {"fid": fid, "class_acc": acc, "n": int(images.shape[0])}
