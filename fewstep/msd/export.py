"""Export of an MSD run: one stock diffusers pipeline folder per student (each written by
`fewstep.export.export_student` from the student's sub-run, so each loads and samples with stock
diffusers alone), a routing file (condition -> folder) and a model card that explains it.

    <out>/student_0/ ... student_<K-1>/   stock pipeline folders (model_index.json, fewstep_card.json)
    <out>/routing.json                    see fewstep.msd.routing
    <out>/README.md                       the routing, per-student cards, how to load and sample
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .partition import Partition
from .routing import ROUTING_FILE, routing_record

__all__ = ["export_msd", "is_msd_run"]


def is_msd_run(run_dir: str | os.PathLike) -> bool:
    p = Path(run_dir) / "run_card.json"
    if not p.is_file():
        return False
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return card.get("objective") == "msd" and isinstance(card.get("msd"), dict)


def export_msd(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, **kwargs: Any):
    """Export every student of a finished MSD run dir under `out` (atomically), plus routing.json
    and README.md. `kwargs` go to `export_student` for each student (weights, teacher, lora, ...).
    Returns the first student's ExportResult with the MSD card in place of its own."""
    from ..export import ExportError, ExportResult, atomic_folder, export_student

    t0 = time.time()
    run_dir, out = Path(run_dir), Path(out)
    card = json.loads((run_dir / "run_card.json").read_text(encoding="utf-8"))
    msd = card["msd"]
    part = Partition.from_json(msd["partition"])
    dirs = [s["dir"] for s in msd["students"]]
    for d in dirs:
        if not (run_dir / d / "run_card.json").is_file():
            raise ExportError(f"MSD run {run_dir}: student run {d} has not finished (no run_card.json)")
    results = []
    with atomic_folder(out, overwrite) as tmp:
        for d in dirs:
            results.append(export_student(run_dir / d, tmp / d, **kwargs))
        rec = routing_record(part, dirs)
        first = results[0].card
        rec.update(
            {
                "pipeline_class": first["pipeline_class"],
                "backbone": first["backbone"],
                "conditioning": first["conditioning"],
                "guidance_scale": first["guidance_scale"],
                "supported_steps": sorted(
                    set.intersection(*(set(r.card["supported_steps"]) for r in results)), key=int
                ),
                "sampling": first["sampling"],
                "students_info": [
                    {
                        "folder": d,
                        "conditions": part.subsets[k]
                        if part.kind == "labels"
                        else [part.prompts[i] for i in part.subsets[k]],
                        "scheduler": results[k].card["scheduler"]["class"],
                        "architecture_differs_from_teacher_in": results[k].card["weights"][
                            "architecture_differs_from_teacher_in"
                        ],
                    }
                    for k, d in enumerate(dirs)
                ],
                "teacher": first["teacher"]["source"],
                "run": {
                    "dir": str(run_dir),
                    "steps": card.get("steps"),
                    "steps_per_student": card.get("steps_per_student"),
                },
                "student_width": msd.get("student_width", 1.0),
                "student_depth": msd.get("student_depth", 1.0),
            }
        )
        (tmp / ROUTING_FILE).write_text(json.dumps(rec, indent=1) + "\n")
        (tmp / "README.md").write_text(render_card(rec, card))
    res = results[0]
    return ExportResult(out, res.pipeline_class, res.plan, rec, time.time() - t0)


def render_card(rec: dict[str, Any], run_card: dict[str, Any]) -> str:
    """The export's README: what MSD is, the routing, how to sample with and without fewstep."""
    k = rec["num_students"]
    steps = rec["supported_steps"]
    n = steps[0] if steps else "1"
    small = rec.get("student_width", 1.0) < 1 or rec.get("student_depth", 1.0) < 1
    lines = [
        f"# {run_card.get('name', 'MSD students')}: {k} one-step students (multi-student distillation)",
        "",
        f"Distilled from `{rec['teacher']}` with MSD: the conditions were split over {k} students, and each "
        "student was trained with DMD2 on its own subset only"
        + (
            f" (smaller students: width x{rec['student_width']:g}, depth x{rec['student_depth']:g} of the teacher's "
            "architecture, pre-trained by score matching on the teacher's outputs first)."
            if small
            else " (each initialised from the teacher)."
        ),
        "",
        "## Routing",
        "",
        (
            f"`{ROUTING_FILE}` says which student folder owns each condition (rule `{rec['rule']}`). "
            "Sample a condition with the pipeline in its folder; any other student would see a condition it "
            "was never trained on."
        ),
        "",
    ]
    if rec["kind"] == "labels":
        lines += ["| student folder | class labels |", "|---|---|"]
        lines += [f"| `{s['folder']}` | {', '.join(map(str, s['conditions']))} |" for s in rec["students_info"]]
    else:
        if rec["rule"] == "hash":
            lines += [f"Prompts go to `students[{rec['hash']}]`; any prompt can be routed this way."]
        else:
            lines += [
                (
                    f"Rule `{rec['rule']}` routes the {len(rec['routes'])} training prompts listed in "
                    f"`{ROUTING_FILE}` (`routes`); other prompts have no student."
                )
            ]
        lines += ["", "| student folder | prompts |", "|---|---|"]
        lines += [f"| `{s['folder']}` | {len(s['conditions'])} |" for s in rec["students_info"]]
    arg = "class_labels=[3, 7]" if rec["kind"] == "labels" else "prompt=['a photo of a cat']"
    example = "3" if rec["kind"] == "labels" else "<prompt>"
    lines += [
        "",
        "## Sampling",
        "",
        (
            f"Each `student_<k>/` is a stock `{rec['pipeline_class']}` folder (its own `README.md` and "
            f"`fewstep_card.json` give the scheduler and step counts: {', '.join(steps) or 'none'}); "
            f"guidance_scale {rec['guidance_scale']:g}."
        ),
        "",
        "With fewstep's plain-Python router (no remote code):",
        "",
        "```python",
        "import torch",
        "from fewstep.pipelines import MultiStudentPipeline",
        "",
        "pipe = MultiStudentPipeline.from_pretrained('<this folder>')",
        f"images = pipe({arg}, num_inference_steps={n},",
        "             generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images",
        "```",
        "",
        "With diffusers alone: read `routing.json`, pick the folder for your condition, and load it:",
        "",
        "```python",
        "import json, diffusers",
        "routes = json.load(open('<this folder>/routing.json'))['routes']",
        f"pipe = diffusers.DiffusionPipeline.from_pretrained('<this folder>/' + routes['{example}'])",
        "```",
        "",
        (
            "Evaluate the whole set as one model: `fewstep eval --pipeline <this folder>` (each sample is "
            "generated by its condition's student)."
        ),
        "",
    ]
    return "\n".join(lines)
