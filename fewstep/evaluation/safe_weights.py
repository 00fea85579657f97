"""Feature-extractor weights handed to torch-fidelity, which reads `.pth` files with
`torch.load(weights_only=False)` (an unpickler that can run code).

`verified_torch_weights(path)` never hands it a file it did not just check: the source (a
`.safetensors` file, or a `.pth` read with `weights_only=True`) is read once into memory and
hashed; the tensors are written to `<private cache>/<sha256 of the source>.pth` in a folder that
only the current user can enter (created 0700; refused when another user owns it or it is
open to others). An existing converted file is used only after it loads with `weights_only=True`
and holds exactly the source's tensors; anything else there (a planted pickle, a stale or
truncated file) is replaced atomically, never unpickled. Nothing is written to the shared
system temporary folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .inputs import InputError

__all__ = ["converted_path", "private_cache_dir", "verified_torch_weights"]


def private_cache_dir() -> Path:
    """`<$FEWSTEP_CACHE or ~/.cache/fewstep>/torch-weights`, created with mode 0700; refused if it
    is a link, belongs to another user or is open to group / others."""
    root = os.environ.get("FEWSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewstep")
    d = Path(root) / "torch-weights"
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"weights cache {d} is not a folder (a link or a file); remove it")
    if st.st_uid != os.getuid():
        raise InputError(
            f"weights cache {d} belongs to another user (uid {st.st_uid}); set FEWSTEP_CACHE to a folder of your own"
        )
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)  # ours: close it before anything is written or read there
    return d


def _read_state(path: Path) -> tuple[dict[str, Tensor], str]:
    """(tensors, sha256 of the bytes they were read from), reading the file once."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read feature extractor weights {path}: {e}") from e
    sha = hashlib.sha256(blob).hexdigest()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load

            state = load(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"feature extractor weights {path} cannot be read as plain tensors "
            f"(safetensors, or torch.load weights_only=True): {e}"
        ) from e
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"feature extractor weights {path} are not a state dict of tensors")
    return state, sha


def _matches(path: Path, state: dict[str, Tensor]) -> bool:
    """True when `path` is a regular file of ours that loads with weights_only=True and holds
    exactly `state`."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return False
        have = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a planted pickle, a truncated file: not a match, rewrite it
        return False
    return (
        isinstance(have, dict)
        and set(have) == set(state)
        and all(
            torch.is_tensor(have[k])
            and have[k].dtype == v.dtype
            and have[k].shape == v.shape
            and torch.equal(have[k], v)
            for k, v in state.items()
        )
    )


def converted_path(sha256: str) -> Path:
    return private_cache_dir() / f"{sha256}.pth"


def verified_torch_weights(path: str | Path) -> Path:
    """A `.pth` holding exactly the tensors of `path` (.safetensors or .pth), in the private cache,
    safe to hand to a reader that unpickles without `weights_only`."""
    path = Path(path)
    state, sha = _read_state(path)
    out = converted_path(sha)
    if _matches(out, state):
        return out
    fd, tmp = tempfile.mkstemp(prefix=f".{sha[:16]}.", suffix=".tmp", dir=out.parent)  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, out)  # replaces whatever was there (never read without weights_only)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not _matches(out, state):
        raise InputError(f"the converted weights {out} do not read back as {path}'s tensors")
    return out
