"""Routing conditions to MSD students: the routing file an export writes, and a denoiser that
sends each sample of a batch to its student (for fewstep's own sampler and `fewstep eval`).

routing.json (next to one stock pipeline folder per student):
    {"format": "fewstep-msd-routing/1",
     "kind": "labels" | "prompts",
     "rule": "even" | "hash" | "kmeans" | "mapping",
     "students": ["student_0", "student_1", ...],      # folder of student k
     "routes": {"<class label or prompt>": "student_k", ...},
     "hash": "sha256(prompt as UTF-8), first 8 bytes big-endian, mod num_students" (rule hash only),
     ...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import index_cond
from ..evaluation.sources import Source
from .partition import Partition, hash_student

__all__ = [
    "FORMAT",
    "ROUTE_KEY",
    "ROUTING_FILE",
    "RoutedDenoiser",
    "load_routed_source",
    "read_routing",
    "routing_record",
    "student_for",
]

ROUTING_FILE = "routing.json"
FORMAT = "fewstep-msd-routing/1"
ROUTE_KEY = "msd_student"  # optional cond entry: the student index of each sample (text routing)
HASH_RULE = "sha256(prompt as UTF-8), first 8 bytes big-endian, mod num_students"


def routing_record(part: Partition, folders: Sequence[str]) -> dict[str, Any]:
    """The routing file's content for a partition and the students' folder names."""
    if part.kind == "labels":
        routes = {str(c): folders[k] for c, k in sorted(part.table().items())}
    else:
        routes = {part.prompts[i]: folders[k] for i, k in sorted(part.table().items())}
    rec = {
        "format": FORMAT,
        "kind": part.kind,
        "rule": part.rule,
        "num_students": len(folders),
        "students": list(folders),
        "routes": routes,
    }
    if part.rule == "hash":
        rec["hash"] = HASH_RULE
    return rec


def read_routing(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / ROUTING_FILE
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the MSD routing file {p}: {e}") from None
    if (
        rec.get("format") != FORMAT
        or not isinstance(rec.get("students"), list)
        or not isinstance(rec.get("routes"), dict)
    ):
        raise ValueError(f"{p} is not a fewstep MSD routing file (format {FORMAT!r} with 'students' and 'routes')")
    for s in rec["students"]:
        if not (Path(folder) / s).is_dir():
            raise ValueError(f"{p}: student folder {s!r} is missing")
    return rec


def student_for(rec: dict[str, Any], condition: int | str) -> int:
    """The index of the student (in rec["students"]) that owns a class label or a prompt."""
    key = str(int(condition)) if rec["kind"] == "labels" else str(condition)
    if rec["kind"] == "prompts" and rec.get("rule") == "hash":
        return hash_student(key, int(rec["num_students"]))
    if key not in rec["routes"]:
        what = "class label" if rec["kind"] == "labels" else "prompt"
        raise KeyError(
            f"{what} {condition!r} has no student in the routing file (rule {rec.get('rule')!r} routes "
            f"{len(rec['routes'])} {what}s)"
        )
    return rec["students"].index(rec["routes"][key])


class RoutedDenoiser(nn.Module):
    """K student Denoisers behind one Denoiser-shaped call: sample i goes to student route[label_i]
    (class labels), or to cond[ROUTE_KEY][i] when the condition carries student indices (text).

    Args:
        students: the K student Denoisers (same path and conditioning as the teacher).
        route:    (num_classes,) long tensor, label -> student; None for text routing.
    """

    def __init__(self, students: Sequence[nn.Module], route: Tensor | None = None):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.register_buffer(
            "route", route if route is not None else torch.zeros(0, dtype=torch.long), persistent=False
        )

    @property
    def path(self):
        return self.students[0].path

    @property
    def conditioner(self):
        return self.students[0].conditioner

    @property
    def backbone(self) -> nn.Module:
        """All students' backbones (for hashing the weights that were scored)."""
        return nn.ModuleList([s.backbone for s in self.students])

    @property
    def dtype(self) -> torch.dtype:
        return self.students[0].dtype

    def assign(self, cond: dict[str, Any] | None, batch: int) -> Tensor:
        if cond is not None and torch.is_tensor(cond.get(ROUTE_KEY)):
            idx = cond[ROUTE_KEY].long()
        elif cond is not None and torch.is_tensor(cond.get("class_labels")) and self.route.numel():
            labels = cond["class_labels"].long()
            bad = labels[(labels < 0) | (labels >= self.route.numel())]
            if bad.numel():
                raise ValueError(
                    f"class label(s) {bad.unique().tolist()} have no MSD student (labels 0.."
                    f"{self.route.numel() - 1} are routed)"
                )
            idx = self.route.to(labels.device)[labels]
        else:
            raise ValueError(
                "an MSD student set needs class labels or per-sample student indices "
                f"(cond[{ROUTE_KEY!r}]) to route each sample"
            )
        if idx.shape != (batch,):
            raise ValueError(f"routing: {tuple(idx.shape)} student indices for a batch of {batch}")
        return idx

    def forward(self, x_t: Tensor, t, cond: dict[str, Any] | None = None, guidance=1.0, output: str = "x0") -> Tensor:
        b = x_t.shape[0]
        idx = self.assign(cond, b).to(x_t.device)
        cond = {k: v for k, v in cond.items() if k != ROUTE_KEY}
        out: Tensor | None = None
        for k in idx.unique().tolist():
            sel = torch.nonzero(idx == k).flatten()
            tk = t[sel] if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == b else t
            gk = (
                guidance[sel]
                if torch.is_tensor(guidance) and guidance.ndim > 0 and guidance.shape[0] == b
                else guidance
            )
            o = self.students[int(k)](x_t[sel], tk, index_cond(cond, sel), gk, output=output)
            if not torch.is_tensor(o):
                raise ValueError(f"routing supports tensor outputs, not output={output!r}")
            if out is None:
                out = torch.empty((b, *o.shape[1:]), dtype=o.dtype, device=o.device)
            out[sel] = o
        return out


