"""The `restoration` protocol: restored held-out digits scored against their targets.

    scores = restoration_scores(outputs, targets, labels)
    # {"psnr", "psnr_ci", "ssim", "judge_dist", "class_acc", "fid", "n"}
    verdicts = restoration_verdicts(rows)  # each student row against the teacher's, claims rule

- psnr, ssim: torchmetrics, on images in [0, 1] rounded to 8 bits as a saved image would be;
  PSNR is the mean of per-image PSNR (data range 1), SSIM the mean SSIM (Gaussian window 11).
- psnr_ci: 95% bootstrap interval of that mean: `bootstrap` resamples of the images (with
  replacement, same count, generator seeded with `seed`), 2.5 and 97.5 percentiles.
- judge_dist: mean Euclidean distance between the digits judge's penultimate features of the
  output and of its target.
- class_acc: share of outputs the judge reads as the source digit's label.
- fid: FID of the outputs against all 1,797 real digits in the judge's features (the project's
  digits FID; with 359 held-out images it is biased upward, so compare rows at equal n only;
  the "clean targets (floor)" row is the FID of the held-out targets themselves).
- panel (asked for by name; not in RESTORATION_METRICS): the judge panel's scores of the outputs
  with their source labels (`fewstep.evaluation.panel.panel_scores`): every member's FID with its
  bootstrap interval, class accuracy, the panel median, the real-vs-real floor.

Verdicts (`restoration_verdicts`): on each degradation, each student row, and each teacher row at
fewer steps than the teacher's largest step count, against the teacher's row at that largest
count. PSNR (higher is better): "beats" when the row's psnr_ci lies wholly above the teacher's,
"trails" when wholly below, else "within noise". FID and class accuracy (rows scored with
`panel`): `panel.compare`, the project's claims rule (every member agrees, intervals separate).

`evaluate_restoration(spec)` (what `fewstep eval --protocol restoration` runs) restores the held-out
set of each degradation (`fewstep.digits.restoration`) at each step count and writes results.json
and results.md, with the baselines (bicubic x4 for sr4; the degraded input itself for noise and
blur) scored the same way, and the verdicts among its own rows (a teacher's fewer step counts
against its largest; eval/restoration_bench.py sets students against the teacher).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .inputs import InputError, atomic_write_json, atomic_write_text

__all__ = [
    "check_sizes",
    "restoration_scores",
    "restoration_verdicts",
    "verdicts_markdown",
    "evaluate_restoration",
    "RESTORATION_METRICS",
    "OPTIONAL_METRICS",
]

RESTORATION_METRICS = ("psnr", "ssim", "judge_dist", "class_acc", "fid")
OPTIONAL_METRICS = ("panel",)  # by name only: five networks and their bootstrap per row
_KNOWN = RESTORATION_METRICS + OPTIONAL_METRICS


def check_sizes(outputs: Tensor, targets: Tensor, what: str = "restoration") -> None:
    """A clear error when outputs and targets do not pair up image for image."""
    for name, x in (("outputs", outputs), ("targets", targets)):
        if not torch.is_tensor(x) or x.dim() != 4:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise InputError(f"{what}: {name} must be a (N, C, H, W) image tensor, got {got}")
    if tuple(outputs.shape) != tuple(targets.shape):
        raise InputError(
            f"{what}: restored images have shape {tuple(outputs.shape)} but their targets "
            f"{tuple(targets.shape)}; input and target sizes must match (N, C, H, W)"
        )


def _unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], rounded to 8 bits."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round() / 255.0


@torch.no_grad()
def restoration_scores(
    outputs: Tensor,
    targets: Tensor,
    labels: Tensor,
    metrics: Sequence[str] = RESTORATION_METRICS,
    bootstrap: int = 200,
    seed: int = 0,
    panel_members: Sequence[str] | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Scores of restored images against their targets.

    Args:
        outputs: restored images (N, 1, H, W) in [-1, 1].
        targets: clean images of the same shape.
        labels: (N,) the source digits' labels (class accuracy, the panel).
        metrics: a subset of RESTORATION_METRICS + OPTIONAL_METRICS.
        bootstrap: resamples of the images for psnr_ci and the panel's intervals (0: none).
        seed: seed of the resample indices.
        panel_members: the panel's extractor names (default: the whole panel).
        cache: keep the panel's reference features on disk.
    """
    check_sizes(outputs, targets)
    n = int(outputs.shape[0])
    if labels.shape[0] != n:
        raise InputError(f"restoration: {n} images but {labels.shape[0]} labels")
    bad = sorted(set(metrics) - set(_KNOWN))
    if bad:
        raise InputError(f"restoration metrics {bad} are unknown; choose from {list(_KNOWN)}")
    if int(bootstrap) < 0:
        raise InputError(f"restoration: bootstrap must be >= 0 resamples (0: no intervals), got {bootstrap}")
    if "panel" in metrics and n < 4:
        raise InputError(f"restoration: metric 'panel' needs at least 4 images per row (FID covariances), got {n}")
    out: dict[str, Any] = {"n": n}
    o, t = _unit(outputs), _unit(targets)
    if "psnr" in metrics or "ssim" in metrics:
        try:
            from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
        except ImportError as e:  # pragma: no cover - a dependency
            raise InputError(f"restoration metrics need torchmetrics (pip install torchmetrics): {e}") from None
        if "psnr" in metrics:
            per_image = peak_signal_noise_ratio(o, t, data_range=1.0, dim=(1, 2, 3), reduction="none")
            out["psnr"] = float(per_image.mean())  # what reduction="elementwise_mean" returns
            if bootstrap:
                from .panel import mean_ci

                out["psnr_ci"] = mean_ci(per_image, int(bootstrap), seed)
        if "ssim" in metrics:
            out["ssim"] = float(structural_similarity_index_measure(o, t, data_range=1.0))
    if "judge_dist" in metrics or "class_acc" in metrics:
        from .digits import _judge

        judge = _judge(None)
        fo, lo = judge.features_and_logits(o * 2 - 1)
        ft, _ = judge.features_and_logits(t * 2 - 1)
        if "judge_dist" in metrics:
            out["judge_dist"] = float((fo - ft).norm(dim=1).mean())
        if "class_acc" in metrics:
            out["class_acc"] = float((lo.argmax(1) == labels.cpu().long()).float().mean())
    if "fid" in metrics:
        from .digits import digits_scores

        out["fid"] = float(digits_scores(o * 2 - 1, None)["fid"])
    if "panel" in metrics:
        from ..digits.data import to_uint8_rgb
        from .panel import panel_scores

        # panel_scores keeps its bootstrap samples private; `compare` reads only the public
        # intervals, so the result is JSON as it stands
        out["panel"] = panel_scores(
            to_uint8_rgb(outputs.detach().float().cpu()),
            labels,
            bootstrap=int(bootstrap),
            seed=seed,
            members=panel_members,
            cache=cache,
        )
    return out


