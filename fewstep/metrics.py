"""Sample-quality metrics: torch-fidelity glue and the digits scores.

- `fidelity_metrics(generated, reference, ...)`: FID / KID / precision-recall computed by
  torch-fidelity's own code (feature extraction, statistics, FID/KID/PRC formulas) with any
  registered feature extractor, the digits judge by default.
- `class_accuracy(images, labels)`: share of samples the digits judge reads as the requested class.
- `digits_scores(images, labels)`: {"fid", "class_acc", "n"} for float digits in [-1, 1] against
  all 1,797 real digits.

Reference features are cached on disk as safetensors, keyed by reference name, extractor name,
feature layer AND the sha256 of the extractor's weights (torch-fidelity's own cache key ignores
the weights, and it reloads with pickle, so its cache is always switched off here). Cache folder:
`cache_dir`, else $FEWSTEP_CACHE, else ~/.cache/fewstep; features live under `fidelity/`.
Extractors whose weights file is not known (a built-in extractor without
`feature_extractor_weights_path`) are never cached.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from torch_fidelity.defaults import DEFAULTS as _TF_DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, prepare_input_from_descriptor

from .digits.data import load_digits_tensors, to_uint8_rgb
from .digits.judge import JUDGE_NAME, JUDGE_WEIGHTS, DigitsJudge, load_judge, register_judge_extractor, weights_sha256

DIGITS_REFERENCE = "digits"
# Bump when the way cached features are computed changes (preprocessing, reference images).
_CACHE_FORMAT = "v1"
# Keywords fidelity_metrics sets itself; everything else in torch-fidelity's DEFAULTS passes through.
_MANAGED = {"input1", "input2", "isc", "fid", "kid", "prc", "ppl", "feature_extractor", "cache", "cache_root",
            "feature_layer_isc", "feature_layer_fid", "feature_layer_kid", "feature_layer_prc",
            "input1_cache_name", "input2_cache_name", "verbose"}

register_judge_extractor()


def default_cache_dir() -> Path:
    """$FEWSTEP_CACHE, else ~/.cache/fewstep."""
    env = os.environ.get("FEWSTEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fewstep"


class UInt8ImageDataset(Dataset):
    """uint8 (N, 3, H, W) images as the torch Dataset torch-fidelity reads."""

    def __init__(self, images: Tensor, name: str = "images"):
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            desc = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{name}: expected uint8 images of shape (N, 3, H, W), got {desc} "
                             "(float images in [-1, 1] go through fewstep.digits.data.to_uint8_rgb first)")
        if images.shape[0] == 0:
            raise ValueError(f"{name}: no images")
        self.images = images.detach().cpu().contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


@lru_cache(maxsize=1)
def _digits_uint8() -> Tensor:
    return to_uint8_rgb(load_digits_tensors()[0])


def digits_reference_dataset() -> UInt8ImageDataset:
    """All 1,797 real digits, 32x32, as uint8 RGB."""
    return UInt8ImageDataset(_digits_uint8(), name="digits")


def _as_input(x, which: str, tf_kw: dict) -> tuple[Dataset, str | None]:
    """(dataset, cache name or None) for a tensor, a Dataset, a folder, or "digits"."""
    if isinstance(x, str) and x == DIGITS_REFERENCE:
        return digits_reference_dataset(), f"digits-all-{_digits_uint8().shape[0]}-{_digits_uint8().shape[-1]}px"
    if torch.is_tensor(x):
        return UInt8ImageDataset(x, name=which), None
    if isinstance(x, Dataset):
        return x, None
    if isinstance(x, (str, Path)):
        if not Path(x).is_dir():
            raise FileNotFoundError(f"{which}: {str(x)!r} is neither an image folder nor {DIGITS_REFERENCE!r}")
        ds = prepare_input_from_descriptor({"input": str(x)}, **tf_kw)
        return ds, None
    raise TypeError(f"{which}: expected uint8 (N, 3, H, W) tensor, torch Dataset, image folder or "
                    f"{DIGITS_REFERENCE!r}, got {type(x).__name__}")


def _weights_sha(extractor: str, tf_kw: dict) -> str | None:
    path = tf_kw.get("feature_extractor_weights_path")
    if path is None and extractor == JUDGE_NAME:
        path = JUDGE_WEIGHTS
    if path is None or not Path(path).is_file():
        return None
    return _sha_cached(str(Path(path).resolve()), os.stat(path).st_mtime_ns, os.stat(path).st_size)


@lru_cache(maxsize=16)
def _sha_cached(path: str, mtime_ns: int, size: int) -> str:
    return weights_sha256(path)


def _extract(ds: Dataset, fe, layers: list[str], tf_kw: dict) -> dict[str, Tensor]:
    feats = get_featuresdict_from_dataset(ds, fe, tf_kw["batch_size"], tf_kw["cuda"], tf_kw["save_cpu_ram"], False)
    return {k: feats[k] for k in layers}


def _cached_extract(ds: Dataset, cache_name: str | None, fe, extractor: str, layers: list[str], tf_kw: dict,
                    cache_dir: Path, sha: str | None) -> dict[str, Tensor]:
    if cache_name is None or sha is None:
        return _extract(ds, fe, layers, tf_kw)
    from safetensors.torch import load_file, save_file

    folder = cache_dir / "fidelity"
    files = {k: folder / f"{cache_name}--{extractor}--{k}--{sha[:16]}-{_CACHE_FORMAT}.safetensors" for k in layers}
    out = {}
    for k, f in files.items():
        if f.is_file():
            try:
                out[k] = load_file(str(f))["features"]
            except Exception as e:  # a truncated or foreign file: say which, then recompute it
                warnings.warn(f"cached features {f} cannot be read ({e}); recomputing them")
    missing = [k for k in layers if k not in out]
    if missing:
        new = _extract(ds, fe, missing, tf_kw)
        folder.mkdir(parents=True, exist_ok=True)
        for k in missing:
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            os.close(fd)
            save_file({"features": new[k].contiguous()}, tmp, metadata={"extractor": extractor, "layer": k,
                                                                          "weights_sha256": sha, "input": cache_name})
            os.replace(tmp, files[k])  # atomic: concurrent writers leave one complete file
            out[k] = new[k]
    return out


def fidelity_metrics(generated, reference, extractor: str = JUDGE_NAME, fid: bool = True, kid: bool = False,
                     prc: bool = False, feature_layer: str | None = None, cache_dir: str | Path | None = None,
                     **kw) -> dict[str, float]:
    """FID / KID / precision-recall of `generated` against `reference`, computed by torch-fidelity.

    Args:
        generated: uint8 (N, 3, H, W) tensor, a torch Dataset of such (3, H, W) tensors, or an image
            folder (png/jpg, read by torch-fidelity).
        reference: the same kinds, or "digits" (all 1,797 real digits; features cached on disk).
        extractor: a registered torch-fidelity feature extractor; default the digits judge.
        fid, kid, prc: which metrics (input1 = generated, input2 = reference, torch-fidelity's
            convention for precision / recall).
        feature_layer: one feature layer for every metric; default the extractor's per-metric default.
        cache_dir: where reference features are cached; default $FEWSTEP_CACHE or ~/.cache/fewstep.
        **kw: further torch-fidelity keywords (batch_size, cuda, kid_subsets, kid_subset_size,
            prc_neighborhood, feature_extractor_weights_path, rng_seed, ...). kid_subset_size is
            clamped to the sample counts. `cuda` defaults to False for the judge (it is tiny) and to
            torch.cuda.is_available() otherwise.

    Returns:
        torch-fidelity's keys: frechet_inception_distance, kernel_inception_distance_mean / _std,
        precision, recall, f_score (those asked for), as floats.
    """
    return _fidelity(generated, reference, extractor, fid, kid, prc, feature_layer, cache_dir, (), kw)[0]


def _fidelity(generated, reference, extractor: str, fid: bool, kid: bool, prc: bool, feature_layer: str | None,
              cache_dir, extra_layers: tuple[str, ...], kw: dict) -> tuple[dict[str, float], dict[str, Tensor]]:
    """fidelity_metrics, also returning the generated images' features (metric layers + extra_layers)."""
    if not (fid or kid or prc):
        raise ValueError("fidelity_metrics: ask for at least one of fid, kid, prc")
    for k in kw:
        if k not in _TF_DEFAULTS:
            raise TypeError(f"fidelity_metrics: unknown keyword {k!r} (not a torch-fidelity option)")
        if k in _MANAGED:
            raise TypeError(f"fidelity_metrics: keyword {k!r} is set by fidelity_metrics itself")
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"fidelity_metrics: feature extractor {extractor!r} is not registered with torch-fidelity "
                         f"(known: {sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    tf_kw = {**_TF_DEFAULTS, "batch_size": 256, "save_cpu_ram": True, "datasets_download": False,
             "cuda": False if extractor == JUDGE_NAME else torch.cuda.is_available(), **kw,
             "verbose": False, "cache": False, "feature_extractor": extractor}
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    wanted = [m for m, on in (("fid", fid), ("kid", kid), ("prc", prc)) if on]
    layer_of = {m: feature_layer or cls.get_default_feature_layer_for_metric(m) for m in wanted}
    for m, layer in layer_of.items():
        if layer not in cls.get_provided_features_list():
            raise ValueError(f"fidelity_metrics: {extractor!r} has no feature layer {layer!r} "
                             f"(provided: {cls.get_provided_features_list()})")
        tf_kw[f"feature_layer_{m}"] = layer
    layers = sorted(set(layer_of.values()))
    gen_layers = sorted(set(layers) | set(extra_layers))

    ds_gen, name_gen = _as_input(generated, "generated", tf_kw)
    ds_ref, name_ref = _as_input(reference, "reference", tf_kw)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha = _weights_sha(extractor, tf_kw)

    fe = create_feature_extractor(extractor, gen_layers, **tf_kw)
    f_gen = _cached_extract(ds_gen, name_gen, fe, extractor, gen_layers, tf_kw, cache_dir, sha)
    f_ref = _cached_extract(ds_ref, name_ref, fe, extractor, layers, tf_kw, cache_dir, sha)

    out: dict[str, float] = {}
    if fid:
        layer = layer_of["fid"]
        for which, f in (("generated", f_gen[layer]), ("reference", f_ref[layer])):
            if f.shape[0] < 2:
                raise ValueError(f"fidelity_metrics: FID needs at least 2 {which} samples, got {f.shape[0]}")
        stats_gen = fid_features_to_statistics(f_gen[layer])
        stats_ref = fid_features_to_statistics(f_ref[layer])
        out.update(fid_statistics_to_metric(stats_gen, stats_ref, False))
    if kid:
        layer = layer_of["kid"]
        n = min(f_gen[layer].shape[0], f_ref[layer].shape[0])
        kid_kw = {**tf_kw, "kid_subset_size": min(int(tf_kw["kid_subset_size"]), n)}
        out.update(kid_features_to_metric(f_gen[layer], f_ref[layer], **kid_kw))
    if prc:
        layer = layer_of["prc"]
        out.update(prc_features_to_metric(f_gen[layer], f_ref[layer], **tf_kw))
    return {k: float(v) for k, v in out.items()}, f_gen


