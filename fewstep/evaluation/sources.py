"""What is evaluated: a teacher (by name or pipeline folder), an exported student pipeline
folder, or a training run dir, turned into one `Source` that generates images.

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

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..families import family_of, is_text
from ..samplers import initial_noise, sample, sample_hybrid
from .inputs import InputError
from .protocols import file_sha256

__all__ = ["Source", "load_source", "uniform_times", "TEACHER_NAMES"]

TEACHER_NAMES = ("digits-vp", "digits-flow")
RUN_CARD_NAMES = ("run_card.json", "card.json", "run.json")
EXPORT_CARD_NAMES = ("fewstep_card.json", "fewstep.json", "export_card.json")


def uniform_times(steps: int) -> list[float]:
    """Evenly spaced times 1, (n-1)/n, ..., 1/n, 0 (VP: DDPM indices 999, 749, 499, 249 at n=4)."""
    return [1.0 - i / steps for i in range(steps)] + [0.0]


@dataclass
class Source:
    """A generator of images with everything the results need to name it."""

    kind: str  # "teacher" or "student"
    name: str  # what the user passed
    denoiser: Any  # fewstep Denoiser
    decode: Callable[[Tensor], Tensor]  # latents -> images (B, C, H, W) in [-1, 1]
    latent_shape: tuple[int, ...]
    conditioning: str  # "labels" or "captions"
    num_classes: int | None = None
    encode_prompts: Callable[[list[str]], dict] | None = None
    sampling: dict[str, Any] | None = None  # students: {"times": [...], "renoise": ...}
    default_guidance: float = 1.0
    guidance_source: str = "default"
    pipeline: Any = None  # a diffusers pipeline, for --sampler pipeline
    info: dict[str, Any] = field(default_factory=dict)
    teacher_loader: Callable[[], Source] | None = None  # students: their teacher, for --hybrid
    _teacher: Any = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------
    def schedule(self, steps: int) -> tuple[list[float], str, str]:
        """(times, renoise, where the times come from) for `steps` network evaluations."""
        if steps < 1:
            raise ValueError(f"--steps must be positive, got {steps}")
        if self.kind == "teacher":
            ts = [float(t) for t in self.denoiser.path.sampling_times(steps).tolist()]
            return ts, "ddim", "teacher schedule (path.sampling_times)"
        samp = self.sampling or {}
        by_steps = samp.get("times_by_steps") or {}
        renoise = str(samp.get("renoise", "fresh"))
        forced = self.info.get("times_override")
        if forced is not None and len(forced) - 1 == steps:
            return [float(t) for t in forced], renoise, "--times"
        if str(steps) in by_steps:
            return [float(t) for t in by_steps[str(steps)]], renoise, "card (times_by_steps)"
        times = samp.get("times")
        if times is not None and len(times) - 1 == steps:
            return [float(t) for t in times], renoise, "card (training times)"
        trained = "unknown" if times is None else str(len(times) - 1)
        return uniform_times(steps), renoise, f"uniform (trained with {trained} steps)"

    def override_times(self, times: Sequence[float], steps: Sequence[int]) -> None:
        """Sample this student at `times` (len = steps + 1, decreasing from at most 1 to 0) instead
        of the run card's times, for the one step count in `steps` (--times)."""
        ts = [float(t) for t in times]
        if self.kind != "student":
            raise InputError(
                f"--times applies to students (run dirs, checkpoints, exported students); {self.name} is a {self.kind}"
            )
        if len(steps) != 1 or len(ts) != int(steps[0]) + 1:
            raise InputError(
                f"--times {ts}: give exactly one --steps N and N + 1 times (got --steps "
                f"{list(steps)} and {len(ts)} times)"
            )
        if not (ts[0] <= 1.0 and ts[-1] == 0.0 and all(b < a for a, b in zip(ts, ts[1:]))):
            raise InputError(f"--times {ts}: must decrease strictly from at most 1 to exactly 0")
        self.info["times_override"] = ts  # read first by `schedule`

    def guidance_embedding(self) -> dict[str, Any] | None:
        """{"key", "dim", "guidance"} for a student that takes its CFG scale as an input (an
        LCM-style w-embedding, recorded by the consistency objective), else None."""
        ge = (self.sampling or {}).get("guidance_embedding") if self.kind == "student" else None
        return ge if isinstance(ge, dict) else None

    def cfg_and_embedded(self, guidance: float | None) -> tuple[float, float | None]:
        """(CFG scale for the sampler, scale fed to a w-embedding or None). For a w-conditioned
        student --guidance sets the embedded scale and CFG stays 1."""
        ge = self.guidance_embedding()
        if ge is not None:
            return 1.0, float(ge.get("guidance", 1.0)) if guidance is None else float(guidance)
        return (self.default_guidance if guidance is None else float(guidance)), None

    def conds(
        self, labels: Tensor | None, captions: Sequence[str] | None, device, embedded: float | None = None
    ) -> dict | None:
        if self.conditioning == "labels":
            if labels is None:
                raise ValueError(f"{self.name} is class-conditional: it needs labels")
            cond = {"class_labels": labels.to(device)}
        else:
            if captions is None:
                raise ValueError(f"{self.name} is text-conditional: it needs captions (--captions)")
            if self.encode_prompts is None:
                raise ValueError(f"{self.name}: no prompt encoder")
            cond = {
                k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.encode_prompts(list(captions)).items()
            }
        if embedded is not None:
            from ..objectives.consistency import guidance_scale_embedding

            ge = self.guidance_embedding()
            b = labels.shape[0] if labels is not None else len(captions)
            w = torch.full((b,), float(embedded), device=device)
            cond[ge["key"]] = guidance_scale_embedding(w - 1.0, int(ge["dim"])).to(device)
        return cond

    @torch.no_grad()
    def generate(
        self,
        steps: int,
        seeds: Sequence[int],
        labels: Tensor | None = None,
        captions: Sequence[str] | None = None,
        guidance: float | None = None,
        batch_size: int = 250,
        device: str = "cpu",
        sampler: str = "fewstep",
        progress: str | None = None,
        hybrid: int = 0,
        teacher_guidance: float | None = None,
    ) -> tuple[Tensor, float]:
        """Generate one image per seed; returns (images float32 (N, C, H, W) in [-1, 1] on the CPU,
        wall seconds including decoding).

        guidance: CFG scale (None: the source's default); for a w-conditioned student, the scale
            fed to its embedding.
        hybrid: students only: the teacher (with CFG `teacher_guidance`, default its own) runs the
            first `hybrid` intervals of the student's times deterministically, the student the rest
            (`fewstep.samplers.sample_hybrid`, diversity distillation)."""
        from tqdm import tqdm

        n = len(seeds)
        w, embedded = self.cfg_and_embedded(guidance)
        times, renoise, _ = self.schedule(steps)
        teacher = None
        if hybrid:
            if not 0 < hybrid < steps:
                raise InputError(f"--hybrid {hybrid}: must be between 1 and the step count minus 1 ({steps - 1})")
            teacher = self.hybrid_teacher()
            tw = teacher.default_guidance if teacher_guidance is None else float(teacher_guidance)
        out: list[Tensor] = []
        t0 = time.perf_counter()
        with tqdm(
            total=n, desc=progress or f"{self.name} {steps} step(s)", unit="img", disable=progress is False, leave=False
        ) as bar:
            for s in range(0, n, batch_size):
                idx = range(s, min(s + batch_size, n))
                lab = labels[s : idx.stop] if labels is not None else None
                cap = list(captions[s : idx.stop]) if captions is not None else None
                if sampler == "pipeline":  # a w-embedded student's pipeline takes w as its guidance_scale
                    img = self._pipeline_batch(
                        steps, [seeds[i] for i in idx], lab, cap, w if embedded is None else embedded
                    )
                else:
                    noise = torch.cat(
                        [
                            initial_noise((1, *self.latent_shape), torch.Generator().manual_seed(int(seeds[i])))
                            for i in idx
                        ]
                    ).to(device)
                    gen = torch.Generator().manual_seed(int(seeds[s]) * 1_000_003 + 7)
                    cond = self.conds(lab, cap, device, embedded)
                    if teacher is None:
                        lat = sample(self.denoiser, noise, cond, times, guidance=w, renoise=renoise, generator=gen)
                    elif embedded is None:
                        lat = sample_hybrid(
                            teacher.denoiser,
                            self.denoiser,
                            noise,
                            cond,
                            times[: hybrid + 1],
                            times[hybrid:],
                            guidance=tw,
                            student_renoise=renoise,
                            generator=gen,
                        )
                    else:  # the teacher takes no w-embedding: the two halves get their own conditions
                        x = sample(
                            teacher.denoiser,
                            noise,
                            teacher.conds(lab, cap, device),
                            times[: hybrid + 1],
                            guidance=tw,
                            renoise="ddim",
                        )
                        lat = sample(
                            self.denoiser,
                            noise,
                            cond,
                            times[hybrid:],
                            guidance=w,
                            renoise=renoise,
                            generator=gen,
                            start=x,
                        )
                    img = self.decode(lat).float().clamp(-1, 1).cpu()
                out.append(img)
                bar.update(len(idx))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return torch.cat(out), time.perf_counter() - t0

    def check_pipeline_steps(self, steps: int) -> None:
        """An exported student's pipeline reproduces its sampler only at the step counts its card
        lists as supported; refuse the others rather than score a different sampler."""
        supported = (
            ((self.info.get("export_card") or {}).get("supported_steps") or {}) if self.kind == "student" else {}
        )
        if supported and str(steps) not in supported:
            raise InputError(
                f"{self.name}: its pipeline supports {sorted(supported, key=int)} step(s) "
                f"(fewstep_card.json), not {steps}; use the fewstep sampler for other counts"
            )

    def hybrid_teacher(self) -> Source:
        """The teacher this student was distilled from (for the hybrid sampler)."""
        if self.kind != "student" or self.teacher_loader is None:
            raise InputError(
                f"--hybrid needs a student whose teacher is known (a run dir, or an exported "
                f"folder whose card names its teacher); {self.name} is a {self.kind}"
            )
        if self._teacher is None:
            self._teacher = self.teacher_loader()
        return self._teacher

    def _pipeline_batch(self, steps, seeds, labels, captions, guidance) -> Tensor:
        """The stock diffusers pipeline's own sampling (stock scheduler), as a user would call it.
        Its schedulers draw fresh noise from torch's global RNG, seeded here with the batch's
        first seed."""
        if self.pipeline is None:
            raise InputError(f"--sampler pipeline needs a pipeline folder; {self.name} is not one")
        self.check_pipeline_steps(steps)
        pipe = self.pipeline
        torch.manual_seed(int(seeds[0]))
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kw: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": gens,
            "output_type": "np",
        }
        if self.conditioning == "labels":
            res = pipe(class_labels=labels.tolist(), **kw)
        else:
            res = pipe(prompt=list(captions), **kw)
        arr = torch.from_numpy(res.images).float()  # (B, H, W, C) in [0, 1]
        return (arr.permute(0, 3, 1, 2) * 2 - 1).clamp(-1, 1)

    def backbone_sha256(self) -> str:
        """sha256 over the backbone's parameters and buffers (names, dtypes, shapes, bytes): which
        network was scored, whatever file it came from."""
        if "backbone_sha256" not in self.info:
            import hashlib

            h = hashlib.sha256()
            for k, v in sorted(self.denoiser.backbone.state_dict().items()):
                h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self.info["backbone_sha256"] = h.hexdigest()
        return self.info["backbone_sha256"]

    def describe(self) -> dict[str, Any]:
        self.backbone_sha256()
        return {
            "kind": self.kind,
            "name": self.name,
            "conditioning": self.conditioning,
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "default_guidance": self.default_guidance,
            "guidance_source": self.guidance_source,
            "sampling": self.sampling,
            **self.info,
        }


# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e


def _vae_decoder(vae) -> Callable[[Tensor], Tensor]:
    sf = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

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