def restoration_verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each student row, and each teacher row at fewer steps than the teacher's largest step
    count, against the teacher's row at that largest count on the same degradation.

    A row is named by its "model" key where it has one (the benchmark's preset name), else by
    "what". Returns one dict per compared row: degradation, model, steps, teacher_steps, and where
    both rows have the scores: psnr_diff_db (row minus teacher), psnr (the verdict from the two
    psnr_ci), and from `panel.compare` on the two `panel` results: fid and class_acc verdicts,
    fid_ratio_median and fid_ratio_range (row FID over teacher FID, per member)."""
    from .panel import _side, compare, verdict

    verdicts = []
    for kind in dict.fromkeys(r["degradation"] for r in rows):
        group = [r for r in rows if r["degradation"] == kind]
        teachers = [r for r in group if r["what"] == "teacher" and r.get("steps") is not None]
        if not teachers:
            continue
        ref = max(teachers, key=lambda r: r["steps"])
        for r in group:
            fewer = r["what"] == "teacher" and r.get("steps") is not None and r["steps"] < ref["steps"]
            if not (r["what"] == "student" or fewer):
                continue
            v: dict[str, Any] = {
                "degradation": kind,
                "model": r.get("model", r["what"]),
                "steps": r.get("steps"),
                "teacher": ref.get("model", "teacher"),
                "teacher_steps": ref["steps"],
            }
            if "psnr" in r and "psnr" in ref:
                v["psnr_diff_db"] = r["psnr"] - ref["psnr"]
            if "psnr_ci" in r and "psnr_ci" in ref:
                v["psnr"] = verdict([_side(r["psnr_ci"], ref["psnr_ci"])], +1)  # higher is better
            if "panel" in r and "panel" in ref and r["panel"]["bootstrap"] and ref["panel"]["bootstrap"]:
                c = compare(r["panel"], ref["panel"])
                v.update(
                    fid=c["fid"],
                    class_acc=c["class_acc"],
                    fid_ratio_median=c["fid_ratio_median"],
                    fid_ratio_range=c["fid_ratio_range"],
                )
            verdicts.append(v)
    return verdicts


def verdicts_markdown(verdicts: Sequence[dict[str, Any]]) -> str:
    """The verdicts as a markdown list, with the rules they follow ("" when there are none)."""
    from .panel import CLAIMS_RULE

    if not verdicts:
        return ""
    lines = []
    for v in verdicts:
        parts = []
        if "psnr" in v:
            parts.append(f"PSNR {v['psnr']} ({v['psnr_diff_db']:+.2f} dB)")
        elif "psnr_diff_db" in v:
            parts.append(f"PSNR {v['psnr_diff_db']:+.2f} dB (no intervals)")
        if "fid" in v:
            lo, hi = v["fid_ratio_range"]
            parts.append(
                f"FID {v['fid']} (FID over the teacher's: median {v['fid_ratio_median']:.2f}x, "
                f"range {lo:.2f}-{hi:.2f}x)"
            )
            parts.append(f"class acc {v['class_acc']}")
        lines.append(
            f"- {v['degradation']}: {v['model']} at {v['steps']} step{'s' if v['steps'] != 1 else ''} against the "
            f"{v['teacher']} at {v['teacher_steps']}: " + ("; ".join(parts) or "no shared scores")
        )
    lines += [
        "",
        "PSNR: beats / trails only when the 95% bootstrap intervals of the two means do not overlap. "
        f"FID and class accuracy (the judge panel): {CLAIMS_RULE}.",
    ]
    return "\n".join(lines) + "\n"


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# restoration: {results['source']}",
        "",
        "| degradation | what | steps | PSNR | PSNR 95% CI | SSIM | judge dist | class acc | FID "
        "| panel FID median [range] | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:

        def f(k, fmt="{:.3f}", row=row):
            v = row.get(k)
            return "-" if v is None else fmt.format(v)

        ci = f"{row['psnr_ci'][0]:.2f}-{row['psnr_ci'][1]:.2f}" if "psnr_ci" in row else "-"
        p = row.get("panel", {}).get("panel", {})
        pan = f"{p['fid_median']:.2f} [{p['fid_range'][0]:.2f}, {p['fid_range'][1]:.2f}]" if p else "-"
        lines.append(
            f"| {row['degradation']} | {row['what']} | {row.get('steps', '-')} | {f('psnr', '{:.2f}')} | {ci} | "
            f"{f('ssim')} | {f('judge_dist')} | {f('class_acc')} | {f('fid', '{:.2f}')} | {pan} | {row['n']} |"
        )
    text = verdicts_markdown(results.get("verdicts") or [])
    if text:
        lines += ["", "Verdicts (claims rule):", "", text.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _scored_rows(model, spec, metrics: tuple[str, ...], scoring: dict[str, Any]) -> list[dict[str, Any]]:
    """The protocol's rows: the clean targets (the floor), then per degradation its baseline and the
    model at each of spec.steps, each scored by `restoration_scores`."""
    from ..digits.restoration import DEGRADATIONS, bicubic_baseline, restoration_pairs
    from ..restoration import restore

    seed = scoring["seed"]
    rows = []
    # the floor: the clean held-out targets themselves (FID of a few hundred real digits is not 0)
    clean = restoration_pairs("sr4", "heldout", limit=spec.num_samples)
    floor_metrics = tuple(m for m in metrics if m in ("class_acc", "fid", "panel"))
    if floor_metrics:
        rows.append(
            {
                "degradation": "-",
                "what": "clean targets (floor)",
                **restoration_scores(clean.target, clean.target, clean.labels, floor_metrics, **scoring),
            }
        )
    for kind in DEGRADATIONS:
        pairs = restoration_pairs(kind, "heldout", limit=spec.num_samples)
        base = bicubic_baseline(pairs.degraded) if kind == "sr4" else pairs.condition.clamp(-1, 1)
        what = "bicubic x4" if kind == "sr4" else "degraded input"
        rows.append(
            {
                "degradation": kind,
                "what": what,
                **restoration_scores(base, pairs.target, pairs.labels, metrics, **scoring),
            }
        )
        for steps in spec.steps:
            t0 = time.time()
            g = torch.Generator().manual_seed(seed)
            out = restore(model, pairs.condition.to(spec.device), steps, generator=g, batch_size=spec.batch_size)
            check_sizes(out, pairs.target)
            scores = restoration_scores(out.cpu(), pairs.target, pairs.labels, metrics, **scoring)
            rows.append(
                {
                    "degradation": kind,
                    "what": "student" if model.is_student else "teacher",
                    "steps": steps,
                    "nfe": steps,
                    "seconds": round(time.time() - t0, 2),
                    **scores,
                }
            )
    return rows


def evaluate_restoration(spec) -> dict[str, Any]:
    """`fewstep eval --protocol restoration`: spec.pipeline is "digits-restore", a restoration
    pipeline folder or a run dir; spec.steps the step counts; spec.num_samples limits the
    held-out images per degradation (default all 359); spec.metrics a subset of
    RESTORATION_METRICS and "panel"; spec.bootstrap the resamples for the intervals (default the
    protocol's, 200; 0: none); spec.seed seeds the sampling and the resamples. --images is refused
    (outputs are paired with their inputs)."""
    from ..restoration import load_restorer
    from .protocols import PROTOCOLS

    if spec.images is not None or spec.pipeline is None:
        raise InputError("--protocol restoration restores the held-out set itself: give --pipeline, not --images")
    metrics = tuple(spec.metrics) if spec.metrics else RESTORATION_METRICS
    bad = sorted(set(metrics) - set(_KNOWN))
    if bad:
        raise InputError(f"--metrics {bad}: the restoration protocol scores {list(_KNOWN)}")
    bootstrap = PROTOCOLS["restoration"].bootstrap if spec.bootstrap is None else int(spec.bootstrap)
    if "panel" in metrics and spec.num_samples is not None and spec.num_samples < 4:
        raise InputError(f"--metrics panel needs --num-samples >= 4 (FID covariances), got {spec.num_samples}")
    try:
        model = load_restorer(spec.pipeline, weights=spec.student_weights, device=spec.device)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    seed = 0 if spec.seed is None else int(spec.seed)
    scoring = {"bootstrap": bootstrap, "seed": seed, "cache": spec.cache}
    rows = _scored_rows(model, spec, metrics, scoring)
    results = {
        "protocol": "restoration",
        "source": spec.pipeline,
        "sampling": {"renoise": model.renoise, "times": {str(k): model.sampling_times(k) for k in spec.steps}},
        "seed": seed,
        "bootstrap": bootstrap,
        "metrics": list(metrics),
        "split": "held-out: fewstep.digits.data.split_indices(1797, 0.2, seed 0)",
        "command": spec.command,
        "rows": rows,
        "verdicts": restoration_verdicts(rows),
    }
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", _markdown(results))
    return results
