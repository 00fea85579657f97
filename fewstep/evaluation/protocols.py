"""Evaluation protocols as named presets: what is generated (how many samples, which labels or
captions, which seed), at which resolution it is scored, with which feature extractor and against
which reference. Every field is written into the results so a number can be reproduced.

    restoration   the embedded restoration default (fewstep.digits.restoration): the 359 held-out
                  digits under each degradation (sr4, noise, blur), restored and scored against
                  their targets: PSNR, SSIM (torchmetrics), judge-feature distance, class
                  accuracy, FID; baselines bicubic (sr4) and the degraded input. Outputs and
                  targets must have the same size (fewstep.evaluation.restoration).
    digits        the embedded default: 2,000 samples, labels 0..9 balanced, seed 0, the digits
                  judge's features, reference = all 1,797 real digits, native 32x32; plus the
                  judge panel (metric "panel": every member, median and range, bootstrap
                  intervals, the real-vs-real floor).
    coco2014-30k  SD1.5 practice (DMD2): 30,000 COCO-2014 val captions, images resized to 256,
                  Inception (pool3) against val2014 images, CLIP score.
    coco-10k      SDXL practice (DMD2): 10,000 COCO captions at 512, Inception, CLIP score.

The COCO presets need local files: `--captions` (COCO annotation JSON or one caption a line),
`--reference` (an image folder or a statistics/features file), `--inception-weights` and, for CLIP
score, `--clip-model`. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .inputs import InputError

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "load_captions", "select_captions", "file_sha256"]

DIGITS_EXTRACTOR = "fewstep-digits-judge"
INCEPTION_EXTRACTOR = "inception-v3-compat"


@dataclass(frozen=True)
class Protocol:
    name: str
    num_samples: int  # images generated per step count
    seed: int = 0  # initial noise of sample i comes from seed + i
    conditioning: str = "labels"  # "labels" (balanced class labels) or "captions"
    num_classes: int | None = None  # labels are i % num_classes (None: the model's)
    image_size: int | None = None  # scoring resolution (None: as generated)
    feature_extractor: str = DIGITS_EXTRACTOR
    reference: str | None = None  # "digits", or None: must be given (--reference)
    metrics: tuple[str, ...] = ("fid", "kid", "class_acc", "diversity")
    kid_subset_size: int = 1000  # clamped to the sample counts
    kid_subsets: int = 100
    prc_neighborhood: int = 3
    caption_prefix: str = ""  # prepended to captions for CLIP score only
    diversity_groups: int = 10  # conditions used for diversity (labels or captions)
    diversity_per_group: int = 8  # samples per condition (captions: extra generation)
    bootstrap: int = 200  # resamples of the generated set for the panel's intervals
    note: str = ""

    def with_overrides(self, **kw: Any) -> Protocol:
        """A copy with the non-None keyword arguments replaced (e.g. a smaller --num-samples)."""
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise InputError(f"protocol {self.name!r}: unknown field(s) {sorted(unknown)}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        return d


PROTOCOLS: dict[str, Protocol] = {
    "digits": Protocol(
        name="digits",
        num_samples=2000,
        seed=0,
        conditioning="labels",
        num_classes=10,
        image_size=32,
        feature_extractor=DIGITS_EXTRACTOR,
        reference="digits",
        metrics=("fid", "kid", "prc", "class_acc", "diversity", "panel"),
        diversity_per_group=200,
        note="embedded default: labels i % 10, judge penultimate features, all 1,797 real digits; "
        "the judge panel (fewstep.digits.panel) with bootstrap intervals and the real-vs-real floor",
    ),
    "restoration": Protocol(
        name="restoration",
        num_samples=359,
        seed=0,
        conditioning="degraded",
        image_size=32,
        feature_extractor=DIGITS_EXTRACTOR,
        reference="digits",
        metrics=("psnr", "ssim", "judge_dist", "class_acc", "fid"),
        note="held-out digits per degradation; outputs paired with targets (fewstep.evaluation.restoration)",
    ),
    "coco2014-30k": Protocol(
        name="coco2014-30k",
        num_samples=30000,
        seed=0,
        conditioning="captions",
        image_size=256,
        feature_extractor=INCEPTION_EXTRACTOR,
        reference=None,
        metrics=("fid", "clip"),
        note="SD1.5 practice (DMD2): 30k COCO-2014 val captions, FID at 256 against val2014",
    ),
    "coco-10k": Protocol(
        name="coco-10k",
        num_samples=10000,
        seed=0,
        conditioning="captions",
        image_size=512,
        feature_extractor=INCEPTION_EXTRACTOR,
        reference=None,
        metrics=("fid", "clip"),
        note="SDXL practice (DMD2): 10k COCO captions, FID at 512",
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise InputError(f"--protocol {name!r} is unknown; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def load_captions(path: str | Path) -> list[str]:
    """Captions from a COCO annotation JSON (`captions_val2014.json`: the first caption of each
    image, ordered by image id, as the DMD2 / GigaGAN evaluations take one caption per image) or
    from a text file with one caption a line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"captions file {p} does not exist (--captions)")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"captions file {p} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or "annotations" not in data:
            raise InputError(f"captions file {p}: expected a COCO annotation JSON with an 'annotations' list")
        first: dict[int, str] = {}
        for a in data["annotations"]:
            try:
                first.setdefault(int(a["image_id"]), str(a["caption"]).strip())
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"captions file {p}: annotation {a!r} lacks image_id/caption") from e
        caps = [first[k] for k in sorted(first)]
    else:
        caps = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not caps:
        raise InputError(f"captions file {p} holds no captions")
    return caps


def select_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """n captions chosen by a seeded permutation (all of them, in file order, when n equals the
    count); repeated cyclically when the file holds fewer than n."""
    import torch

    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    if n == len(captions):
        return list(captions)
    perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    return [captions[perm[i % len(perm)]] for i in range(n)]
