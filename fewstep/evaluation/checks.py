"""The checks of one evaluation that can fail on user input, all made before the first image is
generated: the protocol, metrics and dtype asked for, the scorers' local files (feature extractor
weights, CLIP model, digits judge), the reference, the source with its sampler options, and the
conditions every sample is drawn with. `fewstep.evaluation.run.evaluate` calls them in this order."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .clip_score import ClipScorer
from .inputs import ImageFolder, InputError
from .protocols import Protocol, get_protocol, select_captions
from .scores import Extractor, ReferenceFeatures

if TYPE_CHECKING:
    from .run import EvalSpec

__all__ = ["METRICS", "FEATURE_METRICS", "settings", "scorers", "reference", "source", "conditions"]

METRICS = ("fid", "kid", "prc", "clip", "class_acc", "diversity", "panel")
FEATURE_METRICS = ("fid", "kid", "prc", "diversity")


def settings(spec: EvalSpec) -> tuple[Protocol, list[str], torch.dtype]:
    """The protocol with the spec's overrides, the metrics to score and the backbone dtype."""
    overridable = ("num_samples", "seed", "image_size", "feature_extractor", "kid_subset_size", "bootstrap")
    proto = get_protocol(spec.protocol).with_overrides(**{k: getattr(spec, k) for k in overridable})
    if proto.num_samples < 2:
        raise InputError(f"--num-samples must be at least 2, got {proto.num_samples}")
    metrics = _metrics(spec, proto)
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

    return proto, metrics, dtype


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


def _reference_features(spec: EvalSpec, proto: Protocol, extractor: Extractor) -> ReferenceFeatures:
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


def _labels_or_captions(src, proto: Protocol, captions: list[str] | None, n: int):
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


def scorers(
    spec: EvalSpec, proto: Protocol, metrics: list[str]
) -> tuple[Extractor | None, ClipScorer | None, str | None]:
    """The feature extractor, the CLIP scorer and the digits judge's weights file that the metrics
    need (None where they need none), each checked to be there."""
    extractor = None
    if any(m in FEATURE_METRICS for m in metrics):
        weights = (
            spec.inception_weights
            if proto.feature_extractor == "inception-v3-compat" and spec.inception_weights
            else spec.feature_extractor_weights
        )
        extractor = Extractor(
            proto.feature_extractor,
            weights,
            tuple(spec.imports),
            spec.device,
            batch_size=max(1, min(spec.batch_size, 500)),
        ).check()
    clip = None
    if "clip" in metrics:
        if not spec.clip_model:
            raise InputError(
                "metric 'clip' needs a local CLIP model folder (--clip-model DIR with config.json, "
                "weights and processor files); nothing is downloaded"
            )
        clip = ClipScorer(spec.clip_model, spec.device, proto.caption_prefix)
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
    return extractor, clip, judge_ok


def reference(
    spec: EvalSpec, proto: Protocol, metrics: list[str], extractor: Extractor | None
) -> ReferenceFeatures | None:
    """The reference features FID, KID and precision/recall compare with (None without them)."""
    ref = None
    if any(m in ("fid", "kid", "prc") for m in metrics):
        ref = _reference_features(spec, proto, extractor)
        if ref.features is None and ("kid" in metrics or "prc" in metrics):
            raise InputError(
                f"--reference {ref.description.get('path')}: KID and precision/recall need reference "
                "features; a statistics file (.npz) gives FID only (ask for --metrics fid, or give "
                "an image folder or a .safetensors features file)"
            )

    return ref


def source(spec: EvalSpec, metrics: list[str], dtype: torch.dtype) -> Any:
    """The model to generate from (None for a folder of images), with its sampler options checked:
    explicit times, hybrid sampling, the stock pipeline's step counts."""
    src = None
    if spec.pipeline is not None:
        from .sources import load_source

        src = load_source(spec.pipeline, device=spec.device, dtype=dtype, student_weights=spec.student_weights)
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
    return src


def conditions(src: Any, proto: Protocol, captions_all: list[str] | None, metrics: list[str], n: int):
    """(labels, captions) of the n samples, and the checks the metrics make of them."""
    labels, caps = (None, None)
    if src is not None:
        labels, caps = _labels_or_captions(src, proto, captions_all, n)
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

    return labels, caps
