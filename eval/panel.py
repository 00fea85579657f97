"""Score a trained digits run (or any digits source) against its teacher with the judge panel:
every member's FID with its bootstrap interval, the panel median and range, the seed-to-seed
spread over several sample seeds, class accuracy, precision / recall / within-class Vendi, the
real-vs-real floor at the same sample count, and the conclusion under the claims rule.

    python eval/panel.py --student runs/bench/dmd2_1step_vp_3k --teacher digits-vp --teacher-guidance 1.5
    python eval/panel.py --student runs/bench/scm_2step_vp --student-steps 2 --teacher digits-vp \\
        --teacher-guidance 1.5 --num-samples 2000 --seeds 0 100000 200000 --out runs/panel/scm_2step_vp

Each (source, seed) is one `fewstep eval` run (metric "panel") in <out>/<source>/seed<seed>; the
teacher's are kept in <teacher-cache> and reused while the settings and weights match. Seeds are
far apart because sample i of seed s starts from noise seed s + i. The first seed is the headline
row (intervals, verdict); the others give the spread. Prints the table and writes <out>/panel.md
and <out>/panel.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path

import torch

_SAME = ("pipeline", "steps", "seed", "num_samples", "guidance", "bootstrap", "student_weights", "batch_size")


def _panel_of(results: dict) -> dict:
    return results["rows"][0]["metrics"]["panel"]


def score(
    source: str,
    steps: int,
    seed: int,
    n: int,
    guidance: float | None,
    bootstrap: int,
    out: Path,
    command: str,
    weights: str = "student",
) -> dict:
    """The panel scores of one source at one seed (reused from <out>/results.json when every setting,
    the source's weights and the panel's weights match)."""
    from fewstep.evaluation import EvalSpec, evaluate
    from fewstep.evaluation.sources import load_source

    spec = EvalSpec(
        pipeline=source,
        steps=[steps],
        protocol="digits",
        num_samples=n,
        seed=seed,
        metrics=("panel",),
        guidance=guidance,
        bootstrap=bootstrap,
        out=str(out),
        progress=False,
        command=command,
        student_weights=weights,
    )
    f = out / "results.json"
    if f.is_file():
        old = json.loads(f.read_text())
        same = old.get("complete") and all(
            old["spec"].get(k) == (list(getattr(spec, k)) if k == "steps" else getattr(spec, k)) for k in _SAME
        )
        if same and old["source"].get("backbone_sha256") == load_source(source).backbone_sha256():
            from fewstep.digits.panel import register_panel
            from fewstep.evaluation.scores import Extractor

            shas = {m["name"]: m["weights_sha256"] for m in _panel_of(old)["members"]}
            if shas == {n_: Extractor(n_).check().weights_sha256 for n_ in register_panel()}:
                print(f"reusing {f}", flush=True)
                return {"panel": _panel_of(old), "guidance": old["rows"][0]["guidance"]}
    res = evaluate(spec)
    return {"panel": _panel_of(res), "guidance": res["rows"][0]["guidance"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--student", required=True, help="a run dir, exported pipeline or teacher name")
    p.add_argument("--student-steps", type=int, help="default: the run card's step count")
    p.add_argument("--student-weights", default="student", choices=["student", "student_ema"])
    p.add_argument("--teacher", default=None, help="default: the run card's teacher")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--teacher-guidance", type=float, help="default: the teacher's recommended scale")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 100000, 200000])
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="default runs/panel/<student folder name>")
    p.add_argument("--teacher-cache", type=Path, default=Path("runs/panel/teachers"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fewstep.errors import script_command
    from fewstep.evaluation.inputs import InputError
    from fewstep.evaluation.panel import comparison

    command = script_command("eval/panel.py", argv)

    student = args.student
    card_file = Path(student) / "run_card.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    steps = args.student_steps or (len(card["sampling"]["times"]) - 1 if card else None)
    teacher = args.teacher or (card.get("teacher") or {}).get("source")
    if steps is None or teacher is None:
        p.error("--student-steps and --teacher are needed when --student is not a run dir")
    out = args.out or Path("runs/panel") / Path(student).name
    try:
        s_runs = [
            score(
                student,
                steps,
                seed,
                args.num_samples,
                None,
                args.bootstrap,
                out / f"seed{seed}",
                command,
                args.student_weights,
            )
            for seed in args.seeds
        ]
        t_runs = []
        for seed in args.seeds:
            tag = f"{teacher}_steps{args.teacher_steps}_w{args.teacher_guidance}_n{args.num_samples}_seed{seed}"
            t_runs.append(
                score(
                    teacher,
                    args.teacher_steps,
                    seed,
                    args.num_samples,
                    args.teacher_guidance,
                    args.bootstrap,
                    args.teacher_cache / tag,
                    command,
                )
            )
    except InputError as e:
        print(f"eval/panel.py: error: {e}", file=sys.stderr)
        return 2
    w = t_runs[0]["guidance"]
    s_label = f"{Path(student).name} ({steps} step{'s' if steps > 1 else ''})"
    t_label = f"{teacher} ({args.teacher_steps} steps, w={w:g})"
    seeds = {s_label: [r["panel"] for r in s_runs], t_label: [r["panel"] for r in t_runs]}
    text, verdict = comparison(
        s_label, s_runs[0]["panel"], t_label, t_runs[0]["panel"], seeds if len(args.seeds) > 1 else None
    )
    head = (
        f"`{command}`\n\n{args.num_samples} samples per model and seed (labels i % 10; seeds "
        f"{', '.join(map(str, args.seeds))}; the first is the headline row).\n\n"
    )
    print(head + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "panel.md").write_text(head + text)
    (out / "panel.json").write_text(
        json.dumps(
            {
                "command": command,
                "student": s_label,
                "teacher": t_label,
                "seeds": args.seeds,
                "student_runs": s_runs,
                "teacher_runs": t_runs,
                "verdict": verdict,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
