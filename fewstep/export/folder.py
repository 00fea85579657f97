"""Writing the pipeline folder: the teacher's components, the student's backbone, the scheduler,
the LoRA adapter and the cards, atomically."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..decoder import install_decoder
from ..weights_check import check_weights_folder
from ._common import CARD_NAME, LORA_DIR, ExportError, _read_json
from .card import _card
from .drives import DRIVES, Drive
from .plan import SchedulerPlan, plan_scheduler
from .run_dir import _read_run, _Run, _teacher_folder
from .weights import _check_fit, _checkpoint_state, _header, _read_adapter, _sha256, _write_lora

__all__ = ["ExportResult", "export_student", "atomic_folder"]


@dataclass
class ExportResult:
    out: Path
    pipeline_class: str
    plan: SchedulerPlan
    card: dict[str, Any]
    seconds: float


def _guard_paths(out: Path, protected: Sequence[Path]) -> None:
    o = out.resolve()
    for p in protected:
        q = p.resolve()
        if o == q or o in q.parents:
            raise ExportError(f"--out {out} is (or contains) {p}, an input of this export; choose another folder")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` by rename."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_component(src: Path, dst: Path, link: bool) -> None:
    if not link:
        shutil.copytree(src, dst, symlinks=False)
        return

    def hard(s, d):
        try:
            os.link(os.path.realpath(s), d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=False, copy_function=hard)


def export_student(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str = "student",
    overwrite: bool = False,
    teacher: str | None = None,
    lora: str = "auto",
    eval_results: Sequence[str | os.PathLike] = (),
    link_components: bool = False,
    decoder: str | os.PathLike | None = None,
) -> ExportResult:
    """Write a stock diffusers pipeline folder for a trained student.

    Args:
        checkpoint: a finished run dir (run_card.json + final/) or one of its checkpoints
            (<run>/checkpoints/step_N).
        out: the folder to write (atomically; see `overwrite`).
        weights: "student" or "student_ema" (the EMA weights the run kept, if any).
        overwrite: replace a non-empty `out`.
        teacher: a pipeline folder to use instead of the run card's teacher source (e.g. the same
            teacher on another machine).
        lora: "auto" (write the adapter for LoRA students whose pipeline class loads LoRA),
            "off", or "required" (fail if it cannot be written).
        eval_results: results.json files of `fewstep eval` to summarise in the card (results under
            the run dir are found on their own).
        link_components: hard-link the teacher's component files instead of copying them.
        decoder: a `fewstep distill-decoder` folder to load as the pipeline's `vae` (the
            teacher's full VAE is kept in `vae_full/`, outside model_index.json).
    Returns an ExportResult (the folder, the scheduler plan, the card).
    """
    t0 = time.time()
    from ..msd.export import export_msd, is_msd_run

    if is_msd_run(checkpoint):  # K students: one pipeline folder each + routing.json (fewstep/msd/export.py)
        if decoder is not None:
            raise ExportError("--decoder is not supported for multi-student (MSD) runs yet")
        options = {"overwrite": overwrite, "weights": weights, "teacher": teacher, "lora": lora}
        return export_msd(checkpoint, out, **options, eval_results=eval_results, link_components=link_components)
    if lora not in ("auto", "off", "required"):
        raise ExportError(f"lora must be 'auto', 'off' or 'required', got {lora!r}")
    run = _read_run(checkpoint, weights)
    source = teacher or run.teacher_source
    out = Path(out)
    scratch_root = out.parent / f".{out.name}.teacher-{os.getpid()}"
    try:
        tp = _read_teacher(run, source, out, scratch_root)
        plan = plan_scheduler(
            tp.pipeline_class,
            tp.scheduler_config,
            run.sampling,
            run.card.get("objective"),
            run.card.get("objective_params") or {},
        )
        student = _read_student(run, tp)
        with atomic_folder(out, overwrite) as tmp:
            card = _write_folder(tmp, run, tp, student, plan, source, lora, eval_results, link_components, decoder)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    return ExportResult(out, tp.pipeline_class, plan, card, time.time() - t0)


def _write_folder(
    tmp: Path,
    run: _Run,
    tp: _TeacherParts,
    student: Any,
    plan: SchedulerPlan,
    source: str,
    lora: str,
    eval_results: Sequence[str | os.PathLike],
    link_components: bool,
    decoder: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fill the folder being written: the teacher's other components, the student's backbone, the
    scheduler, the LoRA adapter where it applies, the card and its README. Returns the card."""
    from .model_card import render_readme

    _copy_teacher_components(tp, tmp, link_components)
    bb_file = _write_backbone(run, tp, student, tmp)
    _write_scheduler(tp, plan, tmp)
    lora_info = _lora_part(run, tp, student, lora, tmp)
    decoder_info = install_decoder(tmp, decoder) if decoder is not None else None
    card = _card(
        run,
        source,
        tp.folder,
        tp.scheduler_config,
        tp.pipeline_class,
        tp.drive,
        plan,
        student.arch_diff,
        lora_info,
        eval_results,
        bb_file_sha=_sha256(bb_file),
    )
    if decoder_info is not None:
        card["decoder"] = decoder_info
    (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(render_readme(card))
    return card


@dataclass
class _TeacherParts:
    folder: Path  # the teacher's pipeline folder
    index: dict[str, Any]  # its model_index.json
    pipeline_class: str
    drive: Drive
    backbone_class: str  # the class of its backbone component
    scheduler_config: dict[str, Any]  # its scheduler config, with `_class_name`


def _read_teacher(run: _Run, source: str, out: Path, scratch_root: Path) -> _TeacherParts:
    """The teacher's folder, pipeline class, backbone class and scheduler config, checked."""
    tdir = _teacher_folder(source, scratch_root)
    _guard_paths(out, [run.run_dir, tdir] + ([run.checkpoint] if run.checkpoint else []))
    index = _read_json(tdir / "model_index.json")
    pipeline_class = str(index.get("_class_name"))
    if pipeline_class not in DRIVES:
        raise ExportError(f"teacher {source!r} is a {pipeline_class}; export supports {', '.join(DRIVES)}")
    drive = DRIVES[pipeline_class]
    if drive.backbone not in index or not (tdir / drive.backbone).is_dir():
        raise ExportError(f"teacher folder {tdir} has no {drive.backbone!r} component")
    bb_cls = index[drive.backbone][1]
    sched_file = tdir / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise ExportError(f"teacher folder {tdir} has no scheduler/scheduler_config.json")
    tsched = _read_json(sched_file)
    tsched.setdefault("_class_name", index.get("scheduler", [None, ""])[1])
    return _TeacherParts(tdir, index, pipeline_class, drive, bb_cls, tsched)


@dataclass
class _Student:
    config: dict[str, Any]  # the backbone config to write
    arch_diff: list[str]  # config keys that differ from the teacher's
    state: dict[str, Tensor] | None  # full state (from a checkpoint), or None: copy the weights file
    adapter: dict[str, Tensor] | None  # the LoRA adapter alone, if any
    adapter_meta: dict[str, Any]  # its rank and alpha


def _read_student(run: _Run, tp: _TeacherParts) -> _Student:
    """The student's backbone config and weights (checked against that config) and its LoRA adapter."""
    drive, bb_cls = tp.drive, tp.backbone_class
    teacher_cfg = _read_json(tp.folder / drive.backbone / "config.json")
    if run.student_folder is not None and (run.student_folder / "config.json").is_file():
        student_cfg = _read_json(run.student_folder / "config.json")
    else:
        student_cfg = dict(teacher_cfg)
    if student_cfg.get("_class_name", bb_cls) != bb_cls:
        raise ExportError(
            f"the student is a {student_cfg.get('_class_name')} but the teacher's {drive.backbone} is a {bb_cls}"
        )
    student_cfg["_class_name"] = bb_cls
    arch_diff = sorted(
        k
        for k in set(student_cfg) | set(teacher_cfg)
        if not k.startswith("_") and student_cfg.get(k) != teacher_cfg.get(k)
    )
    adapter: dict[str, Tensor] | None = None
    adapter_meta: dict[str, Any] = {}
    if run.checkpoint is not None:
        state, adapter = _checkpoint_state(run, tp.folder / drive.backbone, bb_cls, student_cfg)
        if adapter is not None:
            adapter_meta = {"rank": run.lora["rank"], "alpha": run.lora["alpha"]}
    else:
        state = None
        _check_fit(bb_cls, student_cfg, _header([run.student_file]), f"student weights {run.student_file}")
        if run.lora_file is not None:
            adapter, m = _read_adapter(run.lora_file)
            adapter_meta = {
                "rank": int(m.get("rank") or (run.lora or {}).get("rank") or 0),
                "alpha": float(m.get("alpha") or (run.lora or {}).get("alpha") or 0),
            }
    return _Student(student_cfg, arch_diff, state, adapter, adapter_meta)


def _copy_teacher_components(tp: _TeacherParts, tmp: Path, link: bool) -> None:
    """Everything of the teacher's but the backbone and the scheduler, and its licence files."""
    for key, val in tp.index.items():
        if key.startswith("_") or key in (tp.drive.backbone, "scheduler"):
            continue
        if isinstance(val, list) and val and val[0] is not None and (tp.folder / key).is_dir():
            check_weights_folder(tp.folder / key, f"teacher component {key!r}")  # never copy damaged weights
            _copy_component(tp.folder / key, tmp / key, link)
    for f in tp.folder.iterdir():
        if f.is_file() and f.name.lower().startswith(("license", "licence", "notice")):
            shutil.copy2(f, tmp / f.name)


def _write_backbone(run: _Run, tp: _TeacherParts, student: _Student, tmp: Path) -> Path:
    """The student's backbone folder; returns its weights file."""
    bdir = tmp / tp.drive.backbone
    bdir.mkdir()
    (bdir / "config.json").write_text(json.dumps(student.config, indent=2, sort_keys=True, default=list))
    if student.state is None:
        shutil.copy2(run.student_file, bdir / "diffusion_pytorch_model.safetensors")
    else:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in student.state.items()}, str(bdir / "diffusion_pytorch_model.safetensors")
        )
    return bdir / "diffusion_pytorch_model.safetensors"


