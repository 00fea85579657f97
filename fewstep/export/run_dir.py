"""Reading what export starts from: a run dir or checkpoint (its card, its weights files), the
teacher's pipeline folder, and the `fewstep eval` results recorded beside the run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import RUN_CARD_NAMES, ExportError, _read_json


@dataclass
class _Run:
    run_dir: Path
    card: dict[str, Any]
    card_path: Path
    teacher_source: str
    sampling: dict[str, Any]
    weights: str  # "student" / "student_ema"
    student_folder: Path | None = None  # a diffusers model folder (config.json + weights)
    student_file: Path | None = None  # its weights file
    checkpoint: Path | None = None  # a training checkpoint folder (weights from its files)
    lora_file: Path | None = None  # the adapter alone (run dir final/<weights>_lora.safetensors)
    lora: dict[str, Any] | None = None  # {"rank", "alpha"} of a LoRA student


def _read_run(checkpoint: str | os.PathLike, weights: str) -> _Run:
    if weights not in ("student", "student_ema"):
        raise ExportError(f"weights must be 'student' or 'student_ema', got {weights!r}")
    p = Path(checkpoint)
    if not p.is_dir():
        raise ExportError(f"--checkpoint {str(p)!r} is not a folder (give a run dir or <run>/checkpoints/step_N)")
    ckpt = None
    if (p / "state.json").is_file():
        ckpt, run_dir = p, p.parent.parent
        from ..training.manifest import verify_manifest

        problem = verify_manifest(p)
        if problem is not None and "no manifest.json" not in problem:  # older checkpoints have none
            raise ExportError(f"--checkpoint {str(p)!r} is damaged: {problem}")
    else:
        run_dir = p
    card_path = next((run_dir / n for n in RUN_CARD_NAMES if (run_dir / n).is_file()), None)
    if card_path is None:
        where = f"its run dir {run_dir}" if ckpt else str(run_dir)
        raise ExportError(
            f"{where} has no run_card.json (the training entry point writes it when a run finishes; it "
            "names the teacher and the student's sampling times). Export a finished run."
        )
    card = _read_json(card_path)
    teacher = card.get("teacher")
    src = teacher.get("source") if isinstance(teacher, dict) else teacher
    if not isinstance(src, str) or not src:
        raise ExportError(f"run card {card_path} does not name its teacher ('teacher': {{'source': ...}})")
    sampling = card.get("sampling")
    if not isinstance(sampling, dict) or "times" not in sampling:
        raise ExportError(f"run card {card_path} has no 'sampling' entry with the student's times")
    lora = card.get("lora") if isinstance(card.get("lora"), dict) and card["lora"].get("student") else None
    run = _Run(run_dir, card, card_path, src, sampling, weights, checkpoint=ckpt, lora=lora)
    if ckpt is not None:
        f = ckpt / ("ema.safetensors" if weights == "student_ema" else "model.safetensors")
        if not f.is_file() and (ckpt / "shards").is_dir():
            raise ExportError(
                f"checkpoint {ckpt} is sharded (FSDP, torch.distributed.checkpoint): export the finished "
                "run dir, whose final weights are gathered, or save full checkpoints "
                "(checkpoint.state_dict=full)"
            )
        if not f.is_file():
            raise ExportError(f"checkpoint {ckpt} has no {f.name} (weights={weights!r})")
        run.student_file = f
        return run
    files = card.get("files") or {}
    cands = []
    if isinstance(files.get(weights), str):
        cands.append(run_dir / files[weights])
    cands += [run_dir / "final" / weights]
    for c in cands:
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
            if c.is_dir() and (c / name).is_file():
                run.student_folder, run.student_file = c, c / name
                break
        if run.student_file is not None:
            break
    if run.student_file is None:
        have = ", ".join(sorted(k for k in files if k.startswith("student"))) or "none"
        raise ExportError(
            f"run dir {run_dir} holds no {weights} weights (looked in "
            f"{', '.join(str(c) for c in cands)}; the run card lists: {have})"
        )
    # the adapter of these very weights (the run writes the raw student's; an EMA has none)
    lf = files.get(f"{weights}_lora")
    if isinstance(lf, str) and (run_dir / lf).is_file():
        run.lora_file = run_dir / lf
    elif (run_dir / "final" / f"{weights}_lora.safetensors").is_file():
        run.lora_file = run_dir / "final" / f"{weights}_lora.safetensors"
    return run


def _teacher_folder(source: str, scratch: Path) -> Path:
    """A pipeline folder for `source`: the folder itself, the embedded teacher's folder, a hub id
    from the local cache, or (an embedded teacher only in memory) the pipeline saved to `scratch`."""
    p = Path(source)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ExportError(f"teacher {source!r} has no model_index.json: not a diffusers pipeline folder")
        return p
    from ..pipeline_teacher import DIGITS_TEACHERS

    if source in DIGITS_TEACHERS:
        from ..digits.data import WEIGHTS_DIR

        folder = WEIGHTS_DIR / f"teacher_{source.split('-', 1)[1]}"
        if (folder / "model_index.json").is_file():
            return folder
        from ..pipeline_teacher import load_teacher

        try:
            t = load_teacher(source)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"the embedded teacher {source!r} is not available: {e}") from e
        if t.pipeline_dir and (Path(t.pipeline_dir) / "model_index.json").is_file():
            return Path(t.pipeline_dir)
        if t.pipeline is None:
            raise ExportError(f"the embedded teacher {source!r} has no pipeline to copy components from")
        scratch.mkdir(parents=True, exist_ok=True)
        t.pipeline.save_pretrained(scratch, safe_serialization=True)
        return scratch
    if p.exists() or source.startswith((".", "/", "~")):
        raise ExportError(f"teacher {source!r} (from the run card) is not a pipeline folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"teacher {source!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(e).__name__}); nothing is downloaded here: download it first or pass "
            "--teacher <folder>"
        ) from None


def _find_results(run_dir: Path, extra: Sequence[str | os.PathLike] = ()) -> list[dict[str, Any]]:
    """Summaries of complete `fewstep eval` results (results.json) found under the run dir (up to
    three levels down) or given explicitly."""
    files = [Path(e) for e in extra]
    for depth in ("results.json", "*/results.json", "*/*/results.json", "*/*/*/results.json"):
        files += sorted(run_dir.glob(depth))
    out, seen = [], set()
    for f in files:
        f = f.resolve()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        try:
            res = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not str(res.get("format", "")).startswith("fewstep-eval") or not res.get("complete"):
            continue
        rows = []
        for r in res.get("rows", []):
            ms = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in (r.get("metrics") or {}).items()}
            rows.append(
                {
                    "steps": r.get("steps"),
                    "guidance": r.get("guidance"),
                    "hybrid": r.get("hybrid"),
                    "sampler": r.get("sampler"),
                    "num_samples": r.get("num_samples"),
                    "metrics": ms,
                }
            )
        out.append(
            {
                "file": str(f),
                "protocol": (res.get("protocol") or {}).get("name"),
                "command": res.get("command"),
                "rows": rows,
            }
        )
    return out
