"""The numbers: torch-fidelity FID / KID / precision-recall from features extracted once, feature
diversity (mean pairwise distance and Vendi score) within one condition (evaluation/diversity.py),
and CLIP score (evaluation/clip_score.py).

FID, KID and precision/recall are computed by torch-fidelity's own functions
(`fid_featuresdict_to_statistics`, `fid_statistics_to_metric`, `kid_featuresdict_to_metric`,
`prc_featuresdict_to_metric`) on features from torch-fidelity's own extraction loop, i.e. exactly
what `torch_fidelity.calculate_metrics` computes; the features are extracted once per image set
so the metrics and the diversity share them, and reference features are cached on disk under a
key that includes the extractor, its layer and the sha256 of its weights (torch-fidelity's own
cache key ignores the weights, and its cache unpickles; fewstep's cache is safetensors).

Nothing here downloads: `Extractor.check()` refuses an extractor whose weights are not local,
naming the file and the flag that provides it, before anything is generated.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .clip_score import ClipScorer as ClipScorer  # re-exported: the metrics' old home
from .diversity import diversity as diversity
from .diversity import mean_pairwise_distance as mean_pairwise_distance
from .diversity import vendi_score as vendi_score
from .inputs import InputError, TensorImages, atomic_save_safetensors
from .protocols import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, file_sha256
from .safe_weights import verified_torch_weights

__all__ = [
    "Extractor",
    "ReferenceFeatures",
    "fidelity_from_features",
    "fidelity_metrics",
    "cache_dir",
    "torch_fidelity_version",
]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's own file name


def torch_fidelity_version() -> str:
    import torch_fidelity

    return str(torch_fidelity.__version__)


def cache_dir() -> Path:
    """$FEWSTEP_CACHE or ~/.cache/fewstep."""
    root = os.environ.get("FEWSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewstep")
    return Path(root)


@dataclass
class Extractor:
    """A torch-fidelity feature extractor, resolved and checked before any generation.

    name:          registered torch-fidelity name ("fewstep-digits-judge", "inception-v3-compat", ...)
    weights:       local weights file (None: the extractor's own local default, if it has one)
    imports:       modules to import first (they register custom extractors)
    feature_layer: one feature layer for every metric (None: the extractor's default per metric)
    extra_layers:  further layers extracted along (e.g. the digits judge's "logits")
    """

    name: str = DIGITS_EXTRACTOR
    weights: str | None = None
    imports: Sequence[str] = ()
    device: str = "cpu"
    batch_size: int = 256
    feature_layer: str | None = None
    extra_layers: Sequence[str] = ()
    weights_sha256: str = field(default="", init=False)
    weights_file: str | None = field(default=None, init=False)
    _tf_weights: str | None = field(default=None, init=False, repr=False)
    _module: Any = field(default=None, init=False, repr=False)

    def check(self) -> Extractor:
        """Resolve the weights file and hash it; raise naming the file and flag if it is missing."""
        for mod in self.imports:
            importlib.import_module(mod)
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if self.name.startswith("fewstep-digits-"):
            from fewstep.digits.panel import register_panel

            register_panel()  # the project's judge, the other panel judges and the pixel-PCA measure
        default = getattr(FEATURE_EXTRACTORS_REGISTRY.get(self.name), "default_weights", None)
        if default is not None:  # a digits judge (fewstep.digits.judge.JudgeFeatureExtractor)
            path = Path(self.weights) if self.weights else Path(default)
            if not path.is_file():
                raise InputError(
                    f"digits judge weights {path} not found (--feature-extractor-weights, "
                    "or create them with `python train/judge.py`)"
                )
            self.weights_file, self._tf_weights = str(path), str(path)
        elif self.name not in FEATURE_EXTRACTORS_REGISTRY:
            raise InputError(
                f"--feature-extractor {self.name!r} is not registered with torch-fidelity "
                f"(known: {sorted(FEATURE_EXTRACTORS_REGISTRY)}; --import MODULE registers more)"
            )
        elif self.name == INCEPTION_EXTRACTOR:
            path = Path(self.weights) if self.weights else (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
            if not path.is_file():
                raise InputError(
                    f"Inception weights {path} not found: pass a local copy of torch-fidelity's "
                    f"{INCEPTION_FILE} (or a .safetensors of it) with --inception-weights; "
                    "nothing is downloaded"
                )
            self.weights_file, self._tf_weights = str(path), str(verified_torch_weights(path))
        elif self.name.startswith("dinov2"):
            raise InputError(
                f"--feature-extractor {self.name}: torch-fidelity can only download DINOv2 "
                "weights (no local path), so it cannot run offline"
            )
        elif self.name in ("vgg16",) or self.name.startswith("clip-"):
            if not self.weights or not Path(self.weights).is_file():
                raise InputError(
                    f"--feature-extractor {self.name} needs its local weights file "
                    f"(--feature-extractor-weights; got {self.weights!r}); nothing is downloaded"
                )
            path = Path(self.weights)
            self.weights_file = str(path)
            self._tf_weights = str(path if self.name.startswith("clip-") else verified_torch_weights(path))
        else:  # a custom extractor: it finds its own weights; hash what we were given
            if self.weights and not Path(self.weights).is_file():
                raise InputError(f"feature extractor weights {self.weights} not found (--feature-extractor-weights)")
            self.weights_file = self._tf_weights = self.weights
        if self.weights_file:
            self.weights_sha256 = file_sha256(self.weights_file)
        else:
            self.weights_sha256 = str(getattr(FEATURE_EXTRACTORS_REGISTRY[self.name], "weights_sha256", "unknown"))
        provided = FEATURE_EXTRACTORS_REGISTRY[self.name].get_provided_features_list()
        for layer in (self.feature_layer, *self.extra_layers):
            if layer is not None and layer not in provided:
                raise InputError(
                    f"feature extractor {self.name!r} has no feature layer {layer!r} (provided: {list(provided)})"
                )
        return self

    # -------------------------------------------------------------------------------------
    def layer(self, metric: str = "fid") -> str:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if self.feature_layer is not None:
            return self.feature_layer
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(metric)

    def layers(self) -> list[str]:
        return sorted({self.layer(m) for m in ("fid", "kid", "prc")} | set(self.extra_layers))

    def tf_kwargs(self) -> dict[str, Any]:
        """The torch-fidelity keyword arguments that select this extractor (what a direct
        `torch_fidelity.calculate_metrics` call needs to reproduce the numbers)."""
        kw: dict[str, Any] = {"feature_extractor": self.name, "cuda": self.device.startswith("cuda"), "verbose": False}
        if self._tf_weights:
            kw["feature_extractor_weights_path"] = self._tf_weights
        return kw

    def module(self):
        if self._module is None:
            from torch_fidelity.utils import create_feature_extractor

            self._module = create_feature_extractor(self.name, self.layers(), **self.tf_kwargs())
        return self._module

    @torch.no_grad()
    def features(self, images: Dataset) -> dict[str, Tensor]:
        """{layer: (N, D) float32 features} through torch-fidelity's own extraction loop."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        if len(images) == 0:
            raise InputError("no images to score (0 samples)")
        return get_featuresdict_from_dataset(
            images, self.module(), self.batch_size, self.device.startswith("cuda"), True, False
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": {m: self.layer(m) for m in ("fid", "kid", "prc")},
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
        }


# ---------------------------------------------------------------------------------------------
@dataclass
class ReferenceFeatures:
    """Reference features ({layer: (N, D)}) or, from a statistics file, FID statistics only."""

    description: dict[str, Any]
    features: dict[str, Tensor] | None = None
    stats: dict[str, np.ndarray] | None = None  # {"mu", "sigma"}: FID only

    @property
    def count(self) -> int | None:
        if self.features is not None:
            return int(next(iter(self.features.values())).shape[0])
        return self.description.get("count")

    @staticmethod
    def cache_key(extractor: Extractor, identity: Any) -> str:
        blob = json.dumps(
            {
                "extractor": extractor.name,
                "layers": extractor.layers(),
                "weights_sha256": extractor.weights_sha256,
                "reference": identity,
                "reader": 1,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @classmethod
    def compute(
        cls,
        images: Dataset,
        extractor: Extractor,
        identity: Any,
        description: dict[str, Any],
        use_cache: bool = True,
        root: str | Path | None = None,
    ) -> ReferenceFeatures:
        """Features of a reference image set, cached under (extractor, layers, weights sha256,
        reference identity) in `root` (default `cache_dir()`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        key = cls.cache_key(extractor, identity)
        path = (
            (Path(root) if root is not None else cache_dir()) / "eval-reference" / f"{extractor.name}-{key}.safetensors"
        )
        desc = {**description, "cache_key": key}
        if use_cache and path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                feats = None
                if meta.get("weights_sha256") == extractor.weights_sha256 and meta.get("extractor") == extractor.name:
                    feats = load_file(str(path))
            except Exception as e:  # a truncated or damaged cache file: recompute (and rewrite) it
                print(
                    f"reference cache {path} cannot be read ({type(e).__name__}); recomputing it",
                    file=sys.stderr,
                    flush=True,
                )
                feats = None
            if feats is not None:
                return cls({**desc, "cache": str(path), "cached": True}, features=feats)
        feats = extractor.features(images)
        if use_cache:
            atomic_save_safetensors(
                path,
                feats,
                {
                    "extractor": extractor.name,
                    "weights_sha256": extractor.weights_sha256,
                    "key": key,
                    "description": json.dumps(description, default=str),
                },
            )
        return cls({**desc, "cache": str(path) if use_cache else None, "cached": False}, features=feats)

    @classmethod
    def from_file(cls, path: str | Path, extractor: Extractor) -> ReferenceFeatures:
        """A statistics file: .npz with `mu` and `sigma` (FID only; the extractor cannot be
        checked), or a .safetensors of features written by this module (checked: extractor name
        and weights hash must match)."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"reference statistics file {p} does not exist (--reference)")
        if p.suffix == ".npz":
            try:
                with np.load(p, allow_pickle=False) as z:
                    if "mu" not in z or "sigma" not in z:
                        raise InputError(
                            f"reference statistics {p} must hold arrays 'mu' and 'sigma', has {sorted(z.keys())}"
                        )
                    mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                    count = int(z["count"]) if "count" in z else None
            except (ValueError, OSError) as e:
                raise InputError(f"cannot read reference statistics {p}: {e}") from e
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise InputError(f"reference statistics {p}: mu {mu.shape} and sigma {sigma.shape} do not match")
            return cls(
                {"kind": "stats", "path": str(p), "sha256": file_sha256(p), "count": count, "extractor_checked": False},
                stats={"mu": mu, "sigma": sigma},
            )
        if p.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open
            from safetensors.torch import load_file

            try:
                with safe_open(str(p), framework="pt") as f:
                    meta = f.metadata() or {}
                feats = load_file(str(p))
            except (SafetensorError, OSError) as e:
                raise InputError(f"cannot read reference features {p}: {e}") from e
            if meta.get("extractor") != extractor.name or meta.get("weights_sha256") != extractor.weights_sha256:
                raise InputError(
                    f"reference features {p} were made with extractor {meta.get('extractor')!r} "
                    f"(weights {meta.get('weights_sha256', '?')[:12]}), not {extractor.name!r} "
                    f"(weights {extractor.weights_sha256[:12]})"
                )
            return cls(
                {"kind": "features", "path": str(p), "sha256": file_sha256(p), "extractor_checked": True},
                features=feats,
            )
        raise InputError(f"--reference {p}: a file must be .npz (mu, sigma) or .safetensors (features)")


def fidelity_from_features(
    gen: dict[str, Tensor],
    ref: ReferenceFeatures,
    extractor: Extractor,
    fid: bool = True,
    kid: bool = False,
    prc: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    rng_seed: int = 2020,
) -> dict[str, Any]:
    """torch-fidelity's FID / KID / precision-recall on extracted features.

    Returns {"fid", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall", "f_score"} for
    the requested metrics. KID's subset size is clamped to both sample counts."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    out: dict[str, Any] = {}
    if fid:
        layer = extractor.layer("fid")
        s1 = fid_featuresdict_to_statistics(gen, layer)
        if ref.features is not None:
            s2 = fid_featuresdict_to_statistics(ref.features, layer)
        else:
            s2 = dict(ref.stats)
            s1 = {"mu": s1["mu"].astype(np.float64), "sigma": s1["sigma"]}
            if s1["mu"].shape != s2["mu"].shape:
                raise InputError(
                    f"reference statistics have {s2['mu'].shape[0]} dimensions, the extractor's "
                    f"{layer!r} features {s1['mu'].shape[0]}"
                )
        out["fid"] = float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])
    if (kid or prc) and ref.features is None:
        raise InputError(
            "KID and precision/recall need reference features: a statistics file (.npz) "
            "gives FID only; give an image folder or a features file as --reference"
        )
    if kid:
        layer = extractor.layer("kid")
        n = min(gen[layer].shape[0], ref.features[layer].shape[0])
        size = min(kid_subset_size, n)
        if size < 2:
            raise InputError(f"KID needs at least 2 samples on each side, got {n}")
        m = kid_featuresdict_to_metric(
            gen, ref.features, layer, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=rng_seed, verbose=False
        )
        out.update(
            kid_mean=float(m["kernel_inception_distance_mean"]),
            kid_std=float(m["kernel_inception_distance_std"]),
            kid_subset_size=size,
        )
    if prc:
        layer = extractor.layer("prc")
        n = min(gen[layer].shape[0], ref.features[layer].shape[0])
        if n <= prc_neighborhood:
            raise InputError(f"precision/recall needs more than {prc_neighborhood} samples on each side, got {n}")
        m = prc_featuresdict_to_metric(
            gen,
            ref.features,
            layer,
            prc_neighborhood=prc_neighborhood,
            prc_batch_size=10000,
            save_cpu_ram=False,
            verbose=False,
        )
        out.update(precision=float(m["precision"]), recall=float(m["recall"]), f_score=float(m["f_score"]))
    return out


def _as_dataset(x, which: str) -> Dataset:
    if torch.is_tensor(x):
        if x.is_floating_point():
            raise InputError(
                f"{which}: expected uint8 (N, 3, H, W) images, got {x.dtype} {tuple(x.shape)} "
                "(float images in [-1, 1] go through fewstep.digits.data.to_uint8_rgb first)"
            )
        return TensorImages(x)
    if isinstance(x, Dataset):
        return x
    if isinstance(x, (str, Path)):
        from .inputs import ImageFolder

        if not Path(x).is_dir():
            raise FileNotFoundError(f"{which}: {str(x)!r} is neither an image folder nor 'digits'")
        return ImageFolder(x, None)
    raise TypeError(
        f"{which}: expected a uint8 (N, 3, H, W) tensor, a torch Dataset, an image folder or "
        f"'digits', got {type(x).__name__}"
    )


def fidelity_metrics(
    generated,
    reference,
    extractor: str = DIGITS_EXTRACTOR,
    fid: bool = True,
    kid: bool = False,
    prc: bool = False,
    feature_layer: str | None = None,
    weights: str | None = None,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    batch_size: int = 256,
    device: str = "cpu",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    rng_seed: int = 2020,
) -> dict[str, Any]:
    """FID / KID / precision-recall of `generated` against `reference` in one call (the same
    `Extractor` and `fidelity_from_features` that `fewstep eval` uses).

    Args:
        generated: uint8 (N, 3, H, W) tensor, a torch Dataset of such (3, H, W) tensors, or an image folder.
        reference: the same kinds, or "digits" (all 1,797 real digits; features cached on disk
            under `cache_dir`, default $FEWSTEP_CACHE or ~/.cache/fewstep, keyed by the weights' sha256).
        extractor: a registered torch-fidelity feature extractor; default the digits judge.
        feature_layer: one layer for every metric (default: the extractor's per metric).
        weights: the extractor's local weights file (default: its own).

    Returns:
        the keys of `fidelity_from_features` that were asked for: "fid"; "kid_mean", "kid_std",
        "kid_subset_size"; "precision", "recall", "f_score".
    """
    if not (fid or kid or prc):
        raise ValueError("fidelity_metrics: ask for at least one of fid, kid, prc")
    ext = Extractor(extractor, weights, device=device, batch_size=batch_size, feature_layer=feature_layer).check()
    gen = ext.features(_as_dataset(generated, "generated"))
    if isinstance(reference, str) and reference == "digits":
        from .digits import digits_reference

        ref = digits_reference(ext, use_cache=cache, root=cache_dir)
    else:
        ref = ReferenceFeatures({"kind": "given"}, features=ext.features(_as_dataset(reference, "reference")))
    wanted = {"fid": fid, "kid": kid, "prc": prc}
    settings = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "prc_neighborhood": prc_neighborhood}
    return fidelity_from_features(gen, ref, ext, **wanted, **settings, rng_seed=rng_seed)
