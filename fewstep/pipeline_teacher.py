"""Teachers from diffusers pipeline folders (or the embedded digits teachers).

    teacher = load_teacher("/models/sdxl-base")            # a local pipeline folder
    cond = teacher.encode_prompts(["a photo of a cat"])
    x0 = teacher.denoiser(noise, 1.0, cond, guidance=5.0)
    images = teacher.decode(x0)                             # (B, 3, H, W) in [-1, 1]

The noise path comes from the pipeline's scheduler config; the conditioner, the prompt encoding
and the null conditioning of classifier-free guidance from the family record
(`fewstep.families`), which follows each pipeline's own practice:
the encoding of "" for SD1.5/SD2, PixArt, SD3 and Flux; zeros for SDXL (its
`force_zeros_for_empty_prompt`). Hub ids are accepted, but only from the local cache
(`local_files_only=True`): nothing is downloaded here. Weights load from safetensors only, and
never with remote code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .conditioning import Cond, conditioner_for
from .denoiser import Denoiser
from .families import backbone_of, family_by_name, family_of_pipeline
from .paths import path_from_scheduler_config

__all__ = ["Teacher", "load_teacher", "teacher_from_pipeline", "vae_scale_shift", "DIGITS_TEACHERS"]

DIGITS_TEACHERS = ("digits-vp", "digits-flow", "digits-restore")


@dataclass
class Teacher:
    """A loaded teacher: the denoiser and what turns prompts and latents into its inputs/outputs.

    Attributes:
        denoiser:       `Denoiser` (backbone + path + conditioner with the null conditioning).
        vae:            the pipeline's VAE, or None for pixel-space teachers.
        latent_shape:   (C, H, W) of one sample at the configured resolution.
        family:         a family name (`fewstep.families.FAMILIES`).
        pipeline_class: the diffusers pipeline class name (what an exported student reuses).
        pipeline_dir:   the folder it was loaded from (None when built in memory).
        pipeline:       the diffusers pipeline object (text encoders, tokenizers, scheduler).
    """

    denoiser: Denoiser
    vae: nn.Module | None
    latent_shape: tuple[int, int, int]
    family: str
    pipeline_class: str
    pipeline_dir: str | None = None
    pipeline: Any = field(default=None, repr=False)
    max_sequence_length: int | None = None  # T5 length for PixArt / SD3 / Flux (pipeline default when None)

    @property
    def path(self):
        return self.denoiser.path

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.backbone.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return _vae_scale_factor(self.vae)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of a decoded sample in pixels."""
        s = 1 if self.vae is None else self.vae_scale_factor
        return self.latent_shape[1] * s, self.latent_shape[2] * s

    # ---- conditioning ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str | int]) -> Cond:
        """Condition for a list of prompts (text families) or class labels / names (DiT, class UNet).

        Text is encoded with the pipeline's own `encode_prompt`; outputs are float32 on the
        teacher's device, batch first."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        fam = family_by_name(self.family)
        if not fam.text:
            return {"class_labels": self._labels(prompts)}
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError(f"{self.family} teacher: prompts must be strings, got {prompts!r}")
        return fam.encode_prompts(self, prompts)

    def null_cond(self, batch_size: int) -> Cond:
        """The unconditional condition (what guidance pushes away from) for `batch_size` samples."""
        if not family_by_name(self.family).text:
            null = getattr(self.denoiser.conditioner, "null_class", None)
            if null is None:
                raise ValueError(f"{self.pipeline_class}: this teacher has no null class")
            return {"class_labels": torch.full((batch_size,), int(null), dtype=torch.long, device=self.device)}
        ref = self.encode_prompts([""] * batch_size)
        return self.denoiser.conditioner.null(ref, batch_size)

    def _labels(self, prompts: Sequence[str | int]) -> Tensor:
        ids = []
        names = getattr(self.pipeline, "labels", None) or {}
        for p in prompts:
            if isinstance(p, int) or (isinstance(p, str) and p.strip().isdigit()):
                ids.append(int(p))
            elif isinstance(p, str) and p.strip() in names:
                ids.append(int(names[p.strip()]))
            else:
                known = ", ".join(list(names)[:10]) or "integer class ids"
                raise ValueError(f"{self.pipeline_class}: unknown class {p!r}; give an integer id or one of: {known}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # ---- latents <-> images ----------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, H, W) -> images (B, C_img, H*f, W*f) float32 in [-1, 1] (clamped).
        Undoes the VAE's scaling (and SD3/Flux shift) factor as the pipelines do."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        cfg = self.vae.config
        z = latents.float() / float(cfg.get("scaling_factor") or 1.0)
        if cfg.get("shift_factor") is not None:
            z = z + float(cfg["shift_factor"])
        vdt = next(self.vae.parameters()).dtype
        img = self.vae.decode(z.to(self.device, vdt)).sample
        return img.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (a sample of the VAE posterior; its mean when
        `generator` is None)."""
        if self.vae is None:
            return images.float()
        cfg = self.vae.config
        vdt = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(self.device, vdt)).latent_dist
        z = (dist.mean if generator is None else dist.sample(generator)).float()
        if cfg.get("shift_factor") is not None:
            z = z - float(cfg["shift_factor"])
        return z * float(cfg.get("scaling_factor") or 1.0)


