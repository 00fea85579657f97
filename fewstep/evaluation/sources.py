"""What is evaluated: a teacher (by name or pipeline folder), an exported student pipeline
folder, or a training run dir, turned into one `Source` (evaluation/generation.py) that generates images.

    src = load_source("digits-vp")                 # teacher: steps = DDIM / Euler steps
    src = load_source("exports/dmd2-digits")       # exported student: its recorded times
    src = load_source("runs/digits-dmd2")          # run dir: teacher + student weights + run card
    src = load_source("runs/digits-dmd2/checkpoints/step_0000500")   # a checkpoint of a finished run
    images, seconds = src.generate(1, seeds=range(8), labels=torch.arange(8) % 10)   # (8, C, H, W) in [-1, 1]

Teachers sample with their own schedule (`path.sampling_times(steps)`, deterministic DDIM /
Euler, i.e. what their stock scheduler does). Students sample with the times recorded when they
were trained (run card or export card: `{"times": [...], "renoise": "fresh" | "ddim"}`) when the
step count matches, or with evenly spaced times from 1 (the same spacing as DMD2's
999, 749, 499, 249) at other step counts; which one was used is recorded with each result.

Noise: sample i starts from noise drawn from its own CPU generator seeded with `seed + i`, so an
image does not depend on the batch it is generated in; fresh noise between the steps of a
stochastic student comes from one generator per batch (seeded from the seed and the batch's
first index), so it depends on --batch-size, which is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import read_json
from ..families import family_of, is_text
from .generation import Source, uniform_times
from .inputs import InputError
from .protocols import file_sha256

__all__ = ["Source", "load_source", "uniform_times", "TEACHER_NAMES"]

TEACHER_NAMES = ("digits-vp", "digits-flow")
RUN_CARD_NAMES = ("run_card.json", "card.json", "run.json")
EXPORT_CARD_NAMES = ("fewstep_card.json", "fewstep.json", "export_card.json")


# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return read_json(path, InputError)


def _vae_decoder(vae) -> Callable[[Tensor], Tensor]:
    from ..pipeline_teacher import vae_scale_shift

    sf, shift = vae_scale_shift(vae)

    def decode(lat: Tensor) -> Tensor:
        z = (lat.float() / sf + shift).to(device=next(vae.parameters()).device, dtype=vae.dtype)
        return vae.decode(z).sample.float()

    return decode


def _teacher_guidance(teacher: Any, name: str) -> tuple[float, str]:
    """The CFG scale a teacher recommends: its `.guidance` attribute, or for the embedded teachers
    the `guidance` entry of fewstep/digits/weights/teachers.json (the scale their table was made
    with); 1 (no guidance) otherwise."""
    v = getattr(teacher, "guidance", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), "teacher.guidance"
    if name in TEACHER_NAMES:
        from ..digits.data import WEIGHTS_DIR

        path, kind = WEIGHTS_DIR / "teachers.json", name.split("-", 1)[1]
        card = _read_json(path).get(kind) if path.is_file() else None
        g = card.get("guidance") if isinstance(card, dict) else None
        if isinstance(g, (int, float)) and not isinstance(g, bool):
            return float(g), f"{path.name}[{kind!r}]['guidance']"
    return 1.0, "default (no guidance recommended by the teacher)"


def _from_teacher(teacher: Any, kind: str, name: str, info: dict[str, Any]) -> Source:
    den = teacher.denoiser
    decode = (
        teacher.decode
        if callable(getattr(teacher, "decode", None))
        else (_vae_decoder(teacher.vae) if getattr(teacher, "vae", None) is not None else (lambda z: z.float()))
    )
    enc = getattr(teacher, "encode_prompts", None)
    fam = family_of(den.backbone)
    cond_kind = "labels" if (fam is not None and not fam.text) or getattr(teacher, "num_classes", None) else "captions"
    if is_text(getattr(teacher, "family", None)):
        cond_kind = "captions"
    num_classes = getattr(teacher, "num_classes", None)
    labels = getattr(getattr(teacher, "pipeline", None), "labels", None)
    if cond_kind == "labels" and num_classes is None and labels:
        num_classes = len(labels)
    g, gsrc = _teacher_guidance(teacher, name) if kind == "teacher" else (1.0, "student (guidance distilled)")
    pipe = getattr(teacher, "pipeline", None)
    if pipe is not None and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return Source(
        kind=kind,
        name=name,
        denoiser=den,
        decode=decode,
        latent_shape=tuple(teacher.latent_shape),
        conditioning=cond_kind,
        num_classes=num_classes,
        encode_prompts=enc if callable(enc) else None,
        default_guidance=g,
        guidance_source=gsrc,
        # a run dir's student is not in its teacher's pipeline: no stock pipeline to run
        pipeline=None if isinstance(teacher, _TeacherView) else pipe,
        info={
            "family": getattr(teacher, "family", None),
            "pipeline_class": getattr(teacher, "pipeline_class", None),
            "pipeline_dir": str(getattr(teacher, "pipeline_dir", "") or "") or None,
            **info,
        },
    )


def _load_teacher(source: str, device: str, dtype: torch.dtype):
    """fewstep.pipeline_teacher.load_teacher; for the embedded names, if that cannot wrap what
    fewstep.digits.embedded_teachers returns, their shipped DiTPipeline folder is loaded as a folder."""
    from ..pipeline_teacher import load_teacher

    try:
        return load_teacher(source, device=device, dtype=dtype)
    except (ValueError, OSError) as e:  # a missing or damaged pipeline folder: one line naming it
        if isinstance(e, InputError):
            raise
        msg = " ".join(str(e).split())
        raise InputError(msg if source in msg else f"teacher {source!r}: {msg}") from e
    except TypeError:
        if source not in TEACHER_NAMES:
            raise
        from ..digits.embedded_teachers import teacher_dir

        return load_teacher(str(teacher_dir(source.split("-", 1)[1])), family="dit", device=device, dtype=dtype)


def _export_card(folder: Path) -> dict | None:
    for n in EXPORT_CARD_NAMES:
        if (folder / n).is_file():
            return _read_json(folder / n)
    return None


def _card_teacher(card: dict | None) -> str | None:
    t = (card or {}).get("teacher")
    if isinstance(t, dict):
        t = t.get("source")
    return t if isinstance(t, str) and t else None


def load_source(
    source: str, device: str = "cpu", dtype: torch.dtype = torch.float32, student_weights: str = "student"
) -> Source:
    """Resolve --pipeline: a teacher name, a pipeline folder (teacher or exported student) or a
    training run dir (its raw student weights, or with student_weights="student_ema" its EMA).
    Raises InputError naming the path for anything else."""
    p = Path(source)
    if source in TEACHER_NAMES:
        t = _load_teacher(source, device, dtype)
        return _from_teacher(t, "teacher", source, {"source": source})
    if not p.exists():
        raise InputError(
            f"--pipeline {source!r} is neither a teacher name ({', '.join(TEACHER_NAMES)}) nor an existing folder"
        )
    if p.is_dir() and ((p / "routing.json").is_file() or _is_msd_run(p)):  # K routed students (MSD)
        from ..msd.routing import load_routed_source

        return load_routed_source(p, device, dtype, student_weights)
    if p.is_dir() and any((p / n).is_file() for n in RUN_CARD_NAMES) and not (p / "model_index.json").is_file():
        return _load_run(p, device, dtype, student_weights)
    if p.is_dir() and (p / "state.json").is_file() and (p / "model.safetensors").is_file():
        return _load_checkpoint(p, device, dtype, student_weights)
    if p.is_dir() and (p / "model_index.json").is_file():
        t = _load_teacher(str(p), device, dtype)
        card = _export_card(p)
        sampling = (card or {}).get("sampling")
        kind = "student" if sampling else "teacher"
        src = _from_teacher(t, kind, source, {"source": str(p), "export_card": card})
        src.sampling = sampling
        teacher_src = _card_teacher(card)
        if kind == "student" and teacher_src:
            src.teacher_loader = lambda: load_source(teacher_src, device, dtype)
        return src
    raise InputError(
        f"--pipeline {p}: not a diffusers pipeline folder (no model_index.json) nor a run dir "
        f"(no {' / '.join(RUN_CARD_NAMES)})"
    )


def _is_msd_run(p: Path) -> bool:
    from ..msd.export import is_msd_run

    return is_msd_run(p)


def _load_run(run_dir: Path, device: str, dtype: torch.dtype, student_weights: str = "student") -> Source:
    """A training run dir: the run card names the teacher and the student's sampler; the student's
    weights replace a copy of the teacher's backbone."""
    card_path = next(run_dir / n for n in RUN_CARD_NAMES if (run_dir / n).is_file())
    card = _read_json(card_path)
    teacher_src = card.get("teacher")
    if isinstance(teacher_src, dict):
        teacher_src = teacher_src.get("source")
    if not teacher_src or not isinstance(teacher_src, str):
        raise InputError(f"run card {card_path} does not name its teacher ('teacher': {{'source': ...}})")
    if not card.get("sampling"):
        raise InputError(f"run card {card_path} has no 'sampling' entry (the student's times)")
    t = _load_teacher(teacher_src, device, dtype)
    weights = _student_weights(run_dir, card, student_weights)
    student = _with_card_prediction(_student_denoiser(t.denoiser, weights, device, dtype), card, card_path)
    t_student = _TeacherView(t, student)
    src = _from_teacher(
        t_student,
        "student",
        str(run_dir),
        {
            "source": str(run_dir),
            "run_card": str(card_path),
            "weights": str(weights),
            "weights_sha256": file_sha256(weights),
            "teacher_source": teacher_src,
            "objective": card.get("objective"),
            "train_steps": card.get("steps"),
        },
    )
    src.info["teacher_pipeline_dir"] = src.info.pop("pipeline_dir", None)
    src.sampling = card.get("sampling")
    src.teacher_loader = lambda: _from_teacher(t, "teacher", teacher_src, {"source": teacher_src})
    return src


