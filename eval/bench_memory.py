"""The memory saving of DMD2's shared-base mode, against full copies and separate LoRA modules.

    python eval/bench_memory.py [--steps 3] [--batch 4] [--rank-digits 16] [--rank-sdxl 32] [--out DIR]

For each backbone (the digits DiT, a small SDXL-class UNet) and each mode (full copies of the
teacher; LoRA student and fake score as separate modules on shared frozen tensors, the entry
point's lora.student / lora.fake; shared-base mode, one backbone with adapters switched per role)
a fresh process builds DMD2, runs a few training steps with AdamW, and reports the parameter
bytes held (every distinct tensor of every role, the teacher included) and the peak RSS.
(Benchmarks of students' quality are `eval/bench.py`.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


# ---- memory -------------------------------------------------------------------------------------
def _sdxl_class_unet():
    """A small UNet2DConditionModel with SDXL's structure (no attention in the first block, two
    cross-attention blocks with linear projections, text_time added conditions), ~1/100 the width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=256,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=64 + 6 * 32,
        norm_num_groups=32,
    )


def _memory_child(backbone: str, mode: str, steps: int, batch: int, rank: int) -> dict:
    """Runs in its own process: build DMD2 in `mode`, train `steps` steps, measure."""
    from types import SimpleNamespace

    from fewstep.denoiser import Denoiser
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.paths import VPPath
    from fewstep.training.lora import lora_targets, make_factories

    torch.manual_seed(0)
    path = VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    if backbone == "digits-dit":
        try:
            from fewstep.pipeline_teacher import load_teacher

            teacher = load_teacher("digits-vp").denoiser
            source = "digits-vp teacher"
        except Exception:  # the embedded weights are not there: same architecture, random weights
            from fewstep.digits.models import build_dit

            teacher = Denoiser(build_dit(), path)
            source = "digits DiT architecture (random weights)"
        shape = (4, 8, 8)

        def cond(b):
            return {"class_labels": torch.arange(b) % 10}
    else:
        teacher = Denoiser(_sdxl_class_unet(), path, zero_null=True)
        source = "SDXL-class UNet2DConditionModel (random weights)"
        shape = (4, 32, 32)

        def cond(b):
            return {
                "encoder_hidden_states": torch.randn(b, 8, 256),
                "text_embeds": torch.randn(b, 64),
                "time_ids": torch.tensor([256.0, 256, 0, 0, 256, 256]).expand(b, 6).clone(),
            }

    teacher.requires_grad_(False)
    rss_teacher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the same adapter targets in both LoRA modes: the entry point's family default
    targets = lora_targets(teacher.backbone)
    lora = SimpleNamespace(
        student=mode == "lora", fake=mode == "lora", rank=rank, alpha=float(rank), dropout=0.0, target_modules=targets
    )
    make_student, make_copy = make_factories(lora)
    ctx = BuildContext(
        latent_shape=shape,
        num_classes=10 if backbone == "digits-dit" else None,
        lora=lora,
        make_student=make_student,
        make_copy=make_copy,
    )
    obj = build_objective("dmd2", {"guidance": 2.0, "shared_base": mode == "shared"}, teacher, ctx)
    opts = {g: torch.optim.AdamW(trainable_parameters(obj, g), lr=1e-5) for g in obj.groups}
    seen, held, trainable = set(), 0, 0
    for net in list(obj.nets.values()) + [teacher]:
        for m in (net, getattr(net, "backbone", None)):
            for p in m.parameters() if m is not None else []:
                if id(p) not in seen:
                    seen.add(id(p))
                    held += p.numel() * p.element_size()
                    trainable += p.numel() * p.element_size() if p.requires_grad else 0
    t0 = time.perf_counter()
    for step in range(steps):
        batch_d = {"cond": cond(batch), "shape": (batch, *shape)}
        for phase in obj.phases(step):
            loss, _ = obj.loss(phase, batch_d, step)
            loss.backward()
            opts[phase].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    return {
        "backbone": backbone,
        "source": source,
        "mode": mode,
        "lora_rank": rank if mode != "full" else None,
        "param_bytes": held,
        "trainable_bytes": trainable,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_teacher_bytes": rss_teacher,
        "steps": steps,
        "batch": batch,
        "seconds_per_step": round((time.perf_counter() - t0) / steps, 3),
    }


def cmd_memory(args, command: str) -> int:
    if args.child:
        b, mode = args.child.split(":")
        print("RESULT " + json.dumps(_memory_child(b, mode, args.steps, args.batch, args.rank[b])), flush=True)
        return 0
    rows = []
    for b in ("digits-dit", "sdxl-class"):
        for mode in ("full", "lora", "shared"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                f"{b}:{mode}",
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--rank-digits",
                str(args.rank["digits-dit"]),
                "--rank-sdxl",
                str(args.rank["sdxl-class"]),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"memory child {b}:{mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[7:]))
            print(json.dumps(rows[-1]), flush=True)
    mib = 2**20
    lines = [
        "| backbone | mode | LoRA rank | parameter MiB held | trainable MiB | peak RSS MiB "
        "| RSS above teacher MiB | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['mode']} | {r['lora_rank'] or '-'} | {r['param_bytes'] / mib:.1f} | "
            f"{r['trainable_bytes'] / mib:.1f} | {r['peak_rss_bytes'] / mib:.0f} | "
            f"{(r['peak_rss_bytes'] - r['rss_after_teacher_bytes']) / mib:.0f} | {r['seconds_per_step']} |"
        )
    print("\n".join(lines))
    out_dir = Path(args.out or "runs/bench/dmd_memory")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank-digits", type=int, default=16)
    p.add_argument("--rank-sdxl", type=int, default=32)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rank = {"digits-dit": args.rank_digits, "sdxl-class": args.rank_sdxl}
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = "python eval/bench_memory.py " + " ".join(shlex.quote(a) for a in argv)
    return cmd_memory(args, command)


if __name__ == "__main__":
    sys.exit(main())
