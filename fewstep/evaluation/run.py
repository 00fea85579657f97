"""One evaluation, top to bottom: resolve the protocol -> check every local file the metrics need
(weights, reference, captions) -> reference features -> load the source -> for each step count:
generate, score -> write results.json and results.md atomically.

Everything that can fail on user input fails before the first image is generated.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .inputs import ImageFolder, InputError, TensorImages, atomic_write_json, atomic_write_text
from .protocols import Protocol, file_sha256, get_protocol, load_captions, select_captions
from .scores import ClipScorer, Extractor, ReferenceFeatures, diversity, fidelity_from_features, torch_fidelity_version

__all__ = ["EvalSpec", "evaluate", "METRICS", "to_uint8", "resize_uint8", "save_grid", "markdown_table"]

METRICS = ("fid", "kid", "prc", "clip", "class_acc", "diversity", "panel")
FEATURE_METRICS = ("fid", "kid", "prc", "diversity")


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
def to_uint8(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) float in [-1, 1] -> (B, 3, H, W) uint8, rounded as a saved PNG is."""
    from ..digits.data import to_uint8_rgb

    return to_uint8_rgb(images)


def resize_uint8(images: Tensor, size: int | None) -> Tensor:
    """Resize uint8 (B, 3, H, W) images to size x size exactly as reference folders are read
    (PIL bicubic on the shorter side, centre crop)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    from PIL import Image

    from .inputs import _resize_center_crop

    out = [
        torch.from_numpy(np.array(_resize_center_crop(Image.fromarray(im.permute(1, 2, 0).numpy()), size))).permute(
            2, 0, 1
        )
        for im in images
    ]
    return torch.stack(out).contiguous()


def _pil(im: Tensor):
    from PIL import Image

    a = im.permute(1, 2, 0).numpy()
    if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        return Image.fromarray(a[..., 0], mode="L")  # grayscale: convert("RGB") gives the same pixels back
    return Image.fromarray(a, mode="RGB")


def save_images(images: Tensor, folder: Path, names: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for im, n in zip(images, names):
        _pil(im).save(folder / f"{n}.png")


def save_grid(images: Tensor, path: Path, cols: int = 10, pad: int = 2) -> None:
    """A grid PNG of uint8 (B, 3, H, W) images (row-major, `cols` per row)."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = (b + cols - 1) // cols
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            im.permute(1, 2, 0).numpy()
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
def _metrics(spec: EvalSpec, proto: Protocol) -> list[str]:
    """The requested metrics; by default the protocol's (for a folder of images, those that need no
    conditions: fid, kid, prc)."""
    if spec.metrics:
        ms = list(spec.metrics)
    else:
        ms = [m for m in proto.metrics if spec.images is None or m in ("fid", "kid", "prc")]
    bad = [m for m in ms if m not in METRICS]
    if bad:
        raise InputError(f"--metrics: unknown {bad}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(ms))


def _reference(spec: EvalSpec, proto: Protocol, extractor: Extractor) -> ReferenceFeatures:
    ref = spec.reference or proto.reference
    if ref is None:
        raise InputError(
            f"protocol {proto.name!r} needs --reference (an image folder, or a .npz / .safetensors statistics file)"
        )
    if ref == "digits":
        from ..digits.data import IMAGE_SIZE
        from .digits import digits_reference

        if proto.image_size not in (None, IMAGE_SIZE):
            raise InputError(
                f"the digits reference is {IMAGE_SIZE}x{IMAGE_SIZE}; --image-size {proto.image_size} does not fit it"
            )
        return digits_reference(extractor, use_cache=spec.cache)
    p = Path(ref)
    if p.is_dir():
        folder = ImageFolder(p, proto.image_size)
        identity = {"kind": "folder", "path": str(p.resolve()), "size": proto.image_size, "files": folder.identity()}
        return ReferenceFeatures.compute(
            folder,
            extractor,
            identity,
            {
                "kind": "folder",
                "path": str(p),
                "count": len(folder),
                "source_sizes": [list(s) for s in folder.source_sizes[:8]],
                "resize": None
                if proto.image_size is None
                else f"PIL bicubic shorter side + centre crop to {proto.image_size}",
            },
            use_cache=spec.cache,
        )
    if p.exists() or p.suffix in (".npz", ".safetensors"):
        return ReferenceFeatures.from_file(p, extractor)
    raise InputError(f"--reference {ref!r}: not 'digits', an image folder, or a statistics file")


def _conditions(src, proto: Protocol, captions: list[str] | None, n: int):
    """Labels i % K (balanced; K from the protocol, else the model) or the protocol's captions."""
    if src is not None and src.conditioning != proto.conditioning:
        raise InputError(
            f"protocol {proto.name!r} is for {proto.conditioning}-conditional models, but "
            f"{src.name} is {src.conditioning}-conditional; choose another --protocol"
        )
    if proto.conditioning == "labels":
        k = proto.num_classes or (src.num_classes if src is not None else None)
        if not k:
            raise InputError(f"{src.name}: cannot tell its number of classes; use a protocol that sets it")
        labels = torch.arange(n) % int(k)
        return labels, None
    if captions is None:
        raise InputError(f"protocol {proto.name!r} needs --captions (COCO annotation JSON or one caption a line)")
    return None, select_captions(captions, n, proto.seed)


def evaluate(spec: EvalSpec) -> dict[str, Any]:
    """Run one evaluation and write `results.json` and `results.md` under spec.out. Returns the
    results dict."""
    if spec.protocol == "restoration":  # paired outputs and targets: its own loop and table
        from .restoration import evaluate_restoration

        return evaluate_restoration(spec)
    if (spec.pipeline is None) == (spec.images is None):
        raise InputError("give exactly one of --pipeline (generate and score) or --images (score a folder)")
    proto = get_protocol(spec.protocol).with_overrides(
        num_samples=spec.num_samples,
        seed=spec.seed,
        image_size=spec.image_size,
        feature_extractor=spec.feature_extractor,
        kid_subset_size=spec.kid_subset_size,
        bootstrap=spec.bootstrap,
    )
    if proto.num_samples < 2:
        raise InputError(f"--num-samples must be at least 2, got {proto.num_samples}")
    metrics = _metrics(spec, proto)
    out = Path(spec.out)
    device = spec.device
    dtype = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }.get(spec.dtype)
    if dtype is None:
        raise InputError(f"--dtype {spec.dtype!r}: choose float32, bfloat16 or float16")
    if spec.sampler not in ("fewstep", "pipeline"):
        raise InputError(f"--sampler {spec.sampler!r}: choose 'fewstep' or 'pipeline'")

    # ---- 1. every local file, before anything is generated ---------------------------------
    extractor = None
    if any(m in FEATURE_METRICS for m in metrics):
        weights = (
            spec.inception_weights
            if proto.feature_extractor == "inception-v3-compat" and spec.inception_weights
            else spec.feature_extractor_weights
        )
        extractor = Extractor(
            proto.feature_extractor, weights, tuple(spec.imports), device, batch_size=max(1, min(spec.batch_size, 500))
        ).check()
    clip = None
    if "clip" in metrics:
        if not spec.clip_model:
            raise InputError(
                "metric 'clip' needs a local CLIP model folder (--clip-model DIR with config.json, "
                "weights and processor files); nothing is downloaded"
            )
        clip = ClipScorer(spec.clip_model, device, proto.caption_prefix)
    judge_ok = None
    if "class_acc" in metrics:
        from ..digits.judge import JUDGE_WEIGHTS

        if not Path(JUDGE_WEIGHTS).is_file():
            raise InputError(f"class_acc needs the digits judge weights {JUDGE_WEIGHTS}")
        if proto.conditioning != "labels":
            raise InputError("class_acc is for the class-conditional digits models (protocol 'digits')")
        judge_ok = str(JUDGE_WEIGHTS)
    if "panel" in metrics and (
        proto.reference != "digits" or spec.reference not in (None, "digits") or proto.image_size != 32
    ):
        raise InputError("metric 'panel' scores against the real digits with the digits judges (protocol 'digits')")
    if proto.bootstrap < 0:
        raise InputError(f"--bootstrap must be 0 or more, got {proto.bootstrap}")
    captions_all = load_captions(spec.captions) if spec.captions else None
    folder = ImageFolder(spec.images, proto.image_size) if spec.images is not None else None
    ref = None
    if any(m in ("fid", "kid", "prc") for m in metrics):
        ref = _reference(spec, proto, extractor)
        if ref.features is None and ("kid" in metrics or "prc" in metrics):
            raise InputError(
                f"--reference {ref.description.get('path')}: KID and precision/recall need reference "
                "features; a statistics file (.npz) gives FID only (ask for --metrics fid, or give "
                "an image folder or a .safetensors features file)"
            )

    # ---- 2. the source ------------------------------------------------------------------------
    src = None
    if spec.pipeline is not None:
        from .sources import load_source

        src = load_source(spec.pipeline, device=device, dtype=dtype, student_weights=spec.student_weights)
        if spec.times is not None:
            if spec.sampler == "pipeline":
                raise InputError(
                    "--times sets fewstep's sampler; the stock pipeline's scheduler picks its own "
                    "timesteps (drop --sampler pipeline)"
                )
            src.override_times(spec.times, spec.steps)
        if spec.hybrid:
            if spec.sampler == "pipeline":
                raise InputError("--hybrid runs fewstep's sampler; it cannot be combined with --sampler pipeline")
            if spec.hybrid >= min(spec.steps):
                raise InputError(f"--hybrid {spec.hybrid} must be below every step count ({list(spec.steps)})")
            src.hybrid_teacher()  # load (or refuse) the teacher now, before generating
        if spec.sampler == "pipeline":
            if src.pipeline is None:
                raise InputError(f"--sampler pipeline needs a pipeline folder; {src.name} is not one")
            for n in spec.steps:
                src.check_pipeline_steps(int(n))
    else:
        bad = [m for m in metrics if m in ("clip", "class_acc", "diversity")]
        if bad:
            raise InputError(f"--images scores a folder without conditions: {bad} need --pipeline")
    n = proto.num_samples
    labels, caps = (None, None)
    if src is not None:
        labels, caps = _conditions(src, proto, captions_all, n)
        if "class_acc" in metrics and int(labels.max()) >= 10:
            raise InputError(
                f"class_acc uses the digits judge (10 classes); protocol {proto.name!r} draws "
                f"{int(labels.max()) + 1} classes"
            )
    if "diversity" in metrics and labels is not None and int(torch.bincount(labels).max()) < 2:
        raise InputError(
            f"diversity compares samples of one class: {n} samples over {int(labels.max()) + 1} "
            f"classes leave one per class; use --num-samples >= {2 * (int(labels.max()) + 1)}"
        )
    if "diversity" in metrics and caps is not None and proto.diversity_per_group < 2:
        raise InputError("diversity needs at least 2 samples per caption (protocol diversity_per_group)")
    if "clip" in metrics and caps is None and src is not None and proto.conditioning == "labels":
        raise InputError("metric 'clip' needs captions: use a caption protocol (--protocol coco2014-30k)")

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
            "device": device,
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

    # ---- 3. generate and score -------------------------------------------------------------------
    partial = out / "results.partial.json"  # rows so far of a long run; never named like a complete result
    if src is None:
        t0 = time.perf_counter()
        gen_feats = extractor.features(folder)
        row = {"steps": None, "num_samples": len(folder), "images": str(spec.images)}
        row["metrics"] = _score_fidelity(gen_feats, ref, extractor, proto, metrics)
        if "panel" in metrics:
            from .panel import panel_scores

            u8 = torch.stack([folder[i] for i in range(len(folder))])
            row["metrics"]["panel"] = panel_scores(
                u8, None, bootstrap=proto.bootstrap, seed=proto.seed, cache=spec.cache
            )
        row["score_seconds"] = time.perf_counter() - t0
        results["rows"].append(row)
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