def _load_checkpoint(ckpt: Path, device: str, dtype: torch.dtype, student_weights: str) -> Source:
    """A training checkpoint (<run>/checkpoints/step_N): the student's (or its EMA's) backbone
    from the checkpoint, the teacher and sampler from the run's card."""
    from safetensors.torch import load_file

    from ..denoiser import copy_denoiser
    from ..training.manifest import verify_manifest

    problem = verify_manifest(ckpt)
    if problem is not None and "no manifest.json" not in problem:  # older checkpoints have none
        raise InputError(f"checkpoint {ckpt} is damaged: {problem}")
    run_dir = ckpt.parent.parent
    card_path = next((run_dir / n for n in RUN_CARD_NAMES if (run_dir / n).is_file()), None)
    if card_path is None:
        raise InputError(
            f"checkpoint {ckpt}: its run dir {run_dir} has no run_card.json (written when training "
            "ends), so the student's sampling times are unknown; evaluate the finished run dir"
        )
    card = _read_json(card_path)
    teacher_src = (card.get("teacher") or {}).get("source") if isinstance(card.get("teacher"), dict) else None
    if not teacher_src or not card.get("sampling"):
        raise InputError(f"run card {card_path} lacks the teacher source or the sampling entry")
    f = ckpt / ("ema.safetensors" if student_weights == "student_ema" else "model.safetensors")
    if not f.is_file():
        raise InputError(f"checkpoint {ckpt} has no {f.name} (--student-weights {student_weights})")
    prefix = "student.backbone."
    state = {k[len(prefix) :]: v for k, v in load_file(str(f)).items() if k.startswith(prefix)}
    if not state or any("lora_" in k for k in state):
        raise InputError(
            f"checkpoint {f}: no plain student backbone weights ('{prefix}*'; LoRA students: "
            "evaluate the run dir, whose final weights are merged)"
        )
    t = _load_teacher(teacher_src, device, dtype)
    student = copy_denoiser(t.denoiser, trainable=False)
    missing = set(student.backbone.state_dict()) - set(state)
    try:
        student.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InputError(f"checkpoint {f} does not fit the teacher's backbone: {str(e)[:400]}") from e
    bad = [k for k in state if k not in student.backbone.state_dict()]
    if bad:
        raise InputError(f"checkpoint {f}: keys {bad[:3]} are not in the teacher's backbone")
    student = _with_card_prediction(student, card, card_path)
    src = _from_teacher(
        _TeacherView(t, student),
        "student",
        str(ckpt),  # copy: teacher's device, dtype
        {
            "source": str(ckpt),
            "run_card": str(card_path),
            "weights": str(f),
            "weights_sha256": file_sha256(f),
            "teacher_source": teacher_src,
            "objective": card.get("objective"),
            "checkpoint_keys": len(state),
            "kept_from_teacher": len(missing),
        },
    )
    src.sampling = card.get("sampling")
    src.teacher_loader = lambda: _from_teacher(t, "teacher", teacher_src, {"source": teacher_src})
    return src


