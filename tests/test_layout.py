"""Length limits of fewstep/: no function over 80 lines, no file over 500, except the entries of
CONTRIBUTING.md's table (each with its reason), and no stale entries in that table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION, MAX_FILE = 80, 500


def _too_long() -> set[str]:
    """`path` for long files and `path: function` for long functions, paths relative to the repo."""
    found = set()
    for f in sorted((ROOT / "fewstep").rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        src = f.read_text(encoding="utf-8")
        if src.count("\n") > MAX_FILE:
            found.add(rel)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION:
                    found.add(f"{rel}: {node.name}")
    return found


def _stated_exceptions() -> set[str] | None:
    """The table's entries; None when CONTRIBUTING.md has no such table (an empty table is fine)."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    if "| where | size | why it is still one piece |" not in text:
        return None
    return set(re.findall(r"^\| `(fewstep/[^`]+)` \|", text, flags=re.M))


def test_long_functions_and_files_are_stated_exceptions():
    found, stated = _too_long(), _stated_exceptions()
    assert stated is not None, "CONTRIBUTING.md has no table of length exceptions"
    assert found <= stated, f"over the limits without a reason in CONTRIBUTING.md: {sorted(found - stated)}"
    assert stated <= found, f"CONTRIBUTING.md lists exceptions that are within the limits now: {sorted(stated - found)}"
