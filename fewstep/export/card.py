"""The fewstep_card.json of an exported student: what it is, how its pipeline samples it, where it
came from (the README.md model card is rendered from it by `model_card.py`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ._common import CARD_FORMAT
from .drives import METHODS, Drive
from .hub import base_model_id, teacher_license
from .plan import SchedulerPlan
from .run_dir import _find_results, _Run


def _card(
    run: _Run,
    source: str,
    tdir: Path,
    tsched: dict,
    pipeline_class: str,
    drive: Drive,
    plan: SchedulerPlan,
    arch_diff: list[str],
    lora_info: dict | None,
    eval_results,
    bb_file_sha: str,
) -> dict[str, Any]:
    import diffusers

    card = run.card
    params = card.get("objective_params") or {}
    trained = len(run.sampling["times"]) - 1
    ge = run.sampling.get("guidance_embedding")
    guidance_scale = float(ge.get("guidance", 1.0)) if isinstance(ge, dict) else 1.0
    teacher_block = card.get("teacher") if isinstance(card.get("teacher"), dict) else {}
    return {
        "format": CARD_FORMAT,
        "name": card.get("name"),
        "objective": card.get("objective"),
        "method": METHODS.get(str(card.get("objective")), str(card.get("objective"))),
        "objective_params": params,
        "teacher": _teacher_record(teacher_block, source, pipeline_class, tdir, tsched),
        "sampling": run.sampling,
        "pipeline_class": pipeline_class,
        "backbone": drive.backbone,
        "conditioning": drive.conditioning,
        "scheduler": {
            "class": plan.scheduler_class,
            "route": plan.route,
            "notes": plan.notes,
            "boundary_scalings": plan.boundary,
        },
        "trained_steps": trained,
        "supported_steps": {str(n): v for n, v in sorted(plan.supported.items())},
        "guidance_scale": guidance_scale,
        "teacher_guidance_in_training": _teacher_guidance(params),
        "fresh_noise": run.sampling.get("renoise") == "fresh" and trained > 1,
        "noise_source": _noise_source(drive),
        "requires_patch": plan.needs_patch,
        "weights": {
            "which": run.weights,
            "from": str(run.student_file),
            "checkpoint": str(run.checkpoint) if run.checkpoint else None,
            "sha256": bb_file_sha,
            "architecture_differs_from_teacher_in": arch_diff,
            "lora": run.lora,
        },
        "lora_adapter": lora_info,
        "hybrid": {
            "command": "fewstep eval --pipeline <this folder> --hybrid K --teacher-guidance W",
            "python": "fewstep.samplers.sample_hybrid(teacher, student, noise, cond, times[:K+1], times[K:], "
            "guidance=W)",
            "teacher_source": source,
        },
        "metrics": _find_results(run.run_dir, eval_results),
        "run": {
            "dir": str(run.run_dir),
            "card": str(run.card_path),
            "steps": card.get("steps"),
            "wall_time_s": card.get("wall_time_s"),
        },
        "exported": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
        },
    }


def _teacher_record(block: dict, source: str, pipeline_class: str, tdir: Path, tsched: dict) -> dict[str, Any]:
    """The card's teacher entry: the run card's record of it, where it was read, and its scheduler."""
    return {
        "source": source,
        "family": block.get("family"),
        "pipeline_class": pipeline_class,
        "folder": str(tdir),
        "latent_shape": block.get("latent_shape"),
        "num_classes": block.get("num_classes"),
        "scheduler_class": tsched.get("_class_name"),
        "num_train_timesteps": tsched.get("num_train_timesteps"),
        "license": teacher_license(source, tdir),  # the student inherits it (hub.py)
        "base_model": base_model_id(source, tdir),
    }


def _teacher_guidance(params: dict[str, Any]) -> Any:
    """The CFG scale the teacher was run with in training: a number, a [min, max] range (LCM draws
    w from one) or None."""
    if isinstance(params.get("guidance_min"), (int, float)) and isinstance(params.get("guidance_max"), (int, float)):
        return [params["guidance_min"], params["guidance_max"]]
    return next((params[k] for k in ("guidance", "teacher_guidance") if isinstance(params.get(k), (int, float))), None)


def _noise_source(drive: Drive) -> str:
    """Where the pipeline's fresh noise between steps comes from, so a user can seed it."""
    noise = (
        "the pipeline's `generator` (passed to scheduler.step)"
        if drive.step_generator
        else "torch's global RNG (the pipeline calls scheduler.step without a generator): call torch.manual_seed(s) "
        "right before the pipeline"
    )
    if drive.flux_sigmas:
        noise += "; FluxPipeline draws it in its packed (B, H/2 * W/2, 4C) layout"
    return noise