def _student_weights(run_dir: Path, card: dict, which: str = "student") -> Path:
    """The student's weights file of a run dir: `files[which]` of the run card (a diffusers model
    folder written by the training entry point, or a .safetensors file), `which` being "student"
    or "student_ema"."""
    files = card.get("files") or {}
    if which not in ("student", "student_ema"):
        raise InputError(f"--student-weights {which!r}: choose 'student' or 'student_ema'")
    rel = files.get(which)
    cands = [run_dir / rel] if isinstance(rel, str) else []
    cands += [run_dir / "final" / which, run_dir / f"{which}.safetensors"]
    for c in cands:
        if c.is_dir():
            for n in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
                if (c / n).is_file():
                    return c / n
        elif c.is_file() and c.suffix == ".safetensors":
            return c
    have = ", ".join(sorted(k for k in files if k.startswith("student"))) or "none"
    raise InputError(
        f"run dir {run_dir} holds no {which} weights (looked for {', '.join(str(c) for c in cands)}; "
        f"the run card lists: {have})"
    )


def _with_card_prediction(student, card: dict, card_path: Path):
    """A student trained to another prediction type than its teacher's (the run card's
    sampling.prediction_type, e.g. a v-prediction sCM student of an eps teacher) reads its output
    that way; other students are returned as they are."""
    from ..paths import with_prediction

    pred = (card.get("sampling") or {}).get("prediction_type")
    if pred is None:
        return student
    try:
        student.path = with_prediction(student.path, str(pred))
    except ValueError as e:
        raise InputError(f"run card {card_path}: sampling.prediction_type: {e}") from e
    return student