def _score_fidelity(gen_feats, ref, extractor, proto, metrics) -> dict[str, Any]:
    want = {m: m in metrics for m in ("fid", "kid", "prc")}
    if not any(want.values()):
        return {}
    vals = fidelity_from_features(
        gen_feats,
        ref,
        extractor,
        **want,
        kid_subsets=proto.kid_subsets,
        kid_subset_size=proto.kid_subset_size,
        prc_neighborhood=proto.prc_neighborhood,
    )
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

    def passes(w, den):
        return 2 if w != 1.0 and not getattr(den.conditioner, "guidance_embedded", False) else 1

    nfe = steps * passes(guidance, src.denoiser)
    hybrid = None
    if spec.hybrid:
        t = src.hybrid_teacher()
        tw = t.default_guidance if spec.teacher_guidance is None else float(spec.teacher_guidance)
        nfe = spec.hybrid * passes(tw, t.denoiser) + (steps - spec.hybrid) * passes(guidance, src.denoiser)
        hybrid = {
            "teacher_steps": spec.hybrid,
            "teacher": t.name,
            "teacher_guidance": tw,
            "teacher_times": times[: spec.hybrid + 1],
            "student_times": times[spec.hybrid :],
        }
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
    save_grid(u8[:100], out / f"grid_{tag}.png", cols=10)
    if spec.save_images:
        names = [f"{i:06d}" + (f"_label{int(labels[i])}" if labels is not None else "") for i in range(n)]
        save_images(u8, out / "images" / tag, names)
        row["images"] = str(out / "images" / tag)
    return row


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


