"""Checks of the `data:` section that need no teacher: which keys go with which source, and that
the named folders, files and shards exist. Run by the preflight before the teacher loads; each
error names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError

__all__ = ["check_data"]

_KEYS_FOR = {  # which of the source-specific keys each source reads
    "folder": {"labels", "captions"},
    "webdataset": {"labels", "captions", "image_key"},
    "datasets": {"labels", "captions", "image_key", "split"},
    "cache": set(),
}


def check_data(data: Any) -> None:
    """Raise ConfigError naming the key when the `data:` section cannot work."""
    src = data.source
    if data.encode_batch < 1:
        raise ConfigError(f"data.encode_batch: must be >= 1, got {data.encode_batch}")
    if data.resolution is not None and data.resolution < 8:
        raise ConfigError(f"data.resolution: must be >= 8 pixels, got {data.resolution}")
    used = {k for k in ("labels", "captions", "image_key", "split") if getattr(data, k) is not None}
    if src is None:
        if data.path is not None:
            raise ConfigError("data.path: set data.source too (folder | webdataset | datasets | cache)")
        if used:
            raise ConfigError(f"data.{sorted(used)[0]}: only read with data.source (folder | webdataset | datasets)")
    else:
        if data.path is None:
            raise ConfigError(f"data.path: required with data.source={src!r}")
        if data.real_latents is not None:
            raise ConfigError("data.real_latents and data.source exclude each other: name one source of real latents")
        extra = used - _KEYS_FOR[src]
        if extra:
            raise ConfigError(f"data.{sorted(extra)[0]}: not read with data.source={src!r}")
        if isinstance(data.path, list) and src != "webdataset":
            raise ConfigError(f"data.path: a list is a webdataset shard list; data.source={src!r} takes one folder")
        if src == "webdataset":
            from .images import expand_shards

            expand_shards(data.path)
        elif not Path(data.path).is_dir():
            what = {"folder": "image folder", "datasets": "saved dataset folder", "cache": "latent cache folder"}[src]
            raise ConfigError(f"data.path={data.path!r}: no such {what}")
        if src == "folder" and data.labels not in (None, "subfolders") and not Path(data.labels).is_file():
            raise ConfigError(f"data.labels={data.labels!r}: not 'subfolders' and no such labels file")
        if src == "cache":
            from ..errors import UserError
            from .cache import read_manifest

            try:
                read_manifest(data.path)
            except UserError as e:
                raise ConfigError(str(e)) from None
    if data.prompt_column is not None:
        if data.prompts is None or not Path(data.prompts).is_dir():
            raise ConfigError(
                f"data.prompt_column={data.prompt_column!r}: data.prompts must name a saved `datasets` folder, "
                f"got {data.prompts!r}"
            )
    elif data.prompts is not None and not Path(data.prompts).is_file():
        raise ConfigError(f"data.prompts={data.prompts!r}: no such file")