def _write_scheduler(tp: _TeacherParts, plan: SchedulerPlan, tmp: Path) -> None:
    """The planned scheduler and the model index that names it."""
    import diffusers

    plan.scheduler().save_pretrained(str(tmp / "scheduler"))
    new_index = dict(tp.index)
    new_index["scheduler"] = ["diffusers", plan.scheduler_class]
    new_index["_diffusers_version"] = diffusers.__version__
    (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True))


def _lora_part(run: _Run, tp: _TeacherParts, student: _Student, lora: str, tmp: Path) -> dict[str, Any] | None:
    """Write the LoRA adapter where the pipeline class loads it; what the card says about it."""
    pipeline_class, weights = tp.pipeline_class, run.weights
    if student.adapter is not None and lora != "off":
        if tp.drive.lora is None:
            if lora == "required":
                raise ExportError(
                    f"{pipeline_class} has no load_lora_weights; the adapter cannot be exported "
                    "in a form it loads (the fused weights are exported)"
                )
            return {
                "written": False,
                "reason": f"{pipeline_class} does not load LoRA weights "
                "(no LoRA loader mixin); the folder holds the fused weights",
            }
        if not student.adapter_meta.get("rank"):
            raise ExportError("the LoRA adapter has no rank / alpha (run card 'lora' or file metadata)")
        return {
            "written": True,
            **_write_lora(
                pipeline_class,
                tp.drive,
                student.adapter,
                student.adapter_meta["rank"],
                student.adapter_meta["alpha"],
                tmp / LORA_DIR,
            ),
        }
    if lora == "required":
        raise ExportError(
            f"lora='required' but there is no LoRA adapter for the {weights} weights "
            + ("(the run saves the raw student's adapter only)" if run.lora else "(the student was trained in full)")
        )
    if run.lora and lora != "off":
        return {
            "written": False,
            "reason": f"the run holds no adapter file for the {weights} weights; the folder holds the fused weights",
        }
    return None