# ---------------------------------------------------------------------------------------------
_COLUMNS = [
    ("fid", "FID", "{:.3f}"),
    ("kid", "KID", "{:.4g}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("class_acc", "class acc", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("vendi", "Vendi", "{:.2f}"),
    ("clip", "CLIP", "{:.2f}"),
]


def _fmt(key: str, m: dict | None, fmt: str) -> str:
    if m is None:
        return "-"
    return fmt.format(m["value"])


def markdown_table(results: dict[str, Any], label: str | None = None) -> str:
    """The results as a markdown table (one row per step count) with the provenance below it."""
    rows = results["rows"]
    cols = [c for c in _COLUMNS if any(c[0] in r.get("metrics", {}) for r in rows)]
    name = label or results["source"].get("name") or results["source"].get("path")
    head = ["source", "steps", "NFE", "guidance"] + [c[1] for c in cols] + ["samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sps = r.get("samples_per_second")
        cells = [str(name)] + ["-" if r.get(k) is None else str(r[k]) for k in ("steps", "nfe", "guidance")]
        cells += [_fmt(k, r.get("metrics", {}).get(k), f) for k, _, f in cols]
        cells.append("-" if sps is None else f"{sps:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    p = results["protocol"]
    ext = results.get("extractor") or {}
    ref = results.get("reference") or {}
    counts = sorted({r.get("num_samples") for r in rows})
    lines += [
        "",
        f"Protocol `{p['name']}`: {', '.join(map(str, counts))} samples per row, seed {p['seed']} (sample i "
        f"uses seed + i), conditioning {p['conditioning']}, scoring size {p['image_size']}.",
        f"Backend: torch-fidelity {results['backend']['torch_fidelity']}, extractor `{ext.get('name')}` "
        f"(weights sha256 {str(ext.get('weights_sha256'))[:16]}...), reference {ref.get('kind')} "
        f"({ref.get('count')} images). Diversity is the mean pairwise feature "
        "distance within a class, Vendi the Vendi score within a class.",
        f"Device {results['backend']['device']} ({results['backend']['dtype']}, "
        f"{results['backend']['threads']} threads).",
    ]
    panel = [
        (f"{name}, {r['steps']} steps" if r.get("steps") else str(name), r["metrics"]["panel"])
        for r in rows
        if "panel" in r.get("metrics", {})
    ]
    if panel:
        from .panel import panel_table

        lines += [
            "",
            "Judge panel (FID of every member with its 95% bootstrap interval; median and range over "
            "the judges; pixel-pca64 is the judge-free pixel-PCA distance):",
            "",
            panel_table(panel),
        ]
    return "\n".join(lines) + "\n"
