"""One evaluation, top to bottom: resolve the protocol -> check every local file the metrics need
(weights, reference, captions) -> reference features -> load the source -> for each step count:
generate, score -> write results.json and results.md atomically.

Everything that can fail on user input fails before the first image is generated (the checks
are in evaluation/checks.py; images.py keeps and saves the images, report.py writes results.md).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..images import save_grid
from . import checks
from .checks import METRICS
from .diversity import diversity
from .images import resize_uint8, save_images, to_uint8
from .inputs import ImageFolder, InputError, TensorImages, atomic_write_json, atomic_write_text
from .protocols import Protocol, file_sha256, load_captions
from .report import markdown_table
from .scores import fidelity_from_features, torch_fidelity_version

__all__ = ["EvalSpec", "evaluate", "METRICS", "to_uint8", "resize_uint8", "save_grid", "markdown_table"]


@dataclass
class EvalSpec:
    """Every setting of one `fewstep eval` run (the CLI fills it; tests build it directly)."""

    pipeline: str | None = None  # teacher name, pipeline folder or run dir
    images: str | None = None  # or: a folder of already generated images (no generation)
    steps: Sequence[int] = (1, 2, 4)
    protocol: str = "digits"
    num_samples: int | None = None  # None: the protocol's
    seed: int | None = None
    metrics: Sequence[str] | None = None  # None: the protocol's
    reference: str | None = None  # folder | .npz / .safetensors | "digits"; None: protocol's
    captions: str | None = None
    feature_extractor: str | None = None  # None: the protocol's
    feature_extractor_weights: str | None = None
    inception_weights: str | None = None
    clip_model: str | None = None
    imports: Sequence[str] = ()
    image_size: int | None = None
    guidance: float | None = None  # None: the teacher's recommended value; students 1
    batch_size: int = 250
    device: str = "cpu"
    dtype: str = "float32"
    sampler: str = "fewstep"  # "fewstep" or "pipeline" (the stock diffusers pipeline)
    student_weights: str = "student"  # run dirs: "student" (raw) or "student_ema"
    hybrid: int = 0  # students: first k intervals by the teacher (sample_hybrid)
    times: Sequence[float] | None = None  # students: explicit sampling times [t_0 > ... > 0] for the one
    #   step count in `steps` (instead of the run card's)
    teacher_guidance: float | None = None  # the teacher's CFG in hybrid sampling (None: its own)
    out: str = "eval_out"
    save_images: bool = False
    cache: bool = True
    kid_subset_size: int | None = None
    bootstrap: int | None = None  # panel: resamples for the intervals (None: the protocol's)
    progress: bool = True
    command: str = ""  # the command line, recorded in the results


# ---------------------------------------------------------------------------------------------
def evaluate(spec: EvalSpec) -> dict[str, Any]:
    """Run one evaluation and write `results.json` and `results.md` under spec.out. Returns the
    results dict."""
    if spec.protocol == "restoration":  # paired outputs and targets: its own loop and table
        from .restoration import evaluate_restoration

        return evaluate_restoration(spec)
    if (spec.pipeline is None) == (spec.images is None):
        raise InputError("give exactly one of --pipeline (generate and score) or --images (score a folder)")
    proto, metrics, dtype = checks.settings(spec)
    out = Path(spec.out)

    # ---- 1. every local file, before anything is generated ---------------------------------
    extractor, clip, judge_ok = checks.scorers(spec, proto, metrics)
    captions_all = load_captions(spec.captions) if spec.captions else None
    folder = ImageFolder(spec.images, proto.image_size) if spec.images is not None else None
    ref = checks.reference(spec, proto, metrics, extractor)

    # ---- 2. the source ------------------------------------------------------------------------
    src = checks.source(spec, metrics, dtype)
    n = proto.num_samples
    labels, caps = checks.conditions(src, proto, captions_all, metrics, n)
    results = _results_head(spec, proto, src, extractor, ref, clip)

    # ---- 3. generate and score -------------------------------------------------------------------
    partial = out / "results.partial.json"  # rows so far of a long run; never named like a complete result
    if src is None:
        results["rows"].append(_folder_row(spec, proto, metrics, folder, extractor, ref))
    else:
        seeds = [proto.seed + i for i in range(n)]
        for steps in spec.steps:
            results["rows"].append(
                _one_steps(
                    spec, proto, metrics, src, int(steps), seeds, labels, caps, extractor, ref, clip, judge_ok, out
                )
            )
            atomic_write_json(partial, results)
    results["complete"] = True
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_table(results))
    partial.unlink(missing_ok=True)
    return results


def _results_head(spec: EvalSpec, proto: Protocol, src: Any, extractor, ref, clip) -> dict[str, Any]:
    """The results' provenance (command, protocol, spec, source, backend, extractor, reference,
    captions, CLIP model), before any row."""
    results: dict[str, Any] = {
        "format": "fewstep-eval/1",
        "complete": False,
        "command": spec.command,
        "protocol": proto.to_dict(),
        "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
        "source": src.describe() if src is not None else {"kind": "images", "path": spec.images},
        "backend": {
            "torch_fidelity": torch_fidelity_version(),
            "torch": torch.__version__,
            "device": spec.device,
            "dtype": spec.dtype,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "extractor": extractor.describe() if extractor else None,
        "reference": ref.description if ref else None,
        "captions": {"path": spec.captions, "sha256": file_sha256(spec.captions)} if spec.captions else None,
        "clip": clip.describe() if clip else None,
        "rows": [],
    }
    if extractor is not None:
        results["torch_fidelity_kwargs"] = {k: v for k, v in extractor.tf_kwargs().items() if k != "verbose"}

    return results


def _folder_row(spec: EvalSpec, proto: Protocol, metrics: list[str], folder, extractor, ref) -> dict[str, Any]:
    """The one row of a folder of images: its fidelity metrics (and the judge panel)."""
    t0 = time.perf_counter()
    gen_feats = extractor.features(folder)
    row = {"steps": None, "num_samples": len(folder), "images": str(spec.images)}
    row["metrics"] = _score_fidelity(gen_feats, ref, extractor, proto, metrics)
    if "panel" in metrics:
        from .panel import panel_scores

        u8 = torch.stack([folder[i] for i in range(len(folder))])
        row["metrics"]["panel"] = panel_scores(u8, None, bootstrap=proto.bootstrap, seed=proto.seed, cache=spec.cache)
    row["score_seconds"] = time.perf_counter() - t0
    return row


def _score_fidelity(gen_feats, ref, extractor, proto, metrics) -> dict[str, Any]:
    want = {m: m in metrics for m in ("fid", "kid", "prc")}
    if not any(want.values()):
        return {}
    keys = ("kid_subsets", "kid_subset_size", "prc_neighborhood")
    vals = fidelity_from_features(gen_feats, ref, extractor, **want, **{k: getattr(proto, k) for k in keys})
    n_gen = int(gen_feats[extractor.layer("fid")].shape[0])
    prov = {
        "backend": f"torch-fidelity {torch_fidelity_version()}",
        "extractor": extractor.name,
        "weights_sha256": extractor.weights_sha256,
        "n_generated": n_gen,
        "n_reference": ref.count,
    }
    out: dict[str, Any] = {}
    if "fid" in vals:
        out["fid"] = {"value": vals["fid"], "layer": extractor.layer("fid"), **prov}
    if "kid_mean" in vals:
        out["kid"] = {
            "value": vals["kid_mean"],
            "std": vals["kid_std"],
            "subset_size": vals["kid_subset_size"],
            "subsets": proto.kid_subsets,
            "layer": extractor.layer("kid"),
            **prov,
        }
    if "precision" in vals:
        out["precision"] = {
            "value": vals["precision"],
            "neighborhood": proto.prc_neighborhood,
            "layer": extractor.layer("prc"),
            **prov,
        }
        out["recall"] = {
            "value": vals["recall"],
            "neighborhood": proto.prc_neighborhood,
            "layer": extractor.layer("prc"),
            **prov,
        }
    return out


def _one_steps(spec, proto, metrics, src, steps, seeds, labels, caps, extractor, ref, clip, judge_ok, out) -> dict:
    times, renoise, times_source = src.schedule(steps)
    guidance, embedded = src.cfg_and_embedded(spec.guidance)
    imgs, secs = src.generate(
        steps,
        seeds,
        labels=labels,
        captions=caps,
        guidance=spec.guidance,
        batch_size=spec.batch_size,
        device=spec.device,
        sampler=spec.sampler,
        progress=None if spec.progress else False,
        hybrid=spec.hybrid,
        teacher_guidance=spec.teacher_guidance,
    )
    u8 = resize_uint8(to_uint8(imgs), proto.image_size)
    n = u8.shape[0]

    nfe, hybrid = _nfe_and_hybrid(spec, src, steps, guidance, times)
    row: dict[str, Any] = {
        "steps": steps,
        "nfe": nfe,
        "hybrid": hybrid,
        "times": times,
        "times_source": times_source,
        "renoise": renoise if src.kind == "student" else "ddim",
        "guidance": guidance,
        "embedded_guidance": embedded,
        "num_samples": n,
        "seeds": f"{seeds[0]}..{seeds[-1]} (sample i: seed + i)",
        "batch_size": spec.batch_size,
        "sampler": spec.sampler,
        "generation_seconds": secs,
        "samples_per_second": n / secs if secs > 0 else None,
    }
    ms: dict[str, Any] = {}
    common = {"n_generated": n, "steps": steps, "guidance": guidance, "seed": proto.seed}
    gen_feats = extractor.features(TensorImages(u8)) if extractor is not None else None
    for k, v in _score_fidelity(gen_feats, ref, extractor, proto, metrics).items():
        ms[k] = {**v, **common}
    if "class_acc" in metrics:
        from .digits import class_accuracy

        ms["class_acc"] = {
            "value": float(class_accuracy(imgs, labels)),
            "backend": "fewstep digits judge",
            "weights_file": judge_ok,
            "weights_sha256": file_sha256(judge_ok),
            **common,
        }
    if "diversity" in metrics:
        ms.update(_diversity(spec, proto, src, steps, guidance, extractor, gen_feats, labels, caps))
    if "panel" in metrics:
        from .panel import panel_scores

        ms["panel"] = {
            **panel_scores(u8, labels, bootstrap=proto.bootstrap, seed=proto.seed, cache=spec.cache),
            **common,
        }
    if embedded is not None:
        for m in ms.values():
            m["embedded_guidance"] = embedded
    if "clip" in metrics:
        ms["clip"] = {"value": clip(u8, caps), **clip.describe(), **common}
    row["metrics"] = ms
    tag = f"steps{steps}"
    save_grid(u8[:100], out / f"grid_{tag}.png", nrow=10)
    if spec.save_images:
        names = [f"{i:06d}" + (f"_label{int(labels[i])}" if labels is not None else "") for i in range(n)]
        save_images(u8, out / "images" / tag, names)
        row["images"] = str(out / "images" / tag)
    return row


def _passes(w: float, den: Any) -> int:
    """Network passes per step: two under CFG (conditional and unconditional), one without it or
    with the guidance embedded in the network."""
    return 2 if w != 1.0 and not getattr(den.conditioner, "guidance_embedded", False) else 1


def _nfe_and_hybrid(spec: EvalSpec, src: Any, steps: int, guidance: float, times: list) -> tuple[int, dict | None]:
    """Network evaluations per sample, and the record of hybrid sampling (the teacher's first
    spec.hybrid steps) when it is used."""
    if not spec.hybrid:
        return steps * _passes(guidance, src.denoiser), None
    t = src.hybrid_teacher()
    tw = t.default_guidance if spec.teacher_guidance is None else float(spec.teacher_guidance)
    nfe = spec.hybrid * _passes(tw, t.denoiser) + (steps - spec.hybrid) * _passes(guidance, src.denoiser)
    return nfe, {
        "teacher_steps": spec.hybrid,
        "teacher": t.name,
        "teacher_guidance": tw,
        "teacher_times": times[: spec.hybrid + 1],
        "student_times": times[spec.hybrid :],
    }


def _diversity(spec, proto, src, steps, guidance, extractor, gen_feats, labels, caps) -> dict[str, Any]:
    layer = extractor.layer("fid")
    base = {
        "backend": f"features of {extractor.name} ({layer}), torch-fidelity {torch_fidelity_version()}",
        "extractor": extractor.name,
        "weights_sha256": extractor.weights_sha256,
        "steps": steps,
        "guidance": guidance,
    }
    if labels is not None:
        keep = torch.cat(
            [
                torch.nonzero(labels == k)[: proto.diversity_per_group, 0]
                for k in labels.unique()[: proto.diversity_groups]
            ]
        )
        d = diversity(gen_feats[layer][keep], labels[keep].tolist())
        base["n_generated"] = int(keep.numel())
        base["seed"] = proto.seed
    else:  # captions: extra samples, several per caption, seeds after the main set's
        g, k = proto.diversity_groups, proto.diversity_per_group
        dcaps = [c for c in caps[:g] for _ in range(k)]
        seeds = [proto.seed + proto.num_samples + i for i in range(len(dcaps))]
        imgs, _ = src.generate(
            steps,
            seeds,
            captions=dcaps,
            guidance=spec.guidance,
            batch_size=spec.batch_size,
            device=spec.device,
            sampler=spec.sampler,
            progress=False,
            hybrid=spec.hybrid,
            teacher_guidance=spec.teacher_guidance,
        )
        feats = extractor.features(TensorImages(resize_uint8(to_uint8(imgs), proto.image_size)))
        d = diversity(feats[layer], dcaps)
        base["n_generated"] = len(dcaps)
        base["seed"] = seeds[0]
    return {
        "diversity": {
            "value": d["diversity"],
            "kind": "mean pairwise L2 feature distance within a condition",
            "groups": d["diversity_groups"],
            "group_size": d["diversity_group_size"],
            **base,
        },
        "vendi": {
            "value": d["vendi"],
            "kind": "Vendi score (cosine kernel) within a condition",
            "groups": d["diversity_groups"],
            "group_size": d["diversity_group_size"],
            **base,
        },
    }
