"""The README.md model card of an exported student, rendered from its fewstep_card.json.

    text = render_readme(card)      # card: the dict `fewstep.export` writes as fewstep_card.json

Sections: what the student is (method, teacher, steps and times, guidance), how to load and
sample it with diffusers alone (a snippet for its pipeline class with the supported step counts
and any call arguments), how to reproduce a seeded sample, the LoRA adapter, hybrid sampling,
the scheduler route and its exactness, and the evaluation results found beside the run. The
YAML header (licence, base_model, tags, eval results) is huggingface_hub's ModelCardData (hub.py).
"""

from __future__ import annotations

import json
from typing import Any

from ..families import DRIVES

__all__ = ["render_readme", "load_snippet", "hybrid_snippet"]


def _fmt_times(ts) -> str:
    return "[" + ", ".join(f"{float(t):.6g}" for t in ts) + "]"


def _kwargs_src(kw: dict[str, Any]) -> str:
    return "".join(f", {k}={json.dumps(v)}" for k, v in kw.items())


def _training_guidance(g) -> str:
    if isinstance(g, list):
        return f"; the teacher's CFG scale in training was drawn from [{g[0]:g}, {g[1]:g}]"
    return "" if g is None else f"; the teacher's CFG scale in training was {g:g}"


def load_snippet(card: dict[str, Any], folder: str = "path/to/this/folder") -> str:
    """Python that loads the folder with diffusers and samples at the trained step count."""
    cls = card["pipeline_class"]
    n = str(card["trained_steps"])
    sup = card["supported_steps"].get(n) or next(iter(card["supported_steps"].values()))
    n = str(len(sup["times"]) - 1)
    kw = _kwargs_src(sup.get("call_kwargs") or {})
    g = card["guidance_scale"]
    lines = ["import torch", f"from diffusers import {cls}", "", f'pipe = {cls}.from_pretrained("{folder}")']
    if card.get("requires_patch"):
        lines.append("pipe.scheduler.scale_model_input = lambda sample, timestep: sample  # see 'Known limits'")
    seeded = "torch.manual_seed(0)" if "global RNG" in card.get("noise_source", "") else None
    if card["conditioning"] == "labels":
        if seeded:
            lines.append(f"{seeded}  # the initial noise and the fresh noise between steps")
        lines.append(
            f"images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={n}, guidance_scale={g:g}{kw}).images"
        )
    else:
        gen = "generator=torch.Generator().manual_seed(0)"
        if seeded:
            lines.append(f"{seeded}  # the fresh noise between steps comes from torch's global RNG")
        lines.append(
            f'image = pipe("a photo of a cat", num_inference_steps={n}, guidance_scale={g:g}{kw}, {gen}).images[0]'
        )
    return "\n".join(lines)