@lru_cache(maxsize=1)
def _default_judge() -> DigitsJudge:
    return load_judge()


def _check_float_images(images: Tensor, fn: str) -> None:
    ok = torch.is_tensor(images) and images.is_floating_point() and images.dim() == 4 and images.shape[1] in (1, 3)
    if not ok:
        desc = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{fn}: expected float images in [-1, 1] of shape (B, 1 or 3, H, W), got {desc}")


@torch.no_grad()
def class_accuracy(images: Tensor, labels: Tensor, judge: DigitsJudge | None = None) -> float:
    """Share of `images` (float, [-1, 1], (B, 1 or 3, 32, 32)) that the judge labels as `labels` (B,)."""
    _check_float_images(images, "class_accuracy")
    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"class_accuracy: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("class_accuracy: no images")
    judge = judge if judge is not None else _default_judge()
    pred = judge.predict(images.detach().float().cpu())
    return (pred == labels).float().mean().item()


def digits_scores(images: Tensor, labels: Tensor | None, cache_dir: str | Path | None = None,
                  **kw) -> dict[str, float | int]:
    """FID (digits-judge features, torch-fidelity, against all 1,797 real digits) and class accuracy,
    from one pass of the judge.

    Args:
        images: float (B, 1, 32, 32) in [-1, 1]. They are quantised to uint8 as a saved image would
            be, and both numbers are read from those images (so class_acc can differ from
            `class_accuracy` on the raw floats by the effect of that rounding alone).
        labels: (B,) requested classes, or None for unconditional samples (class_acc is then nan).
        cache_dir, **kw: passed to `fidelity_metrics`.

    Returns:
        {"fid": float, "class_acc": float, "n": int}
    """
    _check_float_images(images, "digits_scores")
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"digits_scores: {images.shape[0]} images but {labels.shape[0]} labels")
    u8 = to_uint8_rgb(images.detach().float().cpu())
    metrics, feats = _fidelity(u8, DIGITS_REFERENCE, JUDGE_NAME, True, False, False, None, cache_dir, ("logits",), kw)
    acc = (feats["logits"].argmax(1) == labels).float().mean().item() if labels is not None else float("nan")
    return {"fid": metrics[KEY_METRIC_FID], "class_acc": acc, "n": int(images.shape[0])}
