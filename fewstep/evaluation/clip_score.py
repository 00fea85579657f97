"""CLIP score of generated images against their captions, from a local CLIP model folder
(torchmetrics' CLIPScore; nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .inputs import InputError
from .protocols import file_sha256

__all__ = ["ClipScorer"]


class _ClipFeatures(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embedding
    tensors: transformers 5 returns output objects there, which torchmetrics 1.9 cannot norm."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScorer:
    """CLIP score through torchmetrics' `CLIPScore`, with the model and processor loaded from a
    local folder (`CLIPModel.from_pretrained(dir, local_files_only=True)`): max(100 * mean cosine
    similarity of image and caption embeddings, 0)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", prefix: str = ""):
        d = Path(model_dir)
        if not d.is_dir() or not (d / "config.json").is_file():
            raise InputError(
                f"CLIP model folder {d} not found or has no config.json (--clip-model); nothing is downloaded"
            )
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        def load():
            try:
                model = CLIPModel.from_pretrained(str(d), local_files_only=True).eval()
                return _ClipFeatures(model), CLIPProcessor.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot load a CLIP model and processor from {d} (--clip-model): {e}") from e

        self.model_dir = str(d)
        self.prefix = prefix
        self.metric = CLIPScore(model_name_or_path=load).to(device)
        cfg = self.metric.model.config
        weights = [p for p in sorted(d.iterdir()) if p.suffix in (".safetensors", ".bin")]
        self.weights_sha256 = file_sha256(weights[0]) if len(weights) == 1 else "unknown"
        self.name = str(getattr(cfg, "_name_or_path", "") or d.name)

    @torch.no_grad()
    def __call__(self, images: Tensor, captions: Sequence[str], batch_size: int = 64) -> float:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images for {len(captions)} captions")
        self.metric.reset()
        dev = self.metric.device
        for i in range(0, images.shape[0], batch_size):
            caps = [self.prefix + c for c in captions[i : i + batch_size]]
            self.metric.update(images[i : i + batch_size].to(dev), caps)
        return float(self.metric.compute())

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "torchmetrics CLIPScore",
            "model_dir": self.model_dir,
            "weights_sha256": self.weights_sha256,
            "prefix": self.prefix,
        }
