"""Real latents for training, read by index, whatever holds them, and the prompts that go with them.

    real = real_data_for(cfg.data, bundle, device)    # None when the run uses no real data
    x0 = real.latents(torch.tensor([5, 2]))           # (2, C, H, W) float32 on the CPU
    prompts = prompts_for(cfg.data, real)             # list[str] | None

Where the latents come from (`data:` keys, see configs/README.md):
- `source: folder | webdataset | datasets`: the images, encoded on the fly with the teacher's VAE
  (each process encodes only its own slice of the batch);
- `source: cache`: a latent cache written by `fewstep encode` (fewstep/data/cache.py);
- `real_latents`: one safetensors file with "latents" (and optional "class_labels");
- `real_data: true` alone: the embedded digits through the teacher's VAE.
Prompts (text teachers): `data.prompts` (a file, one prompt a line, or a saved `datasets` folder
with `data.prompt_column`), else the captions of the real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from .cache import LatentCache
from .images import ImageTable, load_saved_dataset, open_images, to_model_input

__all__ = ["RealData", "TensorData", "EncodedImages", "CachedLatents", "real_data_for", "prompts_for"]

IMAGE_SOURCES = ("folder", "webdataset", "datasets")


class RealData:
    """Real latents by index: `len(real)`, `real.latents(idx)`, `real.labels` ((N,) int64 or None),
    `real.captions` (list[str] or None), `real.num_classes` (from the data, or None)."""

    labels: Tensor | None = None
    captions: list[str] | None = None
    num_classes: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def latents(self, idx: Tensor) -> Tensor:
        raise NotImplementedError


class TensorData(RealData):
    """Latents held in memory (a real_latents file, the embedded digits)."""

    def __init__(self, x0: Tensor, labels: Tensor | None = None, captions: list[str] | None = None):
        self.x0 = x0.detach().float().cpu()
        self.labels = None if labels is None else labels.long().cpu()
        self.captions = captions

    def __len__(self) -> int:
        return self.x0.shape[0]

    def latents(self, idx: Tensor) -> Tensor:
        return self.x0[idx.cpu()]


class CachedLatents(RealData):
    """A latent cache written by `fewstep encode`."""

    def __init__(self, folder: str | Path, teacher: str, latent_shape: tuple[int, ...], key: str = "data.path"):
        self.cache = LatentCache(folder, key)
        if tuple(self.cache.latent_shape) != tuple(latent_shape):
            raise ConfigError(
                f"{key}={str(folder)!r}: the cache holds latents {self.cache.latent_shape}, this teacher's are "
                f"{tuple(latent_shape)}"
            )
        if self.cache.teacher != str(teacher):
            raise ConfigError(
                f"{key}={str(folder)!r}: the cache was encoded with the VAE of teacher {self.cache.teacher!r}, "
                f"not teacher.source={teacher!r}; encode the images with this teacher"
            )
        self.labels, self.captions, self.num_classes = self.cache.labels, self.cache.captions, self.cache.num_classes

    def __len__(self) -> int:
        return len(self.cache)

    def latents(self, idx: Tensor) -> Tensor:
        return self.cache.latents(idx.cpu())


class EncodedImages(RealData):
    """Images encoded with the teacher's VAE when a batch asks for them (the same preprocessing
    and encoder as `fewstep encode`, so the latents equal the cache's up to float rounding)."""

    def __init__(self, table: ImageTable, encode, image_shape: tuple[int, int, int], device, chunk: int = 64):
        self.table, self.encode, self.device, self.chunk = table, encode, torch.device(device), int(chunk)
        self.channels, self.size = int(image_shape[0]), int(image_shape[1])
        self.labels = None if table.labels is None else torch.tensor(table.labels, dtype=torch.long)
        self.captions = table.captions
        self.num_classes = table.num_classes

    def __len__(self) -> int:
        return len(self.table)

    def latents(self, idx: Tensor) -> Tensor:
        ids = [int(i) for i in idx.tolist()]
        out = []
        for a in range(0, len(ids), self.chunk):
            x = torch.stack(
                [to_model_input(self.table.image(i), self.size, self.channels) for i in ids[a : a + self.chunk]]
            )
            with torch.no_grad():
                out.append(self.encode(x.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)


def _read_latents_file(path: str | Path, latent_shape) -> TensorData:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.real_latents={str(p)!r}: no such file")
    d = load_file(str(p))
    if "latents" not in d:
        raise ConfigError(f"data.real_latents: {str(p)!r} has no 'latents' tensor (keys: {sorted(d)})")
    x0 = d["latents"].float()
    if x0.ndim != 4 or tuple(x0.shape[1:]) != tuple(latent_shape):
        raise ConfigError(
            f"data.real_latents: 'latents' has shape {tuple(x0.shape)}, expected (N, "
            f"{', '.join(map(str, latent_shape))}) for this teacher"
        )
    return TensorData(x0, d.get("class_labels"))


def real_data_for(data: Any, bundle: Any, device: torch.device | str = "cpu") -> RealData | None:
    """The real data a `data:` section asks for, for this teacher (None: none)."""
    if data.source in IMAGE_SOURCES:
        if bundle.encode is None or bundle.image_shape is None:
            raise ConfigError(
                f"data.source={data.source!r}: teacher {bundle.source!r} has no VAE encoder to turn images "
                "into latents; encode them elsewhere and use data.source=cache or data.real_latents"
            )
        shape = tuple(bundle.image_shape)
        if data.resolution is not None:
            shape = (shape[0], int(data.resolution), int(data.resolution))
        return EncodedImages(open_images(data), bundle.encode, shape, device, chunk=data.encode_batch)
    if data.source == "cache":
        return CachedLatents(data.path, bundle.source, bundle.latent_shape)
    if data.real_latents is not None:
        return _read_latents_file(data.real_latents, bundle.latent_shape)
    if data.real_data:
        if bundle.real_data is None:
            raise ConfigError(
                f"data.real_data=true: no real data for teacher {bundle.source!r} (the embedded digits come "
                "with the digits teachers); name your images with data.source and data.path"
            )
        with torch.no_grad():
            x0, labels = bundle.real_data()
        if tuple(x0.shape[1:]) != tuple(bundle.latent_shape):
            raise ConfigError(
                f"data.real_data: real latents have shape {tuple(x0.shape[1:])}, the teacher's latents "
                f"{tuple(bundle.latent_shape)}"
            )
        return TensorData(x0, labels)
    return None


def prompts_for(data: Any, real: RealData | None) -> list[str] | str | None:
    """Text prompts: data.prompts (a file, or a saved dataset's data.prompt_column), else the real
    data's captions, else None."""
    if data.prompts is not None:
        if data.prompt_column is not None:
            ds = load_saved_dataset(data.prompts, data.split if data.source == "datasets" else None, "data.prompts")
            if data.prompt_column not in ds.column_names:
                raise ConfigError(
                    f"data.prompt_column={data.prompt_column!r}: the dataset at data.prompts has no such column "
                    f"(columns: {', '.join(ds.column_names)})"
                )
            prompts = [str(v).strip() for v in ds[data.prompt_column]]
            if not all(prompts):
                raise ConfigError(f"data.prompt_column={data.prompt_column!r}: some prompts are empty")
            return prompts
        return data.prompts
    if real is not None and real.captions is not None:
        return list(real.captions)
    return None
