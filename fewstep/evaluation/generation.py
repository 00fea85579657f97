"""`Source`: a model `fewstep eval` generates images from (a teacher or a student, loaded by
`fewstep.evaluation.sources.load_source`), with the times it samples at, its guidance and its
conditions, and everything the results need to name it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..samplers import initial_noise, sample, sample_hybrid
from .inputs import InputError

__all__ = ["Source", "uniform_times"]


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
        hyb = None  # (teacher, its CFG scale, its intervals) with --hybrid
        if hybrid:
            if not 0 < hybrid < steps:
                raise InputError(f"--hybrid {hybrid}: must be between 1 and the step count minus 1 ({steps - 1})")
            teacher = self.hybrid_teacher()
            hyb = (teacher, teacher.default_guidance if teacher_guidance is None else float(teacher_guidance), hybrid)
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
                    img = self._fewstep_batch(
                        [seeds[i] for i in idx], lab, cap, device, times, renoise, w, embedded, hyb
                    )
                out.append(img)
                bar.update(len(idx))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return torch.cat(out), time.perf_counter() - t0

    def _fewstep_batch(self, seeds, lab, cap, device, times, renoise, w, embedded, hyb) -> Tensor:
        """One batch with fewstep's sampler: noise from each sample's own seed, fresh noise between
        steps from one generator seeded from the batch's first seed; with `hyb` (teacher, its CFG
        scale, K) the teacher runs the first K intervals."""
        teacher, tw, hybrid = hyb if hyb is not None else (None, None, 0)
        noise = torch.cat(
            [initial_noise((1, *self.latent_shape), torch.Generator().manual_seed(int(seed))) for seed in seeds]
        ).to(device)
        gen = torch.Generator().manual_seed(int(seeds[0]) * 1_000_003 + 7)
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
        return img

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