def hybrid_snippet(card: dict[str, Any]) -> str | None:
    """Diffusers-only hybrid sampling (teacher with CFG for the first step, the student for the
    rest) for pipelines that take latents, step callbacks and custom schedules; None otherwise."""
    cls = card["pipeline_class"]
    drive = DRIVES.get(cls)
    if drive is None or not drive.hybrid:
        return None
    n = int(card["trained_steps"])
    sup = card["supported_steps"].get(str(n))
    if not sup or n < 2 or card["scheduler"]["class"] != "LCMScheduler":
        return None
    # exact only where the teacher's DDIM ("trailing" spacing over n steps) visits the student's
    # timesteps: then its first step lands on the student's second time
    num_train = int(card["teacher"].get("num_train_timesteps") or 1000)
    trailing = [round(num_train - k * num_train / n) - 1 for k in range(n)]
    ts = [int(round(t)) for t in sup["timesteps"]]
    if ts != trailing:
        return None
    rest = ts[1:]
    w = card.get("teacher_guidance_in_training") or 5.0
    w = w[-1] if isinstance(w, list) else w
    shape = ", ".join(str(int(v)) for v in (card["teacher"].get("latent_shape") or (4, 128, 128)))
    return "\n".join(
        [
            "import torch",
            f"from diffusers import {cls}, DDIMScheduler, {card['scheduler']['class']}",
            "",
            f'teacher = {cls}.from_pretrained("{card["teacher"]["source"]}")',
            'teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing",',
            "                                              set_alpha_to_one=True, clip_sample=False, steps_offset=0)",
            f'student = {cls}.from_pretrained("path/to/this/folder")',
            "",
            "def stop_after_first(pipe, i, t, kw):   # the teacher runs one DDIM step with CFG",
            "    pipe._interrupt = True",
            "    return kw",
            "",
            f'prompt, noise = "a photo of a cat", torch.randn(1, {shape}, generator=torch.Generator().manual_seed(0))',
            f"x = teacher(prompt, num_inference_steps={n}, guidance_scale={w:g}, latents=noise,",
            '            output_type="latent", callback_on_step_end=stop_after_first).images',
            f"image = student(prompt, timesteps={rest}, guidance_scale={card['guidance_scale']:g}, latents=x,",
            "                generator=torch.Generator().manual_seed(1)).images[0]",
        ]
    )


def _evaluation_section(mets: list[dict[str, Any]]) -> list[str]:
    """The `fewstep eval` results found beside the run, one table per results file."""
    out = ["## Evaluation", ""]
    if not mets:
        out += ["No `fewstep eval` results were found beside the run.", ""]
    for m in mets:
        out += [
            f"`{m.get('command') or m['file']}` (protocol {m.get('protocol')}):",
            "",
            "| steps | guidance | hybrid | samples | metrics |",
            "|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            ms = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in r["metrics"].items()
            )
            hy = (r.get("hybrid") or {}).get("teacher_steps", "-") if isinstance(r.get("hybrid"), dict) else "-"
            out.append(f"| {r.get('steps')} | {r.get('guidance')} | {hy} | {r.get('num_samples')} | {ms} |")
        out += [""]
    return out


def render_readme(card: dict[str, Any]) -> str:
    """The model card (markdown with a YAML header) for an export card."""
    out = _front(card) + _usage(card) + _lora_section(card) + _hybrid_section(card)
    sched = card["scheduler"]
    out += ["## Scheduler", "", f"`{sched['class']}`: {sched['route']}."]
    out += [f"- {n}" for n in sched.get("notes", [])]
    out += [""]
    if card.get("requires_patch"):
        out += ["## Known limits", "", f"- {card['requires_patch']}", ""]
    out += _evaluation_section(card.get("metrics") or [])
    ck = card["weights"].get("checkpoint")
    out += [
        "## Provenance",
        "",
        f"Exported by `fewstep export` from `{ck or card['run']['dir']}` "
        f"({'a checkpoint of a run' if ck else str(card['run'].get('steps')) + ' training step(s)'}); "
        f"weights sha256 `{card['weights']['sha256']}`; "
        f"diffusers {card['exported']['diffusers']}, torch {card['exported']['torch']}. The machine-readable "
        "card is `fewstep_card.json`.",
        "",
    ]
    from .hub import model_card

    return str(model_card(card, "\n".join(out)))


