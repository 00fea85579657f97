"""Real images a user points `data:` at, read by index: an image folder, webdataset tar shards, or a
Hugging Face `datasets` dataset saved with `save_to_disk`.

    table = open_images(cfg.data)        # an ImageTable: len(table), table.image(i), .labels, .captions
    x = to_model_input(table.image(0), size=32, channels=1)   # (1, 32, 32) float32 in [-1, 1]

Every table lists its samples in one fixed order (sorted file names, shard order then member order,
the dataset's row order), so sample i is the same on every process and in every run: training
batches are drawn by index as a function of (seed, step) (fewstep/training/data.py), and the latent
cache of `fewstep encode` keeps that order.

- folder: every image file under the folder (png, jpg, jpeg, webp, bmp), sorted by relative path;
  a caption is the text of the sidecar file with the same stem (`cat.png` + `cat.txt`); labels come
  from class subfolders (`labels: subfolders`: class k is the k-th subfolder name in sorted order)
  or a labels file (`labels: FILE`: one `relative/path label` a line, comma or whitespace between).
- webdataset: tar shards in webdataset's layout (the members of one sample share the name up to
  the first dot of the base name: `000123.png`, `000123.txt`, `000123.cls`); `path` is a list of
  shard files, or one string with braces (`shards-{000..009}.tar`) or a glob. Read by index from
  the tar headers (the shards are scanned once), so batches need no streaming state.
- datasets: `datasets.load_from_disk(path)` (arrow files, no code is run); `image_key` (default
  "image"), `labels` and `captions` name columns; `split` picks a split of a DatasetDict.
"""

from __future__ import annotations

import glob
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTable",
    "FolderImages",
    "TarShardImages",
    "SavedDatasetImages",
    "open_images",
    "expand_shards",
    "to_model_input",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")


class ImageTable:
    """Random access to samples: `image(i)` (a PIL image), `labels` (list[int] | None) and
    `captions` (list[str] | None), `keys` (a stable name per sample), `describe()` (for the cache)."""

    keys: list[str]
    labels: list[int] | None = None
    captions: list[str] | None = None
    num_classes: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int):
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _pil_open(data: bytes | str | Path, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{where}: cannot read the image ({e})") from None
    return img


# ---------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------
def _read_labels_file(path: Path, names: list[str], key: str) -> list[int]:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such labels file (expected 'subfolders' or a file)")
    table: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").replace("\t", " ").split()
        if len(parts) != 2:
            raise ConfigError(f"{key}: {path}:{n}: expected 'relative/path label', got {line!r}")
        try:
            table[parts[0]] = int(parts[1])
        except ValueError:
            raise ConfigError(f"{key}: {path}:{n}: the label {parts[1]!r} is not an integer") from None
    missing = [nm for nm in names if nm not in table]
    if missing:
        raise ConfigError(f"{key}: {path} gives no label for {len(missing)} images, e.g. {missing[0]!r}")
    bad = [table[nm] for nm in names if table[nm] < 0]
    if bad:
        raise ConfigError(f"{key}: {path}: labels must be >= 0, got {bad[0]}")
    return [table[nm] for nm in names]


class FolderImages(ImageTable):
    """Every image file under `root`, sorted by relative path (POSIX separators)."""

    def __init__(self, root: str | Path, labels: str | None = None, captions: str | None = None, key: str = "data"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"{key}.path={str(root)!r}: no such image folder")
        files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not files:
            raise ConfigError(
                f"{key}.path={str(root)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under the folder"
            )
        self.files = files
        self.keys = [p.relative_to(self.root).as_posix() for p in files]
        self.class_names: list[str] | None = None
        if labels == "subfolders":
            tops = [k.split("/")[0] if "/" in k else None for k in self.keys]
            if any(t is None for t in tops):
                loose = self.keys[tops.index(None)]
                raise ConfigError(
                    f"{key}.labels=subfolders: {loose!r} is not inside a class subfolder of {str(root)!r}"
                )
            self.class_names = sorted(set(tops))
            index = {c: i for i, c in enumerate(self.class_names)}
            self.labels = [index[t] for t in tops]
            self.num_classes = len(self.class_names)
        elif labels is not None:
            self.labels = _read_labels_file(Path(labels), self.keys, f"{key}.labels")
            self.num_classes = max(self.labels) + 1
        ext = captions or "txt"
        sidecars = [p.with_suffix("." + ext) for p in files]
        have = [s.is_file() for s in sidecars]
        if any(have):
            if not all(have):
                miss = self.keys[have.index(False)]
                raise ConfigError(
                    f"{key}.captions: some images have a .{ext} caption and some do not, e.g. {miss!r} has none"
                )
            self.captions = [s.read_text(encoding="utf-8").strip() for s in sidecars]
        elif captions is not None:
            raise ConfigError(f"{key}.captions={captions!r}: no caption files (*.{ext}) beside the images")

    def image(self, i: int):
        return _pil_open(self.files[i], str(self.files[i]))

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.root.resolve()), "class_names": self.class_names}


