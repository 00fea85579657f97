"""User errors: one line naming the problem, exit status 2, no traceback.

Every command's entry point runs through `main_guard`, which turns a `UserError` (the config's
`ConfigError`, the evaluation's `InputError`, a checkpoint's `CheckpointError`, ...) and the
operating system's refusals (a missing file, a read-only folder, a full disk) into

    fewstep <command>: error: <what is wrong, naming the key / file / flag>

on stderr and exit status 2. Anything else is a bug and keeps its traceback. FEWSTEP_DEBUG=1
shows the traceback of user errors too.

The checks every command shares live here too: finite numbers (argparse types and config
values), positive counts, output files and folders that can be written, and JSON that never holds
NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "UserError",
    "check_finite",
    "check_output_file",
    "check_output_folder",
    "dangerous_folder",
    "dumps_json",
    "finite_float",
    "json_safe",
    "main_guard",
    "nonnegative_int",
    "one_line",
    "positive_int",
    "read_json",
    "script_command",
    "user_errors",
]


class UserError(ValueError):
    """A mistake in what the user asked for (a key, a value, a file); the message names it."""


def one_line(e: BaseException, limit: int = 600) -> str:
    """The exception's message on one line (newlines folded), at most `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def user_errors(what: str, *types: type[BaseException], named: str | None = None) -> Iterator[None]:
    """Inside, an exception of one of `types` (e.g. what a library raises on a damaged file)
    becomes a UserError "<what>: <message>"; the prefix is left out when the message already
    names `named`."""
    try:
        yield
    except UserError:
        raise
    except types as e:
        msg = one_line(e)
        raise UserError(msg if named is not None and named in msg else f"{what}: {msg}") from e


def _os_message(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else one_line(e)


def main_guard(prog: str, fn: Callable[[], int | None]) -> int:
    """Run `fn` (a command's body); a user error becomes one line on stderr and status 2."""
    try:
        return int(fn() or 0)
    except UserError as e:
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        # a missing or unreadable file, a read-only folder, a full disk: the environment, not a bug
        if os.environ.get("FEWSTEP_DEBUG") or e.errno is None:
            raise
        print(f"{prog}: error: {_os_message(e)}", file=sys.stderr, flush=True)
        return 2


# ---- numbers ---------------------------------------------------------------------------------------
def check_finite(value: float, name: str) -> float:
    """`value` if it is a finite number, else a UserError naming `name`."""
    if not math.isfinite(value):
        raise UserError(f"{name}: must be a finite number, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float (nan / inf are refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def json_safe(obj: Any) -> Any:
    """A copy of plain data with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kw: Any) -> str:
    """json.dumps that writes valid JSON only: non-finite floats become null."""
    default = kw.pop("default", None)
    if default is not None:  # let `default` turn unknown objects into plain data first
        obj = json.loads(json.dumps(obj, default=default))
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def read_json(path: str | Path, error: type[UserError] = UserError) -> Any:
    """The JSON held in `path`; a file that cannot be read or parsed raises `error` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e


def script_command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran a script, as recorded beside its results: "python SCRIPT ARGS",
    each argument shell-quoted (`sys.argv[1:]` when `argv` is None)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python {script} " + " ".join(shlex.quote(a) for a in args)


# ---- output paths ----------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def dangerous_folder(path: str | Path) -> str | None:
    """Why `path` must never be used (and possibly emptied) as an output folder, or None: the
    current folder or one above it, the home folder or one above it, the filesystem root, a git
    checkout's root, or fewstep's own source tree."""
    p = Path(path).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if p == cwd or p in cwd.parents:
        return "it is the current folder or contains it"
    if p == home or p in home.parents:
        return "it is the home folder or contains it"
    if p.parent == p:
        return "it is the filesystem root"
    if (p / ".git").exists():
        return "it is the root of a git repository"
    repo = _repo_root()
    if p == repo or p in repo.parents or p == repo / "fewstep" or repo / "fewstep" in p.parents:
        return "it holds fewstep's own source"
    return None


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q.parent != q:
        q = q.parent
    return q


def _probe_writable(folder: Path, what: str) -> None:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".fewstep-probe-", dir=folder)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def check_output_folder(path: str | Path, what: str) -> Path:
    """An output folder that exists as a writable folder or can be created; checked without
    creating anything. `what` names the option (e.g. "output_dir", "--out")."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what}={str(path)!r} is an existing file, not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{what}={str(path)!r}: {base} is a file, so the folder cannot be created")
    _probe_writable(base, f"{what}={str(path)!r}")
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """An output file path that can be written: not a folder, its folder writable or creatable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what}={str(path)!r} is a folder; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what}={str(path)!r} exists and is not writable")
    base = _nearest_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise UserError(f"{what}={str(path)!r}: {base} is a file, so the folder cannot be created")
    _probe_writable(base, f"{what}={str(path)!r}")
    return p
