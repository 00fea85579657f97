"""NCT benchmark: the control error and FID of a one-step student with and without its control
adapter.

    python eval/nct_bench.py --generator runs/dmd2_1step_vp --nct runs/nct_downsample --nct runs/nct_edges \
        --num-samples 1000 --out runs/nct_bench

The requested controls are those of real digits (the control model applied to the 32x32 digit
i % 1797 of class i % 10's list), so the score asks what a user would ask: "a 3 with this
thumbnail / these edges". Control error: mean squared difference between the control model of
the output and the requested control. FID and class accuracy: the digits judge (`digits_scores`),
labels i % 10. Real images are read here, at evaluation only; NCT training reads none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="the one-step student's run dir")
    p.add_argument("--nct", action="append", default=[], help="an NCT run dir (repeatable)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    from safetensors.torch import load_file

    from fewstep.controls import CONTROLS, AdaptedGenerator, ControlAdapter
    from fewstep.digits.data import load_digits_tensors
    from fewstep.evaluation.digits import digits_scores
    from fewstep.objectives.nct import load_generator
    from fewstep.pipeline_teacher import load_teacher

    torch.set_num_threads(args.threads)
    teacher = load_teacher("digits-vp")
    from fewstep.denoiser import copy_denoiser

    gen, sampling = load_generator(args.generator, teacher.denoiser, lambda t: copy_denoiser(t, trainable=False))
    t0 = float(sampling["times"][0])
    n = args.num_samples
    labels = torch.arange(n) % 10
    images, ylab = load_digits_tensors()
    by_class = [torch.nonzero(ylab == c).flatten() for c in range(10)]
    wanted = torch.stack([images[by_class[int(c)][i // 10 % len(by_class[int(c)])]] for i, c in enumerate(labels)])
    z = torch.randn(n, *teacher.latent_shape, generator=torch.Generator().manual_seed(args.seed))

    @torch.no_grad()
    def generate(net, control=None) -> torch.Tensor:
        out = []
        for i in range(0, n, 250):
            cond = {"class_labels": labels[i : i + 250]}
            if control is not None:
                cond["control"] = control[i : i + 250]
            out.append(teacher.decode(net(z[i : i + 250], t0, cond)))
        return torch.cat(out)

    base = generate(gen)
    base_scores = digits_scores(base, labels)
    rows = []
    for run in args.nct:
        card = json.loads((Path(run) / "run_card.json").read_text())
        prm = card["objective_params"]
        control = CONTROLS[prm["control"]]
        adapter = ControlAdapter(**prm["adapter_config"])
        state = load_file(str(Path(run) / card["files"]["student"] / "model.safetensors"))
        adapter.load_state_dict({k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")})
        adapted = AdaptedGenerator(gen, prm["layer_name"], adapter.eval())
        req = control(wanted)
        out = generate(adapted, req)
        err_base = float(((control(base) - req) ** 2).mean())
        err = float(((control(out) - req) ** 2).mean())
        sc = digits_scores(out, labels)
        rows.append(
            {
                "run": run,
                "control": prm["control"],
                "train_steps": card.get("steps"),
                "train_time_s": card.get("train_time_s"),
                "control_error_unadapted": err_base,
                "control_error_adapted": err,
                "ratio": err / err_base,
                "fid_unadapted": base_scores["fid"],
                "fid_adapted": sc["fid"],
                "fid_ratio": sc["fid"] / base_scores["fid"],
                "class_acc_unadapted": base_scores["class_acc"],
                "class_acc_adapted": sc["class_acc"],
                "n": n,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps({"command": " ".join(["python"] + sys.argv), "generator": args.generator, "rows": rows}, indent=1)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