# ---------------------------------------------------------------------------------------------
# webdataset tar shards
# ---------------------------------------------------------------------------------------------
def expand_shards(path: str | Sequence[str], key: str = "data.path") -> list[Path]:
    """A shard list: a list of files, or one string with braces (`a-{000..009}.tar`, webdataset's
    syntax, expanded with `braceexpand`) or glob characters."""
    items = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[Path] = []
    for item in items:
        item = str(item)
        names = [item]
        if "{" in item:
            try:
                from braceexpand import braceexpand
            except ImportError:
                raise ConfigError(
                    f"{key}={item!r}: brace patterns need the braceexpand package (pip install 'fewstep[data]')"
                ) from None
            names = list(braceexpand(item))
        for name in names:
            if any(c in name for c in "*?["):
                hits = sorted(glob.glob(name))
                if not hits:
                    raise ConfigError(f"{key}: the pattern {name!r} matches no file")
                out.extend(Path(h) for h in hits)
            else:
                out.append(Path(name))
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise ConfigError(f"{key}: no such tar shard {str(missing[0])!r}")
    if not out:
        raise ConfigError(f"{key}: the shard list is empty")
    return out


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the sample key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


class TarShardImages(ImageTable):
    """Samples of webdataset tar shards, indexed once from the tar headers."""

    def __init__(
        self,
        shards: str | Sequence[str],
        labels: str | None = None,
        captions: str | None = None,
        image_key: str | None = None,
        key: str = "data",
    ):
        self.shards = expand_shards(shards, f"{key}.path")
        self._where: list[tuple[int, int, int, str]] = []  # (shard, offset, size, member name)
        keys, labs, caps = [], [], []
        label_ext, caption_ext = labels or "cls", captions or "txt"
        for s, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:") as tf:
                    members = [m for m in tf.getmembers() if m.isfile()]
                    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                    order: list[str] = []
                    for m in members:
                        k, ext = _split_member(m.name)
                        if k not in groups:
                            groups[k] = {}
                            order.append(k)
                        groups[k][ext] = m
                    for k in order:
                        g = groups[k]
                        img_ext = image_key or next((e for e in IMAGE_EXTENSIONS if e in g), None)
                        if img_ext is None or img_ext not in g:
                            continue  # a sample without an image (e.g. a metadata member)
                        m = g[img_ext]
                        self._where.append((s, m.offset_data, m.size, m.name))
                        keys.append(f"{shard.name}/{k}")
                        labs.append(_tar_text(tf, g.get(label_ext)))
                        caps.append(_tar_text(tf, g.get(caption_ext)))
            except tarfile.TarError as e:
                raise ConfigError(f"{key}.path: {str(shard)!r} is not a readable tar file ({e})") from None
        if not keys:
            raise ConfigError(f"{key}.path: the shards hold no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.keys = keys
        if labels is not None or any(v is not None for v in labs):
            if all(v is None for v in labs):
                raise ConfigError(f"{key}.labels={labels!r}: no sample has a .{label_ext} member")
            if any(v is None for v in labs):
                raise ConfigError(f"{key}.labels: some samples have a .{label_ext} member and some do not")
            try:
                self.labels = [int(v) for v in labs]
            except ValueError:
                raise ConfigError(f"{key}.labels: a .{label_ext} member does not hold an integer") from None
            self.num_classes = max(self.labels) + 1
        if captions is not None or any(v is not None for v in caps):
            if all(v is None for v in caps):
                raise ConfigError(f"{key}.captions={captions!r}: no sample has a .{caption_ext} member")
            if any(v is None for v in caps):
                raise ConfigError(f"{key}.captions: some samples have a .{caption_ext} member and some do not")
            self.captions = [v.strip() for v in caps]

    def image(self, i: int):
        s, offset, size, name = self._where[i]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return _pil_open(data, f"{self.shards[s]}:{name}")

    def describe(self) -> dict[str, Any]:
        return {"kind": "webdataset", "path": [str(p.resolve()) for p in self.shards]}


def _tar_text(tf: tarfile.TarFile, m: tarfile.TarInfo | None) -> str | None:
    if m is None:
        return None
    f = tf.extractfile(m)
    return None if f is None else f.read().decode("utf-8")


# ---------------------------------------------------------------------------------------------
# a `datasets` dataset saved on local disk
# ---------------------------------------------------------------------------------------------
class SavedDatasetImages(ImageTable):
    """A dataset written by `Dataset.save_to_disk` (or a DatasetDict and a split)."""

    def __init__(
        self,
        path: str | Path,
        labels: str | None = None,
        captions: str | None = None,
        image_key: str | None = None,
        split: str | None = None,
        key: str = "data",
    ):
        ds = load_saved_dataset(path, split, key)
        col = image_key or "image"
        for what, c in ((f"{key}.image_key", col), (f"{key}.labels", labels), (f"{key}.captions", captions)):
            if c is not None and c not in ds.column_names:
                raise ConfigError(
                    f"{what}={c!r}: the dataset has no such column (columns: {', '.join(ds.column_names)})"
                )
        self.ds = ds
        self.column = col
        self.keys = [str(i) for i in range(len(ds))]
        if labels is not None:
            self.labels = [int(v) for v in ds[labels]]
            names = getattr(ds.features[labels], "names", None)
            self.num_classes = len(names) if names else max(self.labels) + 1
        if captions is not None:
            self.captions = [str(v).strip() for v in ds[captions]]
        self.path = Path(path)

    def image(self, i: int):
        v = self.ds[int(i)][self.column]
        if isinstance(v, dict) and v.get("bytes") is not None:  # an undecoded Image feature
            return _pil_open(v["bytes"], f"{self.path}[{i}]")
        if isinstance(v, (bytes, str)):
            return _pil_open(v, f"{self.path}[{i}]")
        return v  # a PIL image (the Image feature decodes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "datasets", "path": str(self.path.resolve()), "fingerprint": self.ds._fingerprint}


def load_saved_dataset(path: str | Path, split: str | None, key: str):
    """`datasets.load_from_disk` with errors naming the key."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{key}.path={str(path)!r}: no such folder (a dataset saved with save_to_disk)")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{key}: reading a saved dataset needs the datasets package (pip install 'fewstep[data]')"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{key}.path={str(path)!r}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if "train" not in ds:
                raise ConfigError(f"{key}.split: the dataset has splits {', '.join(splits)}; name one")
            split = "train"
        if split not in ds:
            raise ConfigError(f"{key}.split={split!r}: no such split (splits: {', '.join(splits)})")
        ds = ds[split]
    elif split is not None:
        raise ConfigError(f"{key}.split={split!r}: the dataset at {str(path)!r} has no splits")
    return ds


# ---------------------------------------------------------------------------------------------
def open_images(spec: Any, key: str = "data") -> ImageTable:
    """The ImageTable a `data:` section (or any object with its fields) names."""
    kind = spec.source
    if kind == "folder":
        return FolderImages(spec.path, spec.labels, spec.captions, key=key)
    if kind == "webdataset":
        return TarShardImages(spec.path, spec.labels, spec.captions, spec.image_key, key=key)
    if kind == "datasets":
        return SavedDatasetImages(spec.path, spec.labels, spec.captions, spec.image_key, spec.split, key=key)
    raise ConfigError(f"{key}.source={kind!r}: not an image source (folder | webdataset | datasets)")


def to_model_input(img, size: int, channels: int) -> Tensor:
    """A PIL image -> (channels, size, size) float32 in [-1, 1]: the shorter side resized to `size`
    (bicubic), then the centre square cropped; grey for 1 channel, RGB for 3."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"images: the VAE takes {channels} channels; only 1 (grey) or 3 (RGB) are supported")
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()
    x = x.view(size, size, channels).permute(2, 0, 1).contiguous()
    return x / 127.5 - 1.0
