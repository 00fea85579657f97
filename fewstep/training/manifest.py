"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written last.

    write_manifest(folder)          # after every other file of the checkpoint is complete
    problem = verify_manifest(folder)   # None when every file is there, whole and unchanged

A checkpoint whose manifest is missing (an older fewstep wrote it, or the save stopped before the
end) or disagrees with a file (truncated, overwritten, deleted) is not verified; `resume=latest`
then falls back to the newest verified checkpoint and says which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["MANIFEST", "file_sha256", "verify_manifest", "write_manifest"]

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> Path:
    """Record every file under `folder` (sizes and sha256) in folder/manifest.json, synced to disk."""
    folder = Path(folder)
    entries = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)
    }
    out = folder / MANIFEST
    with open(out, "w") as f:
        json.dump({"format": 1, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return out


def verify_manifest(folder: str | Path, hashes: bool = True) -> str | None:
    """None when folder/manifest.json lists exactly the files present, with their sizes (and, with
    `hashes`, their sha256); else what is wrong, naming the file."""
    folder = Path(folder)
    mfile = folder / MANIFEST
    if not mfile.is_file():
        return "no manifest.json (incomplete save, or written by an older fewstep)"
    try:
        entries = json.loads(mfile.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable manifest.json ({type(e).__name__})"
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    missing = sorted(set(entries) - present)
    if missing:
        return f"{missing[0]} is missing"
    for name, want in entries.items():
        p = folder / name
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
    if hashes:
        for name, want in entries.items():
            if file_sha256(folder / name) != want["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None
