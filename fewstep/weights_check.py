"""Cheap integrity checks of safetensors files before they are copied or trusted.

    problem = safetensors_problem(path)          # None, or what is wrong with the file
    check_weights_folder(folder, what)           # UserError naming the first damaged file

A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range,
then the data; a file cut short, padded, or with a garbled header disagrees with its own header.
Reading the header only (not the tensors) keeps this fast for multi-gigabyte text encoders.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .errors import UserError

__all__ = ["safetensors_problem", "check_weights_folder"]

_MAX_HEADER = 100 * 1024 * 1024


def safetensors_problem(path: str | Path) -> str | None:
    p = Path(path)
    size = p.stat().st_size
    if size < 8:
        return f"{p} has {size} bytes, too few for a safetensors file"
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            return f"{p}: its header length ({n} bytes) exceeds the file (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{p}: its header is not valid JSON (damaged or not safetensors)"
    if not isinstance(header, dict):
        return f"{p}: its header is not a mapping (damaged or not safetensors)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return f"{p}: tensor {name!r} has no valid data_offsets (damaged)"
    if 8 + n + end != size:
        return f"{p} has {size} bytes, its header describes {8 + n + end} (truncated or damaged)"
    return None


def check_weights_folder(folder: str | Path, what: str) -> None:
    """Every *.safetensors file under `folder` agrees with its header; else a UserError."""
    for f in sorted(Path(folder).rglob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise UserError(f"{what}: {problem}")
