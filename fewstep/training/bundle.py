"""What the entry point needs from a teacher, whatever loaded it: the frozen Denoiser, latent
shape, conditioning kind, and the VAE / text-encoder hooks used for data and sample grids.

`load_bundle(cfg.teacher)` goes through `fewstep.pipeline_teacher.load_teacher`; tests and scripts may
build a `TeacherBundle` themselves (e.g. around `fewstep.testing.gmm_denoiser` or tests/tiny.py)
and pass it to `fewstep.training.run(cfg, teacher=...)`. `meta_bundle` builds the backbone from
its config on the meta device for `--dry-run` (no weights are read).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import Denoiser
from ..families import FAMILIES, family_by_name, family_name, is_text

__all__ = ["TeacherBundle", "load_bundle", "meta_bundle", "bundle_from_teacher", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherBundle:
    denoiser: Denoiser  # the frozen teacher
    latent_shape: tuple[int, ...]  # (C, H, W)
    source: str = "custom"
    family: str | None = None
    num_classes: int | None = None  # class-conditional: labels 0..num_classes-1
    null_class: int | None = None
    text: bool = False  # conditions come from encode_prompts
    encode_prompts: Callable[[list[str]], dict] | None = None
    decode: Callable[[Tensor], Tensor] | None = None  # latents -> images in [-1, 1]
    vae: nn.Module | None = None  # the teacher's VAE, when it has one (frozen; a pixel discriminator's backbone)
    real_data: Callable[[], tuple[Tensor, Tensor | None]] | None = None  # () -> (latents, labels)
    pair_cond: Callable[[Tensor, torch.Generator], dict] | None = None  # restoration: (indices into
    #   real_data's samples, generator) -> their condition (a fresh degraded image each draw)
    encode: Callable[[Tensor], Tensor] | None = None  # images in [-1, 1] -> latents (the VAE, scaled)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the images the VAE takes
    extra: dict[str, Any] = field(default_factory=dict)


def vae_decoder(vae: nn.Module) -> Callable[[Tensor], Tensor]:
    """latents (scaled as the VAE's config says) -> images in [-1, 1], without gradients."""
    from ..pipeline_teacher import vae_scale_shift

    scale, shift = vae_scale_shift(vae)

    @torch.no_grad()
    def decode(latents: Tensor) -> Tensor:
        dt = next(vae.parameters()).dtype
        z = latents.float() / scale + shift
        return vae.decode(z.to(dt)).sample.float().clamp(-1, 1)

    return decode


def _vae_encode(vae: nn.Module) -> Callable[[Tensor], Tensor]:
    from ..pipeline_teacher import vae_scale_shift

    scale, shift = vae_scale_shift(vae)

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        dt = next(vae.parameters()).dtype
        z = vae.encode(images.to(dt)).latent_dist.mean.float()
        return (z - shift) * scale

    return encode


def _digits_real_data(encode: Callable[[Tensor], Tensor], device) -> Callable[[], tuple[Tensor, Tensor]]:
    def real() -> tuple[Tensor, Tensor]:
        from ..digits.data import load_digits_tensors

        x, y = load_digits_tensors()
        lat = torch.cat([encode(x[i : i + 256].to(device)).cpu() for i in range(0, x.shape[0], 256)])
        return lat, y

    return real


def _image_shape(vae: nn.Module | None, latent_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(C, H, W) of the images `vae` turns into latents of `latent_shape` (its downsampling factor
    is 2 per encoder block after the first)."""
    if vae is None or len(latent_shape) != 3:
        return None
    cfg = getattr(vae, "config", {})
    blocks = cfg.get("block_out_channels")
    if not blocks:
        return None
    f = 2 ** (len(blocks) - 1)
    return (int(cfg.get("in_channels", 3)), int(latent_shape[1]) * f, int(latent_shape[2]) * f)


def bundle_from_teacher(t: Any, source: str, device) -> TeacherBundle:
    """Adapt what `fewstep.pipeline_teacher.load_teacher` (or `load_digits_teacher`) returns."""
    den = t.denoiser
    fam = getattr(t, "family", None) or family_name(den.backbone)
    vae = getattr(t, "vae", None)
    decode = getattr(t, "decode", None) or (vae_decoder(vae) if vae is not None else None)
    encode = getattr(t, "encode", None) or (_vae_encode(vae) if vae is not None else None)
    num_classes = getattr(t, "num_classes", None)
    null_class = getattr(t, "null_class", None)
    if null_class is None:
        null_class = getattr(den.conditioner, "null_class", None)
    if num_classes is None and str(source) in ("digits-vp", "digits-flow"):
        from ..digits.data import NUM_CLASSES

        num_classes = NUM_CLASSES
    record = family_by_name(fam) if fam in FAMILIES else None
    if num_classes is None and record is not None and record.num_classes is not None:
        num_classes = record.num_classes(den.backbone, null_class)
    text = is_text(fam) and hasattr(t, "encode_prompts")
    real = pair_cond = None
    if str(source) == "digits-restore":  # the train split's targets, degraded afresh at every draw
        from ..digits.restoration import training_pairs

        real, pair_cond = training_pairs()
    elif encode is not None and str(source).startswith("digits"):
        real = _digits_real_data(encode, device)
    latent_shape = tuple(int(s) for s in t.latent_shape)
    return TeacherBundle(
        denoiser=den,
        latent_shape=latent_shape,
        source=str(source),
        family=fam,
        num_classes=num_classes if not text else None,
        null_class=null_class,
        text=text,
        encode_prompts=getattr(t, "encode_prompts", None) if text else None,
        decode=decode,
        vae=vae,
        real_data=real,
        pair_cond=pair_cond,
        encode=encode,
        image_shape=_image_shape(vae, latent_shape),
        extra={"teacher": t},
    )


def load_bundle(tcfg: Any, device: torch.device | str = "cpu") -> TeacherBundle:
    """Load `teacher.source` through fewstep.pipeline_teacher and freeze it."""
    from ..pipeline_teacher import load_teacher

    kw: dict[str, Any] = {"device": device, "dtype": DTYPES[tcfg.dtype]}
    if tcfg.family is not None:
        kw["family"] = tcfg.family
    if tcfg.resolution is not None:
        kw["resolution"] = tcfg.resolution
    t = load_teacher(tcfg.source, **kw)
    b = bundle_from_teacher(t, tcfg.source, device)
    if tcfg.family is not None:
        b.family = tcfg.family
    return b


# ---------------------------------------------------------------------------------------------
# meta-device teachers for --dry-run
# ---------------------------------------------------------------------------------------------
_BACKBONE_KEYS = ("transformer", "unet")


def _pipeline_folder(source: str) -> Path:
    p = Path(source)
    if source in ("digits-vp", "digits-flow", "digits-restore"):
        from ..digits.data import WEIGHTS_DIR

        p = WEIGHTS_DIR / {"digits-vp": "teacher_vp", "digits-flow": "teacher_flow"}.get(source, "restoration_teacher")
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(
                f"teacher.source={source!r}: the embedded teacher folder {p} has no model_index.json"
            )
        return p
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(
                f"teacher.source={source!r}: {p} has no model_index.json (not a diffusers pipeline folder)"
            )
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.json", "*.txt"]))
    except Exception as e:
        raise FileNotFoundError(
            f"teacher.source={source!r}: not a local folder, and its config files are not in the Hugging Face "
            f"cache ({type(e).__name__}). --dry-run needs model_index.json and the backbone's config.json: "
            "download the pipeline (or just its *.json files) first, or point teacher.source at a local folder"
        ) from None


def meta_bundle(tcfg: Any) -> TeacherBundle:
    """The teacher's backbone built from its config on the meta device (no weights read)."""
    import diffusers

    from ..paths import path_from_scheduler_config

    folder = _pipeline_folder(tcfg.source)
    index = json.loads((folder / "model_index.json").read_text())
    key = next((k for k in _BACKBONE_KEYS if k in index), None)
    if key is None:
        raise ValueError(f"teacher.source={tcfg.source!r}: model_index.json names no 'transformer' or 'unet'")
    cls = getattr(diffusers, index[key][1])
    config = cls.load_config(str(folder / key))
    with torch.device("meta"):
        backbone = cls.from_config(config)
    backbone.to(DTYPES[tcfg.dtype])
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    path = path_from_scheduler_config(sched)
    fam = tcfg.family or family_name(backbone)
    record = family_by_name(fam) if fam in FAMILIES else None
    patch = record.latent_patch if record is not None else 1
    den = Denoiser(backbone, path)
    den.requires_grad_(False)
    # latent shape: the backbone's channels and sample size (or the resolution over the VAE factor)
    c = (
        int(config.get("in_channels", 4))
        // (patch * patch)
        // (2 if record is not None and record.image_conditioned else 1)
    )
    size = config.get("sample_size", 64)
    vae_cfg_file = folder / "vae" / "config.json"
    if tcfg.resolution is not None and vae_cfg_file.is_file():
        vcfg = json.loads(vae_cfg_file.read_text())
        size = int(tcfg.resolution) // (2 ** (len(vcfg.get("block_out_channels", [0, 0, 0, 0])) - 1))
    if record is not None and record.default_latent_size is not None and tcfg.resolution is None:
        size = record.default_latent_size
    num_classes = None
    if record is not None and not record.text and record.num_classes is not None:
        num_classes = 10 if str(tcfg.source) in ("digits-vp", "digits-flow") else record.num_classes(backbone, None)
    return TeacherBundle(
        denoiser=den,
        latent_shape=(c, int(size), int(size)),
        source=tcfg.source,
        family=fam,
        num_classes=num_classes,
        text=is_text(fam),
        extra={"components": {k: v for k, v in index.items() if not k.startswith("_")}},
    )
