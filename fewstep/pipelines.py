"""Plain-Python pipelines over stock diffusers pipelines (no remote code).

    from fewstep.pipelines import MultiStudentPipeline
    pipe = MultiStudentPipeline.from_pretrained("exports/digits-msd")       # routing.json + student_k/
    images = pipe(class_labels=[3, 7], num_inference_steps=1,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

`MultiStudentPipeline` loads the K stock pipeline folders of a multi-student (MSD) export and
sends each condition to the student that owns it (the folder's routing.json): class labels by
table; prompts by the partition rule (hash: any prompt; kmeans / mapping: the training prompts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MultiStudentPipeline"]


class MultiStudentPipeline:
    """K student pipelines and a routing record; called like one diffusers pipeline.

    Args:
        pipelines: the students' diffusers pipelines, in the order of routing["students"].
        routing:   the routing record (`fewstep.msd.routing`, routing.json).
        folder:    where they were loaded from (for the step counts the exports support).
    """

    def __init__(self, pipelines: Sequence[Any], routing: dict[str, Any], folder: str | Path | None = None):
        if len(pipelines) != len(routing["students"]):
            raise ValueError(f"{len(pipelines)} pipelines for {len(routing['students'])} students in the routing")
        self.pipelines = list(pipelines)
        self.routing = routing
        self.folder = Path(folder) if folder is not None else None
        self.cards = [self._card(s) for s in routing["students"]]

    def _card(self, student: str) -> dict[str, Any]:
        if self.folder is None:
            return {}
        f = self.folder / student / "fewstep_card.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs: Any) -> MultiStudentPipeline:
        """Load every student folder with `diffusers.DiffusionPipeline.from_pretrained(**kwargs)`;
        the students after the first share its components other than the backbone and scheduler
        (the VAE, text encoders and tokenizers are the teacher's in every folder)."""
        import diffusers

        from .msd.routing import read_routing

        folder = Path(folder)
        rec = read_routing(folder)
        first = diffusers.DiffusionPipeline.from_pretrained(str(folder / rec["students"][0]), **kwargs)
        card0 = (
            json.loads((folder / rec["students"][0] / "fewstep_card.json").read_text())
            if (folder / rec["students"][0] / "fewstep_card.json").is_file()
            else {}
        )
        own = {card0.get("backbone", "transformer"), "unet", "transformer", "scheduler"}
        shared = {k: v for k, v in first.components.items() if k not in own}
        pipes = [first] + [
            diffusers.DiffusionPipeline.from_pretrained(str(folder / s), **kwargs, **shared)
            for s in rec["students"][1:]
        ]
        if card0.get("requires_patch"):  # the export card's one-line fix (DiTPipeline + a flow scheduler)
            for p in pipes:
                p.scheduler.scale_model_input = lambda sample, timestep: sample
        return cls(pipes, rec, folder)

    # ---- routing ----------------------------------------------------------------------------------
    def student_of(self, condition: int | str) -> int:
        """Index of the student that owns a class label or a prompt."""
        from .msd.routing import student_for

        return student_for(self.routing, condition)

    def to(self, *args: Any, **kwargs: Any) -> MultiStudentPipeline:
        for p in self.pipelines:
            p.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        for p in self.pipelines:
            if hasattr(p, "set_progress_bar_config"):
                p.set_progress_bar_config(**kwargs)

    # ---- sampling ---------------------------------------------------------------------------------
    def __call__(
        self,
        class_labels: int | Sequence[int] | None = None,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 1,
        generator: Any = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        **kwargs: Any,
    ):
        """Sample one image per condition, each from its student.

        generator: one torch.Generator per image (each image then depends on its own generator
            only), or one generator / None, passed to every student in turn (images then depend on
            how the batch splits over the students).
        guidance_scale: None takes the exports' (1 for guidance-distilled students).
        Returns diffusers' ImagePipelineOutput with the images in the order of the conditions.
        """
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        if (class_labels is None) == (prompt is None):
            raise ValueError("give class_labels (class-conditional students) or prompt (text students)")
        kind = "labels" if class_labels is not None else "prompts"
        if kind != self.routing["kind"]:
            raise ValueError(f"these students are routed by {self.routing['kind']}, not by {kind}")
        conds = class_labels if class_labels is not None else prompt
        conds = [conds] if isinstance(conds, (int, str)) else list(conds)
        n = len(conds)
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} conditions")
        who = [self.student_of(c) for c in conds]
        images: list[Any] = [None] * n
        stacked = None
        for k in sorted(set(who)):
            idx = [i for i, s in enumerate(who) if s == k]
            kw = dict(kwargs)
            kw.update(self._call_kwargs(k, num_inference_steps))
            if guidance_scale is None:
                guidance_scale_k = float(self.cards[k].get("guidance_scale", 1.0)) if self.cards[k] else 1.0
            else:
                guidance_scale_k = float(guidance_scale)
            gen = [generator[i] for i in idx] if isinstance(generator, (list, tuple)) else generator
            sub = [conds[i] for i in idx]
            key = "class_labels" if kind == "labels" else "prompt"
            out = self.pipelines[k](
                **{key: sub},
                num_inference_steps=num_inference_steps,
                generator=gen,
                guidance_scale=guidance_scale_k,
                output_type=output_type,
                **kw,
            ).images
            for j, i in enumerate(idx):
                images[i] = out[j]
            stacked = out
        if stacked is not None and not isinstance(stacked, list):  # numpy / torch: stack in order
            mod = type(stacked).__module__
            if mod.startswith("numpy"):
                import numpy as np

                images = np.stack(images)
            else:
                import torch

                images = torch.stack(images)
        return ImagePipelineOutput(images=images)

    def _call_kwargs(self, k: int, steps: int) -> dict[str, Any]:
        """The extra call arguments the student's export card records for this step count; refuses
        step counts its stock scheduler does not reproduce."""
        card = self.cards[k]
        sup = card.get("supported_steps") if card else None
        if not sup:
            return {}
        if str(steps) not in sup:
            raise ValueError(
                f"num_inference_steps={steps}: student {self.routing['students'][k]} supports "
                f"{sorted(sup, key=int)} step(s) (its fewstep_card.json)"
            )
        return dict(sup[str(steps)].get("call_kwargs") or {})
