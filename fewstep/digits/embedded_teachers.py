"""Load the embedded digits teachers (trained by `train/train_teacher.py`, shipped as stock DiTPipeline
folders under fewstep/digits/weights/).

    teacher = load_digits_teacher("vp")          # or "flow"
    noise = torch.randn(8, *teacher.latent_shape)
    y = torch.arange(8) % 10
    z0 = sample(teacher.denoiser, noise, {"class_labels": y}, teacher.path.sampling_times(50), guidance=w)
    images = teacher.decode(z0)                  # (8, 1, 32, 32) in [-1, 1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..paths import Path as NoisePath
from ..paths import path_from_scheduler_config
from .data import NUM_CLASSES, WEIGHTS_DIR
from .models import LATENT_SHAPE, NULL_CLASS

__all__ = ["DigitsTeacher", "load_digits_teacher", "teacher_dir", "teacher_card", "TEACHER_KINDS"]

TEACHER_KINDS = ("vp", "flow")
_REQUIRED = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)


@dataclass
class DigitsTeacher:
    """A trained digits teacher: the fewstep Denoiser over its latent DiT, plus its VAE."""

    denoiser: Denoiser
    vae: torch.nn.Module
    kind: str
    pipeline_dir: Path
    latent_shape: tuple[int, int, int] = LATENT_SHAPE
    num_classes: int = NUM_CLASSES
    null_class: int = NULL_CLASS

    @property
    def path(self) -> NoisePath:
        return self.denoiser.path

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 4, 8, 8) scaled latents -> (B, 1, 32, 32) float32 images in [-1, 1]."""
        if latents.ndim != 4 or tuple(latents.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(
                f"decode: latents must have shape (B, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(latents.shape)}"
            )
        p = next(self.vae.parameters())
        x = self.vae.decode(latents.to(p) / self.scaling_factor).sample
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 1, 32, 32) images in [-1, 1] -> (B, 4, 8, 8) latents: the posterior mean times
        scaling_factor (what the teacher was trained on)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"encode: images must have shape (B, 1, H, W), got {tuple(images.shape)}")
        p = next(self.vae.parameters())
        return self.vae.encode(images.to(p)).latent_dist.mean.float() * self.scaling_factor

    def to(self, device) -> DigitsTeacher:
        self.denoiser.to(device)
        self.vae.to(device)
        return self


def teacher_dir(kind: str) -> Path:
    if kind not in TEACHER_KINDS:
        raise ValueError(f"digits teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    return WEIGHTS_DIR / f"teacher_{kind}"


def teacher_card(kind: str) -> dict:
    """The JSON card of a teacher (training command, seed, steps, wall time, scores)."""
    cards_file = WEIGHTS_DIR / "teachers.json"
    if not cards_file.is_file():
        raise FileNotFoundError(f"no teacher cards at {cards_file}")
    cards = json.loads(cards_file.read_text())
    if kind not in cards:
        raise KeyError(f"{cards_file} has no card for kind {kind!r} (has {sorted(cards)})")
    return cards[kind]


def load_digits_teacher(
    kind: str = "vp", device: str | torch.device = "cpu", pipeline_dir: str | Path | None = None
) -> DigitsTeacher:
    """Load a digits teacher with `DiTPipeline.from_pretrained` (safetensors only), so the
    networks are exactly what a user's pipeline loads.

    Args:
        kind:         "vp" (DDIM, epsilon prediction) or "flow" (flow matching, Euler).
        device:       where to put the networks (kept in float32).
        pipeline_dir: another DiTPipeline folder of the same layout (default: the shipped one).
    """
    from diffusers import DiTPipeline

    folder = Path(pipeline_dir) if pipeline_dir is not None else teacher_dir(kind)
    missing = [f for f in _REQUIRED if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"digits teacher {kind!r}: the pipeline folder {folder} is missing {', '.join(missing)}; "
            f"train it with `python train/train_teacher.py --kind {kind} --out {folder}`"
        )
    pipe = DiTPipeline.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    path = path_from_scheduler_config(dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__))
    want = "flow" if kind == "flow" else "epsilon"
    if path.prediction_type != want:
        raise ValueError(
            f"digits teacher {kind!r} at {folder}: its scheduler {type(pipe.scheduler).__name__} "
            f"gives prediction type {path.prediction_type!r}, expected {want!r}"
        )
    transformer = pipe.transformer.to(device).requires_grad_(False)
    vae = pipe.vae.to(device).eval().requires_grad_(False)
    denoiser = Denoiser(transformer, path, null_class=NULL_CLASS)
    return DigitsTeacher(denoiser=denoiser, vae=vae, kind=kind, pipeline_dir=folder)
