"""Differentiable rewards for Flash-DMD's reward phase.

A reward is any callable

    reward(x, cond) -> (B,) tensor, differentiable in x; higher is better

with two attributes: `name` (for logs and errors) and `input` ("images": x is decoded images in
[-1, 1], (B, C, H, W); "latents": x is the student's x0 latents). `cond` is the batch's condition
dict; for text teachers it also carries "prompts" (the caption strings) when the batch has them.

Shipped:
- `DigitsClassReward` ("digits_class"): log-probability of the requested class under the digits
  reward classifier (fewstep/digits/weights/reward_classifier.safetensors, made by
  `train/reward_classifier.py`). It is NOT the evaluation judge: a student tuned on a reward learns
  that network's blind spots too, so the network that scores runs (the digits judge) must be a
  different one, or the score would measure the hacking. The reward classifier has another seed,
  width and feature size than the judge.
- `ClipReward` ("clip"): 100 x cosine similarity of CLIP image and caption embeddings, with the
  model the evaluation harness loads (`fewstep.evaluation.scores.ClipScorer`, a local folder only),
  made differentiable (the harness's own preprocessing goes through PIL-like steps).

`make_reward(name, model_path)` builds one from a preset; `module.path:factory` names any other
factory (called with `model_path` when given), so a user reward needs no edit here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import import_factory

__all__ = ["DigitsClassReward", "ClipReward", "make_reward", "differentiable_decode", "REWARD_CLASSIFIER_WEIGHTS"]


def _weights_dir() -> Path:
    from ..digits.data import WEIGHTS_DIR

    return Path(WEIGHTS_DIR)


REWARD_CLASSIFIER_WEIGHTS = "reward_classifier.safetensors"


class DigitsClassReward(nn.Module):
    """log p(requested class | image) under the digits reward classifier (not a judge)."""

    name = "digits_class"
    input = "images"

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        from ..digits.judge import JUDGE_WEIGHTS, load_judge

        path = Path(path) if path is not None else _weights_dir() / REWARD_CLASSIFIER_WEIGHTS
        if path.resolve() == Path(JUDGE_WEIGHTS).resolve():
            raise ValueError(
                f"objective.reward_model={path}: that is the evaluation judge; a reward must be a "
                "different network (use the reward classifier, train/reward_classifier.py)"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"objective.reward_model: digits reward classifier not found: {path} (create it "
                "with `python train/reward_classifier.py`)"
            )
        self.classifier = load_judge(path)  # same architecture family; frozen, eval mode

    def forward(self, images: Tensor, cond: dict | None) -> Tensor:
        labels = None if cond is None else cond.get("class_labels")
        if labels is None:
            raise ValueError("reward 'digits_class' needs class labels in the condition (cond['class_labels'])")
        self.classifier.to(images.device)
        logp = F.log_softmax(self.classifier.logits(images).float(), dim=1)
        return logp.gather(1, labels.long().view(-1, 1).to(logp.device))[:, 0]


class ClipReward(nn.Module):
    """100 x cos(CLIP image embedding, caption embedding), differentiable in the images."""

    name = "clip"
    input = "images"

    def __init__(self, model_dir: str | Path | None, device: str | torch.device = "cpu"):
        super().__init__()
        if not model_dir:
            raise ValueError(
                "objective.reward=clip needs objective.reward_model: a local CLIP model folder (the one "
                "the evaluation harness uses with --clip-model); nothing is downloaded"
            )
        from ..evaluation.clip_score import ClipScorer

        scorer = ClipScorer(model_dir, device=str(device))  # the harness's loader: a clear error if absent
        self.clip = scorer.metric.model.requires_grad_(False).eval()
        self.processor = scorer.metric.processor
        ip = self.processor.image_processor
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {"height": 224, "width": 224}
        self.size = (
            int(size.get("height", size.get("shortest_edge", 224))),
            int(size.get("width", size.get("shortest_edge", 224))),
        )
        self.register_buffer("mean", torch.tensor(ip.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor, cond: dict | None) -> Tensor:
        prompts = None if cond is None else cond.get("prompts")
        if prompts is None:
            raise ValueError(
                "reward 'clip' needs the caption strings (cond['prompts']); the batch carries them "
                "for text teachers trained on data.prompts"
            )
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        dev = next(self.clip.parameters()).device
        x = ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(dev)
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        img = self.clip.get_image_features(pixel_values=x)
        with torch.no_grad():
            txt = self.clip.get_text_features(**{k: v.to(dev) for k, v in tok.items()})
        return 100 * F.cosine_similarity(img.float(), txt.float(), dim=-1)


def make_reward(name: str, model_path: str | None = None, device: Any = "cpu") -> Callable[[Tensor, Any], Tensor]:
    """A reward from a preset's `objective.reward` / `objective.reward_model`."""
    if name == "digits_class":
        return DigitsClassReward(model_path)
    if name == "clip":
        return ClipReward(model_path, device)
    if ":" in name:
        factory = import_factory("objective.reward", name)
        r = factory(model_path) if model_path is not None else factory()
        if not callable(r):
            raise ValueError(f"objective.reward={name!r}: the factory returned {type(r).__name__}, not a callable")
        return r
    raise ValueError(f"objective.reward={name!r} is not one of 'digits_class', 'clip' or 'module.path:factory'")


def differentiable_decode(decode: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor] | None:
    """The VAE decoders of the teachers run under @torch.no_grad (sampling and evaluation need no
    graph); a reward on images needs the gradient through the decoder, so call the function that
    decorator wraps."""
    if decode is None:
        return None
    if inspect.ismethod(decode):
        inner = getattr(decode.__func__, "__wrapped__", None)
        return functools.partial(inner, decode.__self__) if inner is not None else decode
    return getattr(decode, "__wrapped__", decode)
