"""Restoration models (image-conditioned teachers and their students): loading, sampling, export.

    model = load_restorer("digits-restore")                  # the embedded teacher (or a folder / run dir)
    x = restore(model, cond_images, steps=50, generator=g)   # (B, 1, 32, 32) in [-1, 1]
    export_restorer("runs/ircm_1step", "exports/ircm_1step") # -> a stock LDMSuperResolutionPipeline folder

Every restorer here is a stock `LDMSuperResolutionPipeline` folder (the embedded teacher, an
exported student) or a training run of one of them. fewstep samples it with its own sampler
(`fewstep.samplers.sample` over the times of the teacher's DDIM grid, or the run card's), which
is the loop of that pipeline: start from N(0, I), feed `cat([x_t, image])`, DDIM step with the
scheduler; eta 0 is "ddim", eta 1 from t = 1 is "fresh" noise at the next time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .denoiser import Denoiser

__all__ = ["Restorer", "load_restorer", "restore", "export_restorer"]


@dataclass
class Restorer:
    denoiser: Denoiser
    times: dict[int, list[float]] = field(default_factory=dict)  # steps -> sampling times (students)
    renoise: str = "ddim"
    source: str = ""
    is_student: bool = False
    pipeline_dir: str | None = None  # the LDMSuperResolutionPipeline folder it came from (teachers)

    def sampling_times(self, steps: int) -> list[float]:
        if steps in self.times:
            return self.times[steps]
        if self.is_student and self.times:
            raise ValueError(
                f"{self.source}: this student samples with {sorted(self.times)} step(s) only (its run card), not {steps}"
            )
        return [float(t) for t in self.denoiser.path.sampling_times(steps)]


def _teacher_folder(source: str) -> Path:
    if source == "digits-restore":
        from .digits.restoration import TEACHER_DIR

        return TEACHER_DIR
    return Path(source)


def load_restorer(source: str, weights: str = "student", device: str | torch.device = "cpu") -> Restorer:
    """A restoration model from "digits-restore", an LDMSuperResolutionPipeline folder (the teacher
    or an exported student: its card `fewstep_sampling.json` gives the student's times), or a
    training run dir (run_card.json; `weights` "student" or "student_ema")."""
    from .pipeline_teacher import load_teacher

    src = Path(source)
    if (src / "run_card.json").is_file():
        card = json.loads((src / "run_card.json").read_text())
        teacher = load_restorer(card["teacher"]["source"], device=device)
        from diffusers import UNet2DModel

        wdir = src / card["files"].get(weights, f"final/{weights}")
        if not (wdir / "config.json").is_file():
            raise FileNotFoundError(f"{source}: no {weights} weights in {wdir} (config.json missing)")
        unet = UNet2DModel.from_pretrained(str(wdir), use_safetensors=True).to(device).eval().requires_grad_(False)
        den = Denoiser(unet, teacher.denoiser.path, teacher.denoiser.conditioner)
        s = card["sampling"]
        times = {len(s["times"]) - 1: [float(t) for t in s["times"]]}
        for k, v in (s.get("times_by_steps") or {}).items():
            times[int(k)] = [float(t) for t in v]
        return Restorer(den, times, s["renoise"], str(source), True, teacher.pipeline_dir)
    folder = _teacher_folder(source)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{source!r}: not a restoration pipeline folder (no model_index.json) nor a run dir (no run_card.json)"
        )
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "LDMSuperResolutionPipeline":
        raise ValueError(
            f"{source!r}: a restoration model is an LDMSuperResolutionPipeline folder, got {index.get('_class_name')}"
        )
    t = load_teacher(str(folder), family="restore", device=device)
    card_file = folder / "fewstep_sampling.json"
    if card_file.is_file():  # an exported student
        s = json.loads(card_file.read_text())
        times = {int(k): [float(x) for x in v] for k, v in s["times_by_steps"].items()}
        return Restorer(t.denoiser, times, s["renoise"], str(source), True, str(folder))
    return Restorer(t.denoiser, {}, "ddim", str(source), False, str(folder))


@torch.no_grad()
def restore(
    model: Restorer,
    images: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> Tensor:
    """Restore conditioning images (B, C, H, W) in [-1, 1] (degraded, at the output size) with
    `steps` network evaluations; the initial noise of the whole set comes from `generator`."""
    from .samplers import sample

    times = model.sampling_times(steps)
    noise = torch.randn(images.shape, generator=generator)
    out = []
    for i in range(0, images.shape[0], batch_size):
        cond = {"image": images[i : i + batch_size].float()}
        out.append(
            sample(model.denoiser, noise[i : i + batch_size], cond, times, renoise=model.renoise, generator=generator)
        )
    return torch.cat(out).clamp(-1, 1)


def export_restorer(run_dir: str | Path, out: str | Path, weights: str = "student", overwrite: bool = False) -> Path:
    """A training run of a restoration student -> a stock LDMSuperResolutionPipeline folder: the
    teacher's folder with the student's UNet and a DDIMScheduler whose trailing grid is the
    student's times, plus `fewstep_sampling.json` (times, renoise) and a README with the call.

    The student's times must be the DDIM trailing grid of its step count (t = 1, then evenly
    spaced), which is what the restoration presets train; renoise "fresh" is `eta=1`."""
    from diffusers import LDMSuperResolutionPipeline, UNet2DModel

    from .export import atomic_folder

    run_dir = Path(run_dir)
    model = load_restorer(str(run_dir), weights=weights)
    if not model.pipeline_dir:
        raise ValueError(f"{run_dir}: its teacher is not a pipeline folder; nothing to export into")
    pipe = LDMSuperResolutionPipeline.from_pretrained(model.pipeline_dir, use_safetensors=True)
    for steps, times in model.times.items():
        want = [float(t) for t in torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)]
        if any(abs(a - b) > 1e-6 for a, b in zip(times, want)):
            raise ValueError(
                f"{run_dir}: the student's {steps}-step times {times} are not DDIM's trailing grid {want}; "
                "the stock scheduler cannot reproduce them"
            )
    wdir = run_dir / json.loads((run_dir / "run_card.json").read_text())["files"].get(weights, f"final/{weights}")
    unet = UNet2DModel.from_pretrained(str(wdir), use_safetensors=True)
    pipe = LDMSuperResolutionPipeline(vqvae=pipe.vqvae, unet=unet, scheduler=pipe.scheduler)
    eta = 1.0 if model.renoise == "fresh" else 0.0
    steps_list = sorted(model.times)
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "fewstep_sampling.json").write_text(
            json.dumps(
                {"times_by_steps": {str(k): v for k, v in model.times.items()}, "renoise": model.renoise}, indent=1
            )
            + "\n"
        )
        (Path(tmp) / "README.md").write_text(_card(run_dir, steps_list, eta))
    return Path(out)


def _card(run_dir: Path, steps: list[int], eta: float) -> str:
    card = json.loads((run_dir / "run_card.json").read_text())
    trained = (card.get("config", {}).get("objective") or {}).get("num_steps")
    first = trained if trained in steps else steps[0]  # the step count the run trained for
    return f"""# Restoration student ({card.get("objective")}), {", ".join(map(str, steps))} step(s)

A stock `LDMSuperResolutionPipeline` in pixel space (the `vqvae` only rounds to 8 bits; see
`fewstep/digits/restoration.py`). The input is the degraded digit at 32x32 in [-1, 1] (an 8x8
input upsampled bicubically), shape (B, 1, 32, 32):

```python
import torch
from diffusers import LDMSuperResolutionPipeline
pipe = LDMSuperResolutionPipeline.from_pretrained("<this folder>")
out = pipe(image=degraded, num_inference_steps={first}, eta={eta}, output_type="pt",
           generator=torch.Generator().manual_seed(0)).images   # (B, 1, 32, 32) in [0, 1]
```

Trained by fewstep (`{card.get("config", {}).get("objective", {}).get("name", card.get("objective"))}`) from
`{card["teacher"]["source"]}`; {card.get("steps")} steps, {card.get("train_time_s")} s of training.
"""
