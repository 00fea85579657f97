"""Decoupled DMD's ablation on the embedded default, as one command: the CFG-augmentation (CA) term
alone, the distribution-matching (DM) term alone, both with decoupled re-noising (the method), and
both re-noised at one shared draw (coupled), each trained for the same number of generator updates
from one preset, then scored with the judge panel (every member's FID with its bootstrap interval,
class accuracy, within-class Vendi as the diversity measure) next to the teacher.

    python eval/ddmd_ablation.py --config configs/digits/ddmd_4step_vp.yaml --generator-steps 100 \\
        --teacher-guidance 1.5 --num-samples 1000 --out runs/ddmd_ablation/vp

The paper's reading: CA is the engine (alone it over-saturates: class accuracy up, diversity down),
DM the shield (it restores diversity). The GAN head is off by default, so that neither term is
shielded by it (`--gan` keeps the preset's head). Each variant is a fresh `train/train.py` process
in <out>/<variant>; a finished run (its run card present, its resolved objective equal to the
requested one) is scored again without re-training, and the panel's own cache reuses identical
scores. `--only` trains and scores a subset (to split the work over processes); the table lists
every variant that is finished. Prints the table and writes <out>/ablation.md and ablation.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "ca_only": ({"objective.dm_weight": 0.0}, "CA only (dm_weight 0)"),
    "dm_only": ({"objective.ca_weight": 0.0}, "DM only (ca_weight 0)"),
    "decoupled": ({}, "CA + DM, decoupled (the method)"),
    "coupled": ({"objective.ca_schedule": "coupled"}, "CA + DM, coupled (one shared re-noising)"),
}


def variant_overrides(variant: str, generator_steps: int | None, gan: bool) -> dict:
    """The key=value overrides of the preset that make one variant (None stands for null)."""
    ov: dict = {}
    if generator_steps is not None:
        ov.update({"generator_steps": generator_steps, "steps": None})
    if not gan:
        ov["objective.gan"] = False
        if variant == "ca_only":  # no DM term and no head: nothing trains a fake score
            ov["optim.fake_score"] = None
    return {**ov, **VARIANTS[variant][0]}


def _get(cfg: dict, dotted: str):
    for k in dotted.split("."):
        cfg = (cfg or {}).get(k)
    return cfg


def _train(config: str, run: Path, overrides: dict, threads: int) -> float | None:
    """Train one variant in a fresh process unless a finished run with these settings is there;
    returns the wall seconds of the training (None when reused)."""
    card = run / "run_card.json"
    resolved = run / "config.yaml"
    if card.is_file() and resolved.is_file():
        old = yaml.safe_load(resolved.read_text())
        if all(_get(old, k) == v for k, v in overrides.items() if v is not None):
            print(f"reusing the finished run {run}", flush=True)
            return None
    args = [
        f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()
    ]
    cmd = [sys.executable, "train/train.py", "--config", config, f"output_dir={run}", "overwrite=true", *args]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/digits/ddmd_4step_vp.yaml", help="a decoupled_dmd preset")
    p.add_argument(
        "--generator-steps", type=int, default=None, help="generator updates per variant (default: the preset's)"
    )
    p.add_argument("--gan", action="store_true", help="keep the preset's GAN head (default: off)")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="train and score only these")
    p.add_argument("--teacher-guidance", type=float, help="the teacher row's scale (default: the card's)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="default runs/ddmd_ablation/<preset name>")
    p.add_argument("--teacher-cache", type=Path, default=Path("runs/panel/teachers"))
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    preset = yaml.safe_load(Path(args.config).read_text())
    if _get(preset, "objective.name") != "decoupled_dmd":
        p.error(f"--config {args.config}: objective.name is {_get(preset, 'objective.name')!r}, not decoupled_dmd")
    import torch

    torch.set_num_threads(args.threads)
    from panel import score

    from fewstep.errors import script_command
    from fewstep.evaluation.panel import CLAIMS_RULE, compare, panel_table

    command = script_command("eval/ddmd_ablation.py", argv)
    out = args.out or Path("runs/ddmd_ablation") / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "ablation.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else {"train_wall_s": {}}
    teacher = _get(preset, "teacher.source")
    steps = int(_get(preset, "objective.num_steps"))
    rows, by = [], {}
    for name, (_, label) in VARIANTS.items():
        run = out / name
        if args.only is None or name in args.only:
            wall = _train(args.config, run, variant_overrides(name, args.generator_steps, args.gan), args.threads)
            if wall is not None:  # re-read: another process may be training other variants
                log = json.loads(log_file.read_text()) if log_file.is_file() else {"train_wall_s": {}}
                log["train_wall_s"][name] = wall
                log_file.write_text(json.dumps(log, indent=1))
        if not (run / "run_card.json").is_file():
            continue
        res = score(str(run), steps, args.seed, args.num_samples, None, args.bootstrap, run / "panel", command)
        card = json.loads((run / "run_card.json").read_text())
        upd = card.get("updates", {})
        wall = log["train_wall_s"].get(name)
        rows.append((f"{label}: {upd.get('generator', '?')} generator updates", res["panel"]))
        by[name] = {"label": label, "updates": upd, "train_wall_s": wall, "panel": res["panel"]}
    tag = f"{teacher}_steps{args.teacher_steps}_w{args.teacher_guidance}_n{args.num_samples}_seed{args.seed}"
    t = score(
        teacher,
        args.teacher_steps,
        args.seed,
        args.num_samples,
        args.teacher_guidance,
        args.bootstrap,
        args.teacher_cache / tag,
        command,
    )
    t_label = f"{teacher} ({args.teacher_steps} steps, w={t['guidance']:g})"
    rows.append((t_label, t["panel"]))
    text = panel_table(rows)
    verdicts = [f"Claims rule: {CLAIMS_RULE}"]
    for name, r in by.items():
        pairs = [(t_label, t["panel"])]
        if name != "decoupled" and "decoupled" in by:
            pairs.append((by["decoupled"]["label"], by["decoupled"]["panel"]))
        for o_label, o_panel in pairs:
            v = compare(r["panel"], o_panel)
            r.setdefault("verdicts", {})[o_label] = v
            verdicts.append(
                f"- {r['label']} against {o_label}: FID {v['fid']}, class accuracy {v['class_acc']} "
                f"(FID ratio median {v['fid_ratio_median']:.2f}x, range {v['fid_ratio_range'][0]:.2f}-"
                f"{v['fid_ratio_range'][1]:.2f}x)"
            )
    walls = ", ".join(f"{n} {r['train_wall_s'] / 60:.1f} min" for n, r in by.items() if r["train_wall_s"] is not None)
    head = (
        f"`{command}`\n\n{args.num_samples} samples per model (labels i % 10, seed {args.seed}); preset "
        f"`{args.config}` with {'its GAN head' if args.gan else 'the GAN head off'}"
        + (f", {args.generator_steps} generator updates per variant" if args.generator_steps else "")
        + (f"; train wall {walls}" if walls else "")
        + ".\n\n"
    )
    body = head + text + "\n" + "\n".join(verdicts) + "\n"
    print(body)
    (out / "ablation.md").write_text(body)
    log.update(command=command, variants=by, teacher={"label": t_label, "panel": t["panel"]})
    log_file.write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