def _student_denoiser(teacher, weights: Path, device: str, dtype: torch.dtype):
    """The teacher's Denoiser (path, conditioner with its null conditioning) around the student's
    backbone: built from the student's own config.json when the weights sit in a diffusers model
    folder (a student may add inputs, e.g. a guidance embedding), else a copy of the teacher's
    backbone with the weights loaded strictly."""
    from safetensors.torch import load_file

    from ..denoiser import Denoiser, copy_denoiser

    cls = type(teacher.backbone)
    if (weights.parent / "config.json").is_file() and hasattr(cls, "from_pretrained"):
        try:
            bb = cls.from_pretrained(
                str(weights.parent), local_files_only=True, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"cannot load the student backbone from {weights.parent} as {cls.__name__}: {e}") from e
        bb.requires_grad_(False)
        return Denoiser(bb.to(device), teacher.path, teacher.conditioner)
    student = copy_denoiser(teacher, trainable=False)
    try:
        student.backbone.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise InputError(
            f"student weights {weights} do not fit the teacher's backbone ({cls.__name__}): {str(e)[:400]}"
        ) from e
    return student


class _TeacherView:
    """A teacher's components with the student's denoiser in place of its own."""

    def __init__(self, teacher: Any, denoiser: Any):
        self._t = teacher
        self.denoiser = denoiser

    def __getattr__(self, name: str):
        return getattr(self._t, name)
