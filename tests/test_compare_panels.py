"""Two methods over paired training seeds (`compare_training_seeds`, `eval/compare_panels.py`): the
claims rule per (training seed, evaluation seed) pair, the count of members where the first method
is lower, the per-member means, and clear errors for unpaired or unreadable inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fewstep.evaluation.inputs import InputError
from fewstep.evaluation.panel import compare_training_seeds, training_seeds_text

MEMBERS = ("fewstep-digits-judge", "fewstep-digits-judge-cnn3-s1", "fewstep-digits-pixel-pca64")


def _record(fids: list[list[float]], width: float = 1.0, seeds=(0, 100000), acc: float | None = None) -> dict:
    """An eval/panel.py record: fids[j] are the members' FIDs at evaluation seed j; with `acc`, every
    judge's class accuracy (interval +-0.01)."""
    runs = []
    for row in fids:
        members = [{"name": n, "fid": f, "fid_ci": [f - width, f + width]} for n, f in zip(MEMBERS, row)]
        summary = {"fid_median": sorted(row)[len(row) // 2]}
        if acc is not None:
            for m in members[:-1]:  # the pixel distance has no class accuracy
                m["class_acc"], m["class_acc_ci"] = acc, [acc - 0.01, acc + 0.01]
            summary["class_acc_median"] = acc
        runs.append({"panel": {"members": members, "panel": summary}})
    return {"seeds": list(seeds), "student_runs": runs}


def test_counts_members_and_applies_the_claims_rule_per_pair():
    # training seed 0: a lower on every member at both evaluation seeds, intervals apart (beats);
    # training seed 1: a lower on one member of three at each evaluation seed, intervals overlapping
    a = [_record([[10, 20, 3], [11, 21, 3]]), _record([[10, 22, 4], [10, 22, 4]], width=5)]
    b = [_record([[20, 30, 6], [22, 31, 6]]), _record([[12, 20, 3.5], [12, 20, 3.5]], width=5)]
    c = compare_training_seeds(a, b)
    assert c["total"] == 12 and c["a_lower"] == 6 + 2
    assert [p["fid"] for p in c["pairs"]] == ["beats", "beats", "within noise", "within noise"]
    assert [p["members_lower"] for p in c["pairs"]] == [3, 3, 1, 1]
    judge = c["member_means"]["fewstep-digits-judge"]
    assert judge["a"] == pytest.approx((10 + 11 + 10 + 10) / 4) and judge["b"] == pytest.approx((20 + 22 + 12 + 12) / 4)
    assert judge["ratio"] == pytest.approx(judge["a"] / judge["b"])
    assert c["a_medians"] == [10, 10] and c["b_medians"] == [20, 12]
    # the other way round every count is the complement and the verdicts flip
    r = compare_training_seeds(b, a)
    assert r["a_lower"] == c["total"] - c["a_lower"]
    assert [p["fid"] for p in r["pairs"]][:2] == ["trails", "trails"]
    text = training_seeds_text("A", "B", c)
    assert "A is lower on 8 of 12 member-seed pairs" in text and "| 0 | 10.00 / 11.00 |" in text


def test_class_accuracy_is_judged_beside_fid():
    # a lower FID bought with class accuracy: a beats b by FID and trails it by class accuracy
    a = [_record([[10, 20, 3]], seeds=(0,), acc=0.95)]
    b = [_record([[20, 30, 6]], seeds=(0,), acc=0.99)]
    c = compare_training_seeds(a, b)
    assert c["verdicts"] == ["beats"] and c["class_acc_verdicts"] == ["trails"]
    assert compare_training_seeds(b, a)["class_acc_verdicts"] == ["beats"]
    assert "95.0% against 99.0%" in training_seeds_text("A", "B", c)


def test_unpaired_or_differently_seeded_runs_are_refused():
    a = _record([[10, 20, 3]], seeds=(0,))
    with pytest.raises(InputError, match="1 runs against 2"):
        compare_training_seeds([a], [a, a])
    with pytest.raises(InputError, match="same seeds"):
        compare_training_seeds([a], [_record([[10, 20, 3]], seeds=(1,))])


def test_command_reads_panel_folders_and_names_a_missing_one(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    try:
        import compare_panels
    finally:
        sys.path.pop(0)
    for name, rec in (("a", _record([[10, 20, 3]])), ("b", _record([[20, 30, 6]]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "panel.json").write_text(json.dumps(rec))
    out = tmp_path / "cmp.json"
    assert compare_panels.main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(out)]) == 0
    assert "a is lower on 3 of 3" in capsys.readouterr().out
    assert json.loads(out.read_text())["a_lower"] == 3
    from fewstep.errors import UserError

    with pytest.raises(UserError, match="no panel.json"):
        compare_panels.main(["--a", str(tmp_path / "missing"), "--b", str(tmp_path / "b")])
