"""The markdown table of an evaluation's results (results.md): one row per step count, the
provenance below it, and the judge panel's table when it was scored."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_table"]

_COLUMNS = [
    ("fid", "FID", "{:.3f}"),
    ("kid", "KID", "{:.4g}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_acc", "class acc", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("vendi", "Vendi", "{:.2f}"),
    ("clip", "CLIP", "{:.2f}"),
]


def _fmt(key: str, m: dict | None, fmt: str) -> str:
    if m is None:
        return "-"
    return fmt.format(m["value"])


def markdown_table(results: dict[str, Any], label: str | None = None) -> str:
    """The results as a markdown table (one row per step count) with the provenance below it."""
    rows = results["rows"]
    cols = [c for c in _COLUMNS if any(c[0] in r.get("metrics", {}) for r in rows)]
    name = label or results["source"].get("name") or results["source"].get("path")
    head = ["source", "steps", "NFE", "guidance"] + [c[1] for c in cols] + ["samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sps = r.get("samples_per_second")
        cells = [str(name)] + ["-" if r.get(k) is None else str(r[k]) for k in ("steps", "nfe", "guidance")]
        cells += [_fmt(k, r.get("metrics", {}).get(k), f) for k, _, f in cols]
        cells.append("-" if sps is None else f"{sps:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    p = results["protocol"]
    ext = results.get("extractor") or {}
    ref = results.get("reference") or {}
    counts = sorted({r.get("num_samples") for r in rows})
    lines += [
        "",
        f"Protocol `{p['name']}`: {', '.join(map(str, counts))} samples per row, seed {p['seed']} (sample i "
        f"uses seed + i), conditioning {p['conditioning']}, scoring size {p['image_size']}.",
        f"Backend: torch-fidelity {results['backend']['torch_fidelity']}, extractor `{ext.get('name')}` "
        f"(weights sha256 {str(ext.get('weights_sha256'))[:16]}...), reference {ref.get('kind')} "
        f"({ref.get('count')} images). Diversity is the mean pairwise feature "
        "distance within a class, Vendi the Vendi score within a class.",
        f"Device {results['backend']['device']} ({results['backend']['dtype']}, "
        f"{results['backend']['threads']} threads).",
    ]
    panel = [
        (f"{name}, {r['steps']} steps" if r.get("steps") else str(name), r["metrics"]["panel"])
        for r in rows
        if "panel" in r.get("metrics", {})
    ]
    if panel:
        from .panel import panel_table

        lines += [
            "",
            "Judge panel (FID of every member with its 95% bootstrap interval; median and range over "
            "the judges; pixel-pca64 is the judge-free pixel-PCA distance):",
            "",
            panel_table(panel),
        ]
    return "\n".join(lines) + "\n"