def _front(card: dict[str, Any]) -> list[str]:
    """The title and the summary (the YAML header is huggingface_hub's ModelCardData: hub.py)."""
    t = card["teacher"]
    trained = card["trained_steps"]
    samp = card["sampling"]
    src = str(t.get("source"))
    lic = t.get("license") or {}
    out = ["", f"# {card.get('name') or 'fewstep student'}: a {trained}-step student", ""]
    out += [
        f"- **Method:** {card['method']}",
        f"- **Teacher:** `{src}` ({t.get('pipeline_class')}, family {t.get('family')})",
        f"- **Steps and times:** {trained} step(s) at t = {_fmt_times(samp['times'])} "
        f"(t in [0, 1], noise at 1), "
        + ("fresh noise between steps" if samp.get("renoise") == "fresh" else "deterministic DDIM / Euler steps"),
        f"- **Guidance:** sample with `guidance_scale={card['guidance_scale']:g}`"
        + (
            " (the scale fed to the student's guidance embedding)"
            if samp.get("guidance_embedding")
            else " (the teacher's guidance is distilled into the student; no CFG pass)"
        )
        + _training_guidance(card.get("teacher_guidance_in_training")),
        "- **Licence:** "
        + (
            f"`{lic.get('license_name') or lic['license']}`, the teacher's (from {lic.get('from')})"
            if lic.get("license")
            else f"not known ({lic.get('from', 'not recorded')}): set `license` in this header before publishing"
        ),
        f"- **Weights:** {card['weights']['which']}"
        + (" (a LoRA student, fused into full weights)" if card["weights"].get("lora") else ""),
        "",
    ]
    return out


def _usage(card: dict[str, Any]) -> list[str]:
    """Loading and sampling with diffusers, the supported step counts and how to reproduce a seed."""
    out = ["## Load and sample (diffusers only)", "", "```python", load_snippet(card), "```", ""]
    rows = ["| num_inference_steps | student times | network timesteps | call arguments |", "|---|---|---|---|"]
    for n, s in card["supported_steps"].items():
        rows.append(
            f"| {n} | {_fmt_times(s['times'])} | {_fmt_times(s['timesteps'])} | "
            f"{_kwargs_src(s.get('call_kwargs') or {}).lstrip(', ') or '-'} |"
        )
    out += ["Supported step counts (other values run a schedule the student was not trained for):", ""] + rows + [""]
    out += [
        "## Reproducing a seeded sample",
        "",
        f"Fresh noise between steps comes from {card['noise_source']}. The initial noise is the pipeline's "
        "`latents` (or drawn from its `generator`). With the same initial noise and the same noise between "
        "steps, this folder reproduces fewstep's own sampler (`fewstep.samplers.sample` with the times above) "
        "to within 1e-4 in float32.",
        "",
    ]
    return out


def _lora_section(card: dict[str, Any]) -> list[str]:
    """How to apply the LoRA adapter to the teacher, or why none was written (nothing without one)."""
    lora = card.get("lora_adapter")
    if not lora:
        return []
    out = ["## LoRA adapter", ""]
    if not lora.get("written"):
        return out + [lora.get("reason", "not written"), ""]
    sched, src = card["scheduler"], str(card["teacher"].get("source"))
    return out + [
        f"`{lora['file']}` (rank {lora['rank']}; alpha / rank = {lora['scale_folded_into_lora_B']:g} is "
        "folded into lora_B, so it loads at scale 1) applies the student to the teacher:",
        "",
        "```python",
        f"from diffusers import {card['pipeline_class']}, {sched['class']}",
        f'pipe = {card["pipeline_class"]}.from_pretrained("{src}")',
        'pipe.load_lora_weights("path/to/this/folder/lora")',
        f'pipe.scheduler = {sched["class"]}.from_pretrained("path/to/this/folder", subfolder="scheduler")',
        "```",
        "",
    ]


def _hybrid_section(card: dict[str, Any]) -> list[str]:
    """Hybrid sampling: fewstep's command and call, and the diffusers-only snippet where there is one."""
    out = [
        "## Hybrid sampling (diversity distillation)",
        "",
        "The teacher with CFG runs the first step(s) deterministically, the student the rest:",
        "",
        "```",
        card["hybrid"]["command"],
        card["hybrid"]["python"],
        "```",
        "",
    ]
    hs = hybrid_snippet(card)
    if hs:
        out += [
            "With diffusers alone (one teacher step, then the student from its second timestep):",
            "",
            "```python",
            hs,
            "```",
            "",
        ]
    return out
