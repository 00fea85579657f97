"""Panel scores for the digits: every member's FID, precision / recall and within-class diversity,
each judge's class accuracy, bootstrap intervals (resampling the generated set), the real-vs-real
floor at the same sample count computed the same way, and the claims rule.

    scores = panel_scores(u8_images, labels)            # one generated set
    verdict = compare(student_scores, teacher_scores)  # "beats" / "trails" / "within noise"

Definitions (all numbers from torch-fidelity's FID / precision-recall functions on each member's
features against all 1,797 real digits):
- bootstrap interval: the 2.5 and 97.5 percentiles over `bootstrap` resamples (with replacement,
  same size) of the generated set, shifted by the bootstrap's bias (mean of the resampled values
  minus the estimate: repeated samples inflate FID) so that it is centred on the estimate; the
  same resample indices serve every member, so the panel median has an interval too.
- floor: the same statistic for n real digits drawn with replacement from the 1,797 (n = the
  generated count), against all of them, over as many draws as the bootstrap: median and 95%
  range. It stands for a generator of real digits at this n (its draws repeat digits, as a
  bootstrap resample does, and come from the reference itself).
- diversity: within-class Vendi score (cosine kernel) and mean pairwise feature distance, averaged
  over the classes, in each member's features.
- the panel median and range are over the judges (the pixel-PCA distance is in other units and
  is shown beside it); the claims rule asks every member, pixel-PCA included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .diversity import diversity
from .inputs import InputError, TensorImages
from .scores import Extractor, fidelity_from_features

__all__ = ["CLAIMS_RULE", "compare", "comparison", "fid_of", "mean_ci", "panel_scores", "panel_table", "verdict_text"]

CLAIMS_RULE = (
    "a student beats (or trails) a teacher only when every panel member, pixel-PCA included, "
    "agrees and each member's 95% bootstrap intervals of the two do not overlap; otherwise the "
    "difference is within noise"
)


def fid_of(features: Tensor, ref_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """torch-fidelity's FID of (n, D) features against (mu, sigma)."""
    from torch_fidelity.metric_fid import (
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    s = fid_features_to_statistics(features)
    return float(
        fid_statistics_to_metric(s, {"mu": ref_stats[0], "sigma": ref_stats[1]}, False)["frechet_inception_distance"]
    )


def _ref_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    s = fid_features_to_statistics(features)
    return s["mu"], s["sigma"]


def _ci(values: Sequence[float], point: float | None = None) -> list[float]:
    """95% percentile interval of bootstrap values; with `point`, shifted by the bootstrap's bias
    (mean of the values minus `point`) so that it is centred on the estimate: resampling with
    replacement repeats samples, which inflates FID by about the same amount in every resample."""
    v = np.asarray(values, dtype=np.float64)
    shift = float(v.mean() - point) if point is not None else 0.0
    return [float(np.percentile(v, 2.5)) - shift, float(np.percentile(v, 97.5)) - shift]


def mean_ci(values: Tensor, bootstrap: int, seed: int) -> list[float]:
    """95% bootstrap interval of the mean of per-sample values (resampling the samples).

    `_ci` without its bias shift: a resampled mean is unbiased, whereas resampling inflates FID."""
    v = values.detach().double().cpu().reshape(-1)
    g = torch.Generator().manual_seed(int(seed))
    means = v[torch.randint(0, v.shape[0], (bootstrap, v.shape[0]), generator=g)].mean(1).numpy()
    if np.isfinite(means).all():
        return _ci(means)
    # an output equal to its target has infinite PSNR: take order statistics (interpolating
    # between a finite mean and inf gives nan)
    return [float(np.percentile(means, 2.5, method="lower")), float(np.percentile(means, 97.5, method="higher"))]


def panel_scores(
    images: Tensor,
    labels: Tensor | None,
    bootstrap: int = 200,
    seed: int = 0,
    members: Sequence[str] | None = None,
    prc: bool = True,
    cache: bool = True,
) -> dict[str, Any]:
    """Every panel member's scores of uint8 (N, 3, 32, 32) images with their requested labels.

    Args:
        images: the generated set, uint8 (N, 3, H, W).
        labels: (N,) requested classes (class accuracy, within-class diversity), or None.
        bootstrap: resamples for the intervals (0: none).
        seed: seed of the resample indices (generated set and floor).
        members: extractor names (default: the whole panel, `fewstep.digits.panel.panel_members()`).
    """
    from ..digits.panel import PIXEL_PCA, panel_members
    from .digits import digits_reference

    if not (torch.is_tensor(images) and images.dtype == torch.uint8):
        raise InputError("panel_scores: expected uint8 (N, 3, H, W) images")
    n = int(images.shape[0])
    if n < 4:
        raise InputError(f"panel_scores: needs at least 4 images, got {n}")
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if labels.shape[0] != n:
            raise InputError(f"panel_scores: {n} images but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(int(seed))
    gen_idx = torch.randint(0, n, (bootstrap, n), generator=g)
    out_members = []
    for name in members or panel_members():
        judge = name != PIXEL_PCA
        ext = Extractor(name, extra_layers=("logits",) if judge else ()).check()
        layer = ext.layer("fid")
        feats = ext.features(TensorImages(images))
        ref = digits_reference(ext, use_cache=cache)
        vals = fidelity_from_features(feats, ref, ext, fid=True, prc=prc)
        f, rf = feats[layer].double(), ref.features[layer].double()
        stats = _ref_stats(rf)
        floor_idx = torch.randint(0, rf.shape[0], (max(bootstrap, 1), n), generator=g)
        floor = [fid_of(rf[i], stats) for i in floor_idx]
        m: dict[str, Any] = {
            "name": name,
            "kind": "judge" if judge else "pixel-pca",
            "layer": layer,
            "weights_sha256": ext.weights_sha256,
            "fid": vals["fid"],
            "floor_fid": float(np.median(floor)),
            "floor_ci": _ci(floor),
        }
        if bootstrap:
            boot = [fid_of(f[i], stats) for i in gen_idx]
            m["fid_ci"], m["_boot"] = _ci(boot, vals["fid"]), boot
        if prc:
            m.update(precision=vals["precision"], recall=vals["recall"])
        if labels is not None:
            d = diversity(feats[layer], labels.tolist())
            m.update(vendi=d["vendi"], diversity=d["diversity"])
            if judge:
                hit = (feats["logits"].argmax(1) == labels).double()
                m["class_acc"] = float(hit.mean())
                if bootstrap:
                    acc_b = [float(hit[i].mean()) for i in gen_idx]
                    m["class_acc_ci"], m["_boot_acc"] = _ci(acc_b, m["class_acc"]), acc_b
        out_members.append(m)
    return {
        "n": n,
        "bootstrap": bootstrap,
        "seed": int(seed),
        "members": _public(out_members),
        "panel": _summary(out_members, bootstrap),
    }


def _public(members: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in members]


def _summary(members: list[dict], bootstrap: int) -> dict[str, Any]:
    judges = [m for m in members if m["kind"] == "judge"]
    if not judges:
        return {}
    fids = [m["fid"] for m in judges]
    s: dict[str, Any] = {
        "judges": len(judges),
        "fid_median": float(np.median(fids)),
        "fid_range": [float(min(fids)), float(max(fids))],
        "floor_fid_median": float(np.median([m["floor_fid"] for m in judges])),
    }
    if bootstrap:
        s["fid_median_ci"] = _ci(np.median(np.array([m["_boot"] for m in judges]), axis=0), s["fid_median"])
    for key in ("class_acc", "precision", "recall", "vendi"):
        if all(key in m for m in judges):
            v = [m[key] for m in judges]
            s[f"{key}_median"], s[f"{key}_range"] = float(np.median(v)), [float(min(v)), float(max(v))]
    if bootstrap and all("_boot_acc" in m for m in judges):
        s["class_acc_median_ci"] = _ci(
            np.median(np.array([m["_boot_acc"] for m in judges]), axis=0), s["class_acc_median"]
        )
    return s


# ----------------------------------------------------------------------------------------------
def _side(a: list[float], b: list[float]) -> int:
    """-1 when interval a lies wholly below b, +1 wholly above, 0 when they overlap."""
    if a[1] < b[0]:
        return -1
    if a[0] > b[1]:
        return 1
    return 0


def verdict(sides: Sequence[int], better: int) -> str:
    """The claims rule on interval sides (`_side` of each comparison): "beats" when every side is
    `better` (-1: lower is better, +1: higher), "trails" when every side is the opposite, else
    "within noise"."""
    if sides and all(s == better for s in sides):
        return "beats"
    if sides and all(s == -better for s in sides):
        return "trails"
    return "within noise"


def compare(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """The claims rule on two `panel_scores` results (same members, bootstrap on).

    Returns {"fid": verdict, "class_acc": verdict, "members": {name: {"fid_ratio", "fid_side",
    "class_acc_side"}}, "fid_ratio_median", "fid_ratio_range"}; a verdict is "beats", "trails" or
    "within noise". Lower FID and higher class accuracy are better."""
    t_by = {m["name"]: m for m in teacher["members"]}
    per: dict[str, dict[str, Any]] = {}
    fid_sides, acc_sides, ratios = [], [], []
    for m in student["members"]:
        t = t_by.get(m["name"])
        if t is None or "fid_ci" not in m or "fid_ci" not in t:
            raise InputError(f"compare: member {m['name']!r} lacks a bootstrap interval on one side")
        r = {
            "fid_ratio": m["fid"] / t["fid"] if t["fid"] else float("nan"),
            "fid_side": _side(m["fid_ci"], t["fid_ci"]),
        }
        fid_sides.append(r["fid_side"])
        ratios.append(r["fid_ratio"])
        if "class_acc_ci" in m and "class_acc_ci" in t:
            r["class_acc_side"] = _side(m["class_acc_ci"], t["class_acc_ci"])
            acc_sides.append(r["class_acc_side"])
        per[m["name"]] = r

    return {
        "fid": verdict(fid_sides, -1),
        "class_acc": verdict(acc_sides, +1),
        "members": per,
        "fid_ratio_median": float(np.median(ratios)),
        "fid_ratio_range": [float(min(ratios)), float(max(ratios))],
        "rule": CLAIMS_RULE,
    }


# ----------------------------------------------------------------------------------------------
def _short(name: str) -> str:
    from ..digits.judge import JUDGE_NAME

    return {JUDGE_NAME: "judge"}.get(name, name.removeprefix(JUDGE_NAME + "-").removeprefix("fewstep-digits-"))


def panel_table(rows: Sequence[tuple[str, dict[str, Any]]], seeds: dict[str, list[dict]] | None = None) -> str:
    """Markdown: one line per (label, panel_scores): every member's FID with its interval, the
    judges' median [range], the median's interval, seed spread (if `seeds` gives other seeds'
    results for the label), class accuracy, precision / recall / Vendi medians, and the floor."""
    if not rows:
        return ""
    names = [m["name"] for m in rows[0][1]["members"]]
    head = [
        "model",
        *(f"FID {_short(n)}" for n in names),
        "FID median [range]",
        "median 95% CI",
        "seed spread",
        "class acc median [range]",
        "precision / recall / Vendi (median)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, sc in rows:
        by = {m["name"]: m for m in sc["members"]}
        p = sc["panel"]
        cells = [label]
        for n in names:
            m = by[n]
            ci = m.get("fid_ci")
            cells.append(f"{m['fid']:.2f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else ""))
        cells.append(f"{p['fid_median']:.2f} [{p['fid_range'][0]:.2f}, {p['fid_range'][1]:.2f}]")
        ci = p.get("fid_median_ci")
        cells.append(f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-")
        other = (seeds or {}).get(label) or []
        if other:
            meds = [s["panel"]["fid_median"] for s in other]
            cells.append(f"{min(meds):.2f}-{max(meds):.2f} ({len(meds)} seeds)")
        else:
            cells.append("-")
        if "class_acc_median" in p:
            r = p["class_acc_range"]
            cells.append(f"{100 * p['class_acc_median']:.1f}% [{100 * r[0]:.1f}, {100 * r[1]:.1f}]")
        else:
            cells.append("-")
        cells.append(
            " / ".join(f"{p[k]:.3f}" if k in p else "-" for k in ("precision_median", "recall_median"))
            + (f" / {p['vendi_median']:.2f}" if "vendi_median" in p else "")
        )
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0][1]
    floor = [
        f"{_short(m['name'])} {m['floor_fid']:.2f} ({m['floor_ci'][0]:.1f}-{m['floor_ci'][1]:.1f})"
        for m in first["members"]
    ]
    lines += [
        "",
        f"Real-vs-real floor at n = {first['n']} (real digits resampled with replacement against all "
        f"1,797, {max(first['bootstrap'], 1)} draws; median and 95% range): " + ", ".join(floor) + ".",
        f"Intervals: 95% bootstrap over {first['bootstrap']} resamples of the generated set.",
    ]
    return "\n".join(lines) + "\n"


_PHRASE = {"beats": "beats", "trails": "trails", "within noise": "is within noise of (no claim)"}


def verdict_text(student_label: str, teacher_label: str, verdict: dict[str, Any]) -> str:
    """The conclusion under the claims rule, with the FID ratios of every member."""
    ratios = ", ".join(f"{_short(k)} {v['fid_ratio']:.2f}x" for k, v in verdict["members"].items())
    lo, hi = verdict["fid_ratio_range"]
    return (
        f"Conclusion (claims rule: {verdict['rule']}): by FID the {student_label} {_PHRASE[verdict['fid']]} "
        f"the {teacher_label}; by class accuracy it {_PHRASE[verdict['class_acc']]} it. "
        f"Student/teacher FID per member: {ratios} (median {verdict['fid_ratio_median']:.2f}x, "
        f"range {lo:.2f}-{hi:.2f}x)."
    )


def comparison(
    student_label: str,
    student: dict[str, Any],
    teacher_label: str,
    teacher: dict[str, Any],
    seeds: dict[str, list[dict]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(markdown table + conclusion, the `compare` verdict) for a student against its teacher."""
    verdict = compare(student, teacher)
    text = panel_table([(student_label, student), (teacher_label, teacher)], seeds)
    return text + "\n" + verdict_text(student_label, teacher_label, verdict) + "\n", verdict


def compare_training_seeds(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Two methods over paired training seeds, each scored by `eval/panel.py` over the same
    evaluation seeds: a[i] and b[i] are the `panel.json` records of training seed i.

    Every (training seed, evaluation seed) pair gets the claims rule (`compare`, a against b), and
    every member of every pair is counted where a's FID is the lower. Per member, the mean FID over
    all pairs of each side and their ratio (a / b). Returns {"pairs": [{"training" (the pair's
    index), "seed" (the evaluation seed), "fid_ratio_median", "fid" and "class_acc" (the verdicts),
    "a_median", "b_median", "members_lower", "a_class_acc", "b_class_acc"}], "a_lower": count,
    "total": count, "member_ratio_range", "member_means": {name: {"a", "b", "ratio"}},
    "a_medians", "b_medians" (panel medians per training seed at the first evaluation seed),
    "verdicts" / "class_acc_verdicts": the sets of per-pair verdicts by FID and by class accuracy}."""
    if len(a) != len(b) or not a:
        raise InputError(f"compare_training_seeds: {len(a)} runs against {len(b)}: pair one run per training seed")
    pairs, sums, ratios = [], {}, []
    lower = total = 0
    for i, (ra, rb) in enumerate(zip(a, b)):
        if ra.get("seeds") != rb.get("seeds"):
            raise InputError(
                f"compare_training_seeds: training pair {i} was scored over evaluation seeds "
                f"{ra.get('seeds')} and {rb.get('seeds')}: score both over the same seeds"
            )
        for j, (pa, pb) in enumerate(zip(ra["student_runs"], rb["student_runs"])):
            pa, pb = pa["panel"], pb["panel"]
            v = compare(pa, pb)
            b_by = {m["name"]: m for m in pb["members"]}
            n_lower = 0
            for m in pa["members"]:
                fa, fb = m["fid"], b_by[m["name"]]["fid"]
                n_lower += fa < fb
                ratios.append(fa / fb)
                s = sums.setdefault(m["name"], [0.0, 0.0, 0])
                s[0], s[1], s[2] = s[0] + fa, s[1] + fb, s[2] + 1
            lower += n_lower
            total += len(pa["members"])
            pairs.append(
                {
                    "training": i,
                    "seed": ra["seeds"][j],
                    "fid_ratio_median": v["fid_ratio_median"],
                    "fid": v["fid"],
                    "class_acc": v["class_acc"],
                    "a_median": pa["panel"]["fid_median"],
                    "b_median": pb["panel"]["fid_median"],
                    "members_lower": n_lower,
                    "a_class_acc": pa["panel"].get("class_acc_median"),
                    "b_class_acc": pb["panel"].get("class_acc_median"),
                }
            )
    means = {k: {"a": s[0] / s[2], "b": s[1] / s[2], "ratio": s[0] / s[1]} for k, s in sums.items()}
    return {
        "pairs": pairs,
        "a_lower": lower,
        "total": total,
        "member_ratio_range": [min(ratios), max(ratios)],
        "member_means": means,
        "a_medians": [r["student_runs"][0]["panel"]["panel"]["fid_median"] for r in a],
        "b_medians": [r["student_runs"][0]["panel"]["panel"]["fid_median"] for r in b],
        "verdicts": sorted({p["fid"] for p in pairs}),
        "class_acc_verdicts": sorted({p["class_acc"] for p in pairs}),
    }


def training_seeds_text(a_label: str, b_label: str, c: dict[str, Any]) -> str:
    """Markdown for `compare_training_seeds`: one row per training seed, then the member means."""
    lines = [
        f"| pair (training seed) | {a_label}: panel median per evaluation seed | {b_label} | a / b, per evaluation seed | members where a is lower | claims rule |",
        "|---|---|---|---|---|---|",
    ]
    by_training: dict[int, list[dict]] = {}
    for p in c["pairs"]:
        by_training.setdefault(p["training"], []).append(p)
    per_pair = c["total"] // len(c["pairs"])

    def join(ps: list[dict], key: str) -> str:
        return " / ".join(f"{p[key]:.2f}" for p in ps)

    for i, ps in by_training.items():
        verdicts = ", ".join(sorted({p["fid"] for p in ps}))
        lines.append(
            f"| {i} | {join(ps, 'a_median')} | {join(ps, 'b_median')} | {join(ps, 'fid_ratio_median')} "
            f"| {sum(p['members_lower'] for p in ps)} of {len(ps) * per_pair} | {verdicts} |"
        )
    lo, hi = c["member_ratio_range"]
    ma, mb = np.mean(c["a_medians"]), np.mean(c["b_medians"])
    lines += [
        "",
        f"{a_label} is lower on {c['a_lower']} of {c['total']} member-seed pairs (a / b per member {lo:.2f}-{hi:.2f}x); "
        f"mean panel median at the first evaluation seed {ma:.2f} against {mb:.2f} ({ma / mb:.2f}x).",
        "Mean FID per member over every pair: "
        + ", ".join(
            f"{_short(k)} {v['a']:.2f} against {v['b']:.2f} ({v['ratio']:.2f}x)" for k, v in c["member_means"].items()
        )
        + ".",
        f"Per-pair verdicts under the claims rule: by FID {', '.join(c['verdicts'])}; "
        f"by class accuracy {', '.join(c['class_acc_verdicts'])}.",
    ]
    accs = [(p["a_class_acc"], p["b_class_acc"]) for p in c["pairs"]]
    if all(x is not None and y is not None for x, y in accs):
        ma_acc, mb_acc = np.mean([x for x, _ in accs]), np.mean([y for _, y in accs])
        lines.append(
            f"Mean class accuracy (panel median) over every pair: {100 * ma_acc:.1f}% against {100 * mb_acc:.1f}%."
        )
    return "\n".join(lines) + "\n"