def load_routed_source(folder: Path, device: str, dtype: torch.dtype, student_weights: str = "student"):
    """An evaluation Source over an MSD export (routing.json + one pipeline folder per student) or
    an MSD run dir (run_card.json with an "msd" entry + student_<k>/ sub-runs)."""
    import dataclasses

    from ..evaluation.inputs import InputError
    from ..evaluation.sources import load_source

    folder = Path(folder)
    if (folder / ROUTING_FILE).is_file():
        try:
            rec = read_routing(folder)
        except ValueError as e:
            raise InputError(str(e)) from None
        subs = [load_source(str(folder / s), device, dtype) for s in rec["students"]]
        kind = "export"
    else:
        card = json.loads((folder / "run_card.json").read_text())
        part = Partition.from_json(card["msd"]["partition"])
        dirs = [s["dir"] for s in card["msd"]["students"]]
        rec = routing_record(part, dirs)
        subs = [load_source(str(folder / d), device, dtype, student_weights) for d in dirs]
        kind = "run"
    first = subs[0]
    for s in subs[1:]:
        if s.sampling != first.sampling or s.conditioning != first.conditioning:
            raise InputError(f"{folder}: the MSD students differ in sampler or conditioning ({s.name} vs {first.name})")
    route = None
    if rec["kind"] == "labels":
        n = first.num_classes or (max(int(c) for c in rec["routes"]) + 1)
        missing = [c for c in range(n) if str(c) not in rec["routes"]]
        if missing:
            raise InputError(f"{folder}: class labels {missing[:10]} have no student in the routing")
        route = torch.tensor([rec["students"].index(rec["routes"][str(c)]) for c in range(n)], dtype=torch.long)
    den = RoutedDenoiser([s.denoiser for s in subs], route).to(device)
    pipeline = None
    if kind == "export" and all(s.pipeline is not None for s in subs):
        from ..pipelines import MultiStudentPipeline

        pipeline = MultiStudentPipeline([s.pipeline for s in subs], rec, folder)
    info = {
        "source": str(folder),
        "msd": {
            "routing": {k: rec[k] for k in ("kind", "rule", "num_students", "students")},
            "students": [s.info.get("source") for s in subs],
        },
        "objective": "msd",
    }
    if "export_card" in first.info:
        info["export_card"] = first.info["export_card"]
    fields = {f.name: getattr(first, f.name) for f in dataclasses.fields(Source) if f.init}
    fields.update(name=str(folder), denoiser=den, pipeline=pipeline, info=info)
    if route is not None:
        fields["num_classes"] = first.num_classes or int(route.numel())
    return RoutedSource(**fields, routing=rec)


@dataclass
class RoutedSource(Source):
    """An evaluation Source over K routed MSD students; text captions get their student indices
    in the condition (ROUTE_KEY), class labels are routed by the denoiser's table."""

    routing: dict[str, Any] = field(default_factory=dict)

    def conds(self, labels, captions, device, embedded=None):
        cond = super().conds(labels, captions, device, embedded)
        if self.routing.get("kind") == "prompts":
            cond[ROUTE_KEY] = torch.tensor(
                [student_for(self.routing, c) for c in captions], dtype=torch.long, device=device
            )
        return cond
