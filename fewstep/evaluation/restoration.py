"""The `restoration` protocol: restored held-out digits scored against their targets.

    scores = restoration_scores(outputs, targets, labels)
    # {"psnr", "ssim", "judge_dist", "class_acc", "fid", "n"}

- psnr, ssim: torchmetrics, on images in [0, 1] rounded to 8 bits as a saved image would be;
  PSNR is the mean of per-image PSNR (data range 1), SSIM the mean SSIM (Gaussian window 11).
- judge_dist: mean Euclidean distance between the digits judge's penultimate features of the
  output and of its target.
- class_acc: share of outputs the judge reads as the source digit's label.
- fid: FID of the outputs against all 1,797 real digits in the judge's features (the project's
  digits FID; with 359 held-out images it is biased upward, so compare rows at equal n only;
  the "clean targets (floor)" row is the FID of the held-out targets themselves).

`evaluate_restoration(spec)` (what `fewstep eval --protocol restoration` runs) restores the held-out
set of each degradation (`fewstep.digits.restoration`) at each step count and writes results.json
and results.md, with the baselines (bicubic x4 for sr4; the degraded input itself for noise and
blur) scored the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .inputs import InputError, atomic_write_json, atomic_write_text

__all__ = ["check_sizes", "restoration_scores", "evaluate_restoration", "RESTORATION_METRICS"]

RESTORATION_METRICS = ("psnr", "ssim", "judge_dist", "class_acc", "fid")


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
    outputs: Tensor, targets: Tensor, labels: Tensor, metrics: tuple[str, ...] = RESTORATION_METRICS
) -> dict[str, Any]:
    """Scores of restored images (N, 1, H, W) in [-1, 1] against targets of the same shape."""
    check_sizes(outputs, targets)
    if labels.shape[0] != outputs.shape[0]:
        raise InputError(f"restoration: {outputs.shape[0]} images but {labels.shape[0]} labels")
    bad = sorted(set(metrics) - set(RESTORATION_METRICS))
    if bad:
        raise InputError(f"restoration metrics {bad} are unknown; choose from {list(RESTORATION_METRICS)}")
    out: dict[str, Any] = {"n": int(outputs.shape[0])}
    o, t = _unit(outputs), _unit(targets)
    if "psnr" in metrics or "ssim" in metrics:
        try:
            from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
        except ImportError as e:  # pragma: no cover - a dependency
            raise InputError(f"restoration metrics need torchmetrics (pip install torchmetrics): {e}") from None
        if "psnr" in metrics:
            out["psnr"] = float(
                peak_signal_noise_ratio(o, t, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
            )
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
    return out


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# restoration: {results['source']}",
        "",
        "| degradation | what | steps | PSNR | SSIM | judge dist | class acc | FID | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:

        def f(k, fmt="{:.3f}", row=row):
            v = row.get(k)
            return "-" if v is None else fmt.format(v)

        lines.append(
            f"| {row['degradation']} | {row['what']} | {row.get('steps', '-')} | {f('psnr', '{:.2f}')} | "
            f"{f('ssim')} | {f('judge_dist')} | {f('class_acc')} | {f('fid', '{:.2f}')} | {row['n']} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_restoration(spec) -> dict[str, Any]:
    """`fewstep eval --protocol restoration`: spec.pipeline is "digits-restore", a restoration
    pipeline folder or a run dir; spec.steps the step counts; spec.num_samples limits the
    held-out images per degradation (default all 359); spec.metrics a subset of
    RESTORATION_METRICS. --images is refused (outputs are paired with their inputs)."""
    from ..digits.restoration import DEGRADATIONS, bicubic_baseline, restoration_pairs
    from ..restoration import load_restorer, restore

    if spec.images is not None or spec.pipeline is None:
        raise InputError("--protocol restoration restores the held-out set itself: give --pipeline, not --images")
    metrics = tuple(spec.metrics) if spec.metrics else RESTORATION_METRICS
    bad = sorted(set(metrics) - set(RESTORATION_METRICS))
    if bad:
        raise InputError(f"--metrics {bad}: the restoration protocol scores {list(RESTORATION_METRICS)}")
    try:
        model = load_restorer(spec.pipeline, weights=spec.student_weights, device=spec.device)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    seed = 0 if spec.seed is None else int(spec.seed)
    rows = []
    # the floor: the clean held-out targets themselves (FID of a few hundred real digits is not 0)
    clean = restoration_pairs("sr4", "heldout", limit=spec.num_samples)
    floor_metrics = tuple(m for m in metrics if m in ("class_acc", "fid"))
    if floor_metrics:
        rows.append(
            {
                "degradation": "-",
                "what": "clean targets (floor)",
                **restoration_scores(clean.target, clean.target, clean.labels, floor_metrics),
            }
        )
    for kind in DEGRADATIONS:
        pairs = restoration_pairs(kind, "heldout", limit=spec.num_samples)
        base = bicubic_baseline(pairs.degraded) if kind == "sr4" else pairs.condition.clamp(-1, 1)
        what = "bicubic x4" if kind == "sr4" else "degraded input"
        rows.append(
            {"degradation": kind, "what": what, **restoration_scores(base, pairs.target, pairs.labels, metrics)}
        )
        for steps in spec.steps:
            t0 = time.time()
            g = torch.Generator().manual_seed(seed)
            out = restore(model, pairs.condition.to(spec.device), steps, generator=g, batch_size=spec.batch_size)
            check_sizes(out, pairs.target)
            scores = restoration_scores(out.cpu(), pairs.target, pairs.labels, metrics)
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
    results = {
        "protocol": "restoration",
        "source": spec.pipeline,
        "sampling": {"renoise": model.renoise, "times": {str(k): model.sampling_times(k) for k in spec.steps}},
        "seed": seed,
        "metrics": list(metrics),
        "split": "held-out: fewstep.digits.data.split_indices(1797, 0.2, seed 0)",
        "command": spec.command,
        "rows": rows,
    }
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", _markdown(results))
    return results
