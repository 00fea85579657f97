"""A sharded latent cache: images encoded once with the teacher's VAE, read by index in training.

    info = encode_to_cache(table, encode, "cache/", image_shape=(1, 32, 32), latent_shape=(4, 8, 8),
                           teacher="digits-vp")             # what `fewstep encode` runs
    cache = LatentCache("cache/")                             # data.source: cache, data.path: cache/
    x0 = cache.latents(torch.tensor([3, 1, 4]))               # (3, 4, 8, 8) float32

Layout: `cache.json` (what was encoded, with which teacher, in which order; `complete` once every
shard exists) and `shard-00000.safetensors`, ... each with "latents" (n, C, H, W) float32, the
latents exactly as the teacher's denoiser takes them (scaled as its VAE scales them), optional
"class_labels" (n,) int64, and the captions as JSON in the file's metadata. Shard k holds samples
[k * shard_size, (k + 1) * shard_size) of the image table's fixed order.

Resumable: a shard is written to a temporary name and renamed when complete, and each shard is
encoded in the same chunks whatever came before, so a run that is interrupted and started again
skips the shards it finished and writes the same bytes as a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from .images import ImageTable, to_model_input

__all__ = ["CACHE_FORMAT", "MANIFEST", "encode_to_cache", "LatentCache", "read_manifest"]

CACHE_FORMAT = "fewstep-latent-cache/1"
MANIFEST = "cache.json"
_RESUME_KEYS = ("format", "teacher", "latent_shape", "image_shape", "count", "shard_size", "keys_sha256", "source")


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(folder: str | Path, key: str = "data.path") -> dict[str, Any]:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise UserError(f"{key}={str(folder)!r}: not a latent cache (no {MANIFEST}; write one with `fewstep encode`)")
    try:
        m = json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{key}: {p} is not valid JSON ({e})") from None
    if m.get("format") != CACHE_FORMAT:
        raise UserError(f"{key}: {p} has format {m.get('format')!r}, expected {CACHE_FORMAT!r}")
    return m


def _shard_ok(path: Path, rows: int, latent_shape: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice("latents").get_shape()) == (rows, *latent_shape)
    except Exception:  # a damaged or foreign file is encoded again
        return False


def encode_to_cache(
    table: ImageTable,
    encode: Callable[[Tensor], Tensor],
    out: str | Path,
    *,
    image_shape: tuple[int, int, int],
    latent_shape: tuple[int, ...],
    teacher: str,
    shard_size: int = 1024,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Encode every image of `table` into the cache folder `out`; returns the manifest.

    Args:
        table:        the images, in their fixed order (fewstep.data.images).
        encode:       (B, C, H, W) images in [-1, 1] on `device` -> (B, *latent_shape) latents.
        image_shape:  (channels, height, width) the VAE takes; images are resized and centre-cropped.
        teacher:      the teacher's name, recorded (training checks it against teacher.source).
        shard_size:   samples per shard file; batch_size: images per VAE call.
        overwrite:    start afresh when `out` holds a cache of other images or settings.
        on_shard:     called with the shard number after each shard is written (progress hooks, tests).
    """
    if shard_size < 1 or batch_size < 1:
        raise UserError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    out = Path(out)
    channels, height, width = image_shape
    if height != width:
        raise UserError(f"encode: only square images are supported, the VAE takes {height}x{width}")
    n = len(table)
    manifest = _manifest(table, teacher, latent_shape, image_shape, shard_size)
    _prepare_folder(out, manifest, overwrite)

    from tqdm.auto import tqdm

    spans = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range(len(manifest["shards"]))]
    todo = [(k, lo, hi) for k, lo, hi in spans if not _shard_ok(out / _shard_name(k), hi - lo, tuple(latent_shape))]
    done_rows = n - sum(hi - lo for _, lo, hi in todo)
    bar = tqdm(total=n, initial=done_rows, unit="img", desc="encode", disable=not progress, dynamic_ncols=True)
    try:
        for k, lo, hi in todo:
            parts = []
            for a in range(lo, hi, batch_size):  # chunks start at the shard's start: the same in every run
                idx = range(a, min(hi, a + batch_size))
                x = torch.stack([to_model_input(table.image(i), height, channels) for i in idx])
                with torch.no_grad():
                    z = encode(x.to(device)).float().cpu()
                if tuple(z.shape[1:]) != tuple(latent_shape):
                    raise UserError(
                        f"encode: the VAE gave latents {tuple(z.shape[1:])}, expected {tuple(latent_shape)}"
                    )
                parts.append(z)
                bar.update(len(idx))
            _write_shard(out / _shard_name(k), torch.cat(parts), table, lo, hi)
            if on_shard is not None:
                on_shard(k)
    finally:
        bar.close()
    manifest["complete"] = True
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest(table: ImageTable, teacher: str, latent_shape, image_shape, shard_size: int) -> dict[str, Any]:
    n = len(table)
    manifest = {
        "format": CACHE_FORMAT,
        "teacher": str(teacher),
        "latent_shape": list(latent_shape),
        "image_shape": list(image_shape),
        "count": n,
        "shard_size": int(shard_size),
        "keys_sha256": hashlib.sha256("\n".join(table.keys).encode()).hexdigest(),
        "source": table.describe(),
        "num_classes": table.num_classes,
        "has_labels": table.labels is not None,
        "has_captions": table.captions is not None,
        "shards": [_shard_name(k) for k in range((n + shard_size - 1) // shard_size)],
        "complete": False,
    }
    return json.loads(json.dumps(manifest))  # the types it has once read back (tuples -> lists)


def _prepare_folder(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Refuse a folder that holds something else; write the (incomplete) manifest."""
    if (out / MANIFEST).is_file() and not overwrite:
        old = read_manifest(out, "--out")
        diff = [k for k in _RESUME_KEYS if old.get(k) != manifest[k]]
        if diff:
            raise UserError(
                f"--out={str(out)!r} holds a cache of other images or settings ({', '.join(diff)} differ); "
                "give another folder, or --overwrite to encode afresh"
            )
    elif out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out={str(out)!r} is a non-empty folder that is not a latent cache; give another folder")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _write_shard(path: Path, latents: Tensor, table: ImageTable, lo: int, hi: int) -> None:
    """Write under a temporary name, then rename: a shard file that exists is complete."""
    from safetensors.torch import save_file

    tensors = {"latents": latents.contiguous()}
    if table.labels is not None:
        tensors["class_labels"] = torch.tensor(table.labels[lo:hi], dtype=torch.int64)
    # one metadata key at most: safetensors writes a metadata map in no fixed order
    meta = None if table.captions is None else {"captions": json.dumps(table.captions[lo:hi])}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class LatentCache:
    """Read a cache written by `encode_to_cache`: `len`, `latents(idx)`, `labels`, `captions`."""

    def __init__(self, folder: str | Path, key: str = "data.path"):
        self.folder = Path(folder)
        m = self.manifest = read_manifest(folder, key)
        if not m.get("complete"):
            raise UserError(
                f"{key}={str(folder)!r}: the cache is incomplete (its encoding stopped); run the same "
                "`fewstep encode` command again to finish it"
            )
        from safetensors import safe_open

        self.count = int(m["count"])
        self.shard_size = int(m["shard_size"])
        self.latent_shape = tuple(m["latent_shape"])
        self.teacher = m["teacher"]
        self.num_classes = m.get("num_classes")
        self._files = []
        labels, captions = [], []
        for k, name in enumerate(m["shards"]):
            p = self.folder / name
            rows = min(self.count, (k + 1) * self.shard_size) - k * self.shard_size
            if not _shard_ok(p, rows, self.latent_shape):
                raise UserError(f"{key}: shard {p} is missing or damaged; run `fewstep encode` again to rewrite it")
            f = safe_open(str(p), framework="pt")
            self._files.append(f)
            if m.get("has_labels"):
                labels.append(f.get_tensor("class_labels"))
            if m.get("has_captions"):
                captions.extend(json.loads(f.metadata()["captions"]))
        self.labels: Tensor | None = torch.cat(labels).long() if labels else None
        self.captions: list[str] | None = captions if m.get("has_captions") else None

    def __len__(self) -> int:
        return self.count

    def latents(self, idx: Tensor) -> Tensor:
        """Rows `idx` (any order, repeats allowed) as (len(idx), *latent_shape) float32."""
        rows = []
        for i in idx.tolist():
            k, r = divmod(int(i), self.shard_size)
            rows.append(self._files[k].get_slice("latents")[r : r + 1])
        if not rows:
            return torch.empty(0, *self.latent_shape)
        return torch.cat(rows).float()
