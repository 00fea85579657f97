"""Reading what the user points the evaluation at, with errors that name the file.

Image folders (references, or already generated samples) are read the way torch-fidelity reads a
folder, so a folder scored here and by torch-fidelity directly gives the same numbers:
- only files with an image extension (.png .jpg .jpeg .webp .bmp, any case) at the top level of
  the folder are read; other files (.txt, .json, ...) and sub-folders are ignored;
- every image becomes 8-bit RGB as PIL's ``convert("RGB")`` does it: grayscale is replicated to
  three channels, RGBA / LA / transparent palettes lose their alpha channel (colours are kept, no
  compositing); 16-bit and float grayscale are scaled to 8 bits first;
- images whose size differs from the scoring size are resized (shorter side to the size with PIL
  bicubic, then a centre crop). With no scoring size, all images must share one size; a folder of
  mixed sizes is then an error naming a file of each size;
- a file with an image extension that PIL cannot decode (empty, truncated, not an image) stops the
  run with an error naming it; an empty folder is an error.

Results are written atomically (a temporary file in the same folder, then a rename), so a
results file that exists is complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError, dumps_json

__all__ = [
    "IMAGE_EXTENSIONS",
    "InputError",
    "list_images",
    "read_image",
    "ImageFolder",
    "TensorImages",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InputError(UserError):
    """Bad user input (a file, folder or value); the message names it."""


def list_images(folder: str | Path) -> list[Path]:
    """The image files at the top level of `folder`, sorted by name."""
    p = Path(folder)
    if not p.exists():
        raise InputError(f"image folder {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{p} is not a folder of images")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        nested = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file())
        hint = " (images exist in sub-folders: point at the folder that holds them)" if nested else ""
        raise InputError(f"image folder {p} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}{hint}")
    return files


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    return im


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale: scale to 8 bits
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * 255.0 / top), 0, 255).astype(np.uint8), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _resize_center_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int | None = None) -> Tensor:
    """One image file as a uint8 (3, H, W) tensor (see the module docstring for conversions)."""
    im = _to_rgb(_open(Path(path)))
    if size is not None:
        im = _resize_center_crop(im, int(size))
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


class ImageFolder(Dataset):
    """A folder of images as a torch Dataset of uint8 (3, S, S) tensors, the input torch-fidelity
    extractors take. Headers are checked when it is built (undecodable files, mixed sizes without a
    scoring size); pixels are decoded lazily (a truncated file fails when read, naming it)."""

    def __init__(self, folder: str | Path, size: int | None = None):
        self.folder = Path(folder)
        self.files = list_images(self.folder)
        self.size = size
        sizes: dict[tuple[int, int], Path] = {}
        for f in self.files:
            sizes.setdefault(_image_size(f), f)
        self.source_sizes = sorted(sizes)
        if size is None and len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({p.name})" for (w, h), p in list(sizes.items())[:4])
            raise InputError(
                f"image folder {self.folder} mixes image sizes: {shown}; give a scoring size "
                "(--image-size) to resize them, or use one size"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        return read_image(self.files[i], self.size)

    def identity(self) -> list[tuple[str, int, int]]:
        """(name, bytes, mtime_ns) of every file: what the reference cache key is made of."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns))
        return out


class TensorImages(Dataset):
    """uint8 (N, 3, H, W) images as a Dataset (torch-fidelity's tensor input)."""

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InputError("no images to score (0 samples)")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj, indent=2, sort_keys=False) + "\n")  # NaN -> null: valid JSON


def atomic_save_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    _atomic(Path(path), lambda f: f.write(blob))