def vae_scale_shift(vae: Any) -> tuple[float, float]:
    """(scale, shift) of a diffusers VAE's latents, latents = (z - shift) * scale: its config's
    scaling_factor and shift_factor (SD3 / Flux), 1 and 0 where unset."""
    cfg = getattr(vae, "config", {})
    return float(cfg.get("scaling_factor", 1.0) or 1.0), float(cfg.get("shift_factor", 0.0) or 0.0)


# ---- loading -------------------------------------------------------------------------------
def _vae_scale_factor(vae: nn.Module | None) -> int:
    if vae is None:
        return 8
    cfg = vae.config  # AutoencoderTiny (a distilled decoder) names its levels per half
    return 2 ** (len(cfg.get("block_out_channels") or cfg.get("decoder_block_out_channels")) - 1)


def _latent_shape(pipe, family: str, backbone: nn.Module, vae, resolution) -> tuple[int, int, int]:
    fam = family_by_name(family)
    p = fam.latent_patch
    f = _vae_scale_factor(vae) if vae is not None else 1
    cfg = backbone.config
    channels = int(cfg.in_channels) // (p * p) // (2 if fam.image_conditioned else 1)
    if resolution is None:
        if fam.default_latent_size is not None:  # e.g. FluxPipeline: default_sample_size * vae_scale_factor
            size = getattr(pipe, "default_sample_size", fam.default_latent_size) * f
        else:
            size = int(cfg.sample_size) * f
        resolution = (size, size)
    elif isinstance(resolution, int):
        resolution = (resolution, resolution)
    h, w = (int(resolution[0]) // f, int(resolution[1]) // f)
    if p > 1:  # packed into p x p patches, rounded as the pipeline rounds (Flux)
        h, w = p * (h // p), p * (w // p)
    if h < 1 or w < 1:
        raise ValueError(f"resolution {resolution} is smaller than one latent pixel (VAE factor {f})")
    return channels, h, w


def _scheduler_config(pipe, family: str, latent_shape) -> dict:
    """The scheduler config, with Flux's resolution-dependent shift resolved to a number
    (mu as FluxPipeline computes it from the image token count; shift = exp(mu))."""
    cfg = dict(pipe.scheduler.config)
    cfg.setdefault("_class_name", type(pipe.scheduler).__name__)
    if cfg.get("use_dynamic_shifting", False):
        p = family_by_name(family).latent_patch
        seq_len = (
            (latent_shape[1] // p) * (latent_shape[2] // p)
            if p > 1
            else latent_shape[1]
            * latent_shape[2]
            // max(1, int(getattr(backbone_of(pipe).config, "patch_size", 1) or 1) ** 2)
        )
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = seq_len * m + (base_shift - m * base_len)
        kind = cfg.get("time_shift_type", "exponential")
        # exponential: sigma' = e^mu / (e^mu + 1/sigma - 1), the shift k = e^mu; linear: k = mu
        cfg["resolved_shift"] = math.exp(mu) if kind == "exponential" else float(mu)
    return cfg


def teacher_from_pipeline(
    pipe,
    family: str | None = None,
    pipeline_dir: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    max_sequence_length: int | None = None,
    null_class: int | None = None,
) -> Teacher:
    """Wrap a loaded diffusers pipeline as a Teacher (also used for pipelines built in memory).

    resolution: image size in pixels (int or (height, width)); the pipeline's default when None.
    max_sequence_length: T5 token length for PixArt / SD3 / Flux (pipeline default when None).
    null_class: override the unconditional class of a class-conditional UNet2DModel (the last
    class embedding by default)."""
    fam = family or family_of_pipeline(pipe).name
    family_by_name(fam)  # a clear error for an unknown name
    backbone = backbone_of(pipe)
    vae = getattr(pipe, "vae", None)
    shape = _latent_shape(pipe, fam, backbone, vae, resolution)
    path = path_from_scheduler_config(_scheduler_config(pipe, fam, shape))
    # a placeholder conditioner first: the null conditioning is computed through the teacher
    den = Denoiser(backbone, path, conditioner_for(backbone))
    t = Teacher(den, vae, shape, fam, type(pipe).__name__, pipeline_dir, pipe, max_sequence_length)
    kw = family_by_name(fam).null_kwargs(t)
    if null_class is not None:
        kw["null_class"] = null_class
    t.denoiser.conditioner = conditioner_for(backbone, **kw)
    backbone.requires_grad_(False)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval()
    return t


def _read_model_index(folder: str) -> dict:
    f = os.path.join(folder, "model_index.json")
    if not os.path.isfile(f):
        raise ValueError(f"{folder!r} is not a diffusers pipeline folder: it has no model_index.json")
    with open(f) as fh:
        return json.load(fh)


def _load_digits(name: str, device, dtype, **kw) -> Teacher:
    """The embedded digits teachers: the DiTPipeline folders shipped in
    fewstep/digits/weights/teacher_<kind> (kind "vp" or "flow"), loaded like any pipeline folder."""
    from .digits.data import WEIGHTS_DIR

    kind = name.split("-", 1)[1]
    folder = WEIGHTS_DIR / ("restoration_teacher" if kind == "restore" else f"teacher_{kind}")
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"the embedded teacher {name!r} has no weights: {folder}/model_index.json is missing "
            "(train it with train/train_teacher.py, see fewstep/digits/weights/teachers.json)"
        )
    family = "restore" if kind == "restore" else "dit"
    return load_teacher(str(folder), family=family, device=device, dtype=dtype, **kw)


def load_teacher(
    source: str,
    family: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kw: Any,
) -> Teacher:
    """Load a teacher from a local diffusers pipeline folder, a hub id already in the local cache,
    or "digits-vp" / "digits-flow" (the embedded teachers).

    Args:
        source: folder, hub id or embedded name.
        family: a family name (`fewstep.families.FAMILIES`); inferred from the pipeline class when omitted.
        device, dtype: where and in which precision the networks live (the VAE stays float32
            when its config asks for `force_upcast`, as the SDXL VAE does).
        kw: `resolution`, `max_sequence_length`, `null_class` (see `teacher_from_pipeline`),
            `variant` (e.g. "fp16" weight files).
    """
    if family is not None:
        family_by_name(family)  # a clear error for an unknown name
    if source in DIGITS_TEACHERS:
        return _load_digits(source, device, dtype, **kw)
    from diffusers import DiffusionPipeline

    variant = kw.pop("variant", None)
    unknown = set(kw) - {"resolution", "max_sequence_length", "null_class"}
    if unknown:
        raise ValueError(f"load_teacher: unknown arguments {sorted(unknown)}")
    load_kw: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    if variant is not None:
        load_kw["variant"] = variant
    is_dir = os.path.isdir(source)
    if is_dir:
        index = _read_model_index(source)
        if "safety_checker" in index:  # not needed for distillation; skips loading a classifier
            load_kw.update(safety_checker=None, requires_safety_checker=False)
    elif os.path.exists(source) or source.startswith((".", "/", "~")):
        raise ValueError(
            f"teacher {source!r} is not a folder: give a diffusers pipeline folder "
            f"(with model_index.json), a hub id, or one of {DIGITS_TEACHERS}"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **load_kw)
    except OSError as e:
        if is_dir:
            raise ValueError(
                f"could not load the pipeline folder {source!r} (fewstep loads safetensors weights only): {e}"
            ) from e
        raise ValueError(
            f"teacher {source!r} is not a local folder and is not in the local Hugging Face "
            f"cache; nothing is downloaded here: download it first (e.g. `huggingface-cli "
            f"download {source}`) or pass its local folder"
        ) from e
    except ValueError as e:
        if "safetensors" in str(e).lower() or "use_safetensors" in str(e):
            raise ValueError(f"teacher {source!r}: fewstep loads safetensors weights only: {e}") from e
        raise
    pipe.to(device)
    vae = getattr(pipe, "vae", None)
    if vae is not None and vae.config.get("force_upcast", False) and dtype != torch.float32:
        vae.to(torch.float32)
    t = teacher_from_pipeline(pipe, family, source if is_dir else None, **kw)
    return t
