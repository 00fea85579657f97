"""Memory and time per training step of presets on the same teacher: what a run holds (TwinFlow's
one trainable network, plus its EMA target copy, against DMD2's student, fake score and frozen
teacher).

    python eval/bench_onenet.py configs/digits/twinflow_flow.yaml configs/digits/dmd2_1step_flow.yaml

Each preset runs in a fresh process, built as the entry point builds it (the preset's teacher,
batches from `fewstep.training.data.BatchSource`, the objective from the registry with the entry
point's network factories, one AdamW per optimizer group), for `--steps` steps after one warm-up
step. Reported: the bytes of every distinct parameter tensor held (teacher included, each tensor
once), the trainable bytes, the AdamW state bytes after the run, the peak RSS of the process, and
the mean wall seconds per step (every phase of the step). Wall times on a shared machine are upper
bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _child(config: str, steps: int, overrides: list[str]) -> dict:
    from fewstep.config import load_config
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.registry import BuildContext, build_objective, make_params
    from fewstep.training.bundle import load_bundle
    from fewstep.training.data import BatchSource
    from fewstep.training.lora import make_factories

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    bundle = load_bundle(cfg.teacher, torch.device("cpu"))
    tden = bundle.denoiser
    tden.requires_grad_(False)
    source = BatchSource(
        bundle,
        cfg.data.batch_size,
        cfg.seed,
        0,
        1,
        torch.device("cpu"),
        cfg.data.real_data,
        cfg.data.prompts,
        cfg.data.num_classes,
        cfg.data.real_latents,
    )
    make_student, make_copy = make_factories(cfg.lora, family=bundle.family)
    ctx = BuildContext(
        latent_shape=tuple(bundle.latent_shape),
        num_classes=source.num_classes,
        null_class=bundle.null_class,
        text=bundle.text,
        has_real_data=source.has_real_data,
        seed=cfg.seed,
        family=bundle.family,
        lora=cfg.lora,
        steps=steps,
        make_student=make_student,
        make_copy=make_copy,
    )
    obj = build_objective(cfg.objective.name, make_params(cfg.objective.name, cfg.objective.params), tden, ctx)
    opts = {g: torch.optim.AdamW(trainable_parameters(obj, g), lr=1e-6) for g in obj.groups}
    seen, held, trainable = set(), 0, 0
    for net in [tden, *obj.nets.values()]:
        for p in net.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                held += p.numel() * p.element_size()
                trainable += p.numel() * p.element_size() if p.requires_grad else 0

    def one(step: int) -> None:
        batch = source(step)
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, batch, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)

    one(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        one(step)
    sec = (time.perf_counter() - t0) / steps
    state = sum(
        t.numel() * t.element_size()
        for o in opts.values()
        for s in o.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return {
        "config": config,
        "objective": cfg.objective.name,
        "teacher": cfg.teacher.source,
        "batch_size": cfg.data.batch_size,
        "roles": sorted(obj.nets),
        "param_bytes": held,
        "trainable_bytes": trainable,
        "adam_state_bytes": state,
        "steps": steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds_per_step": round(sec, 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], help="key=value override for every preset")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/bench/onenet")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        print("RESULT " + json.dumps(_child(args.configs[0], args.steps, args.set)), flush=True)
        return 0
    rows = []
    for c in args.configs:
        cmd = [sys.executable, __file__, c, "--child", "--steps", str(args.steps)]
        for s in args.set:
            cmd += ["--set", s]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{c} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
    mib = 2**20
    lines = [
        "| preset | roles | parameter MiB held | trainable MiB | AdamW state MiB | peak RSS MiB | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['config']}` | {', '.join(r['roles'])} | {r['param_bytes'] / mib:.1f} | "
            f"{r['trainable_bytes'] / mib:.1f} | {r['adam_state_bytes'] / mib:.1f} | "
            f"{r['peak_rss_bytes'] / mib:.0f} | {r['seconds_per_step']} |"
        )
    print("\n".join(lines))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = "python eval/bench_onenet.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (Path(args.out) / "onenet.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
