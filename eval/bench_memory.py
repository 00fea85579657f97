"""The memory saving of DMD2's shared-base mode, against full copies and separate LoRA modules.

    python eval/bench_memory.py [--steps 3] [--batch 4] [--rank-digits 16] [--rank-sdxl 32] [--out DIR]
    python eval/bench_memory.py --large [--steps 2] [--batch 2] [--modes full,shared,full-gc,shared-gc] [--gan]
    python eval/bench_memory.py --large --widths 32,32,64,64 --latent-size 16 --no-full-size   (a quick check)

For each backbone (the digits DiT, a small SDXL-class UNet) and each mode (full copies of the
teacher; LoRA student and fake score as separate modules on shared frozen tensors, the entry
point's lora.student / lora.fake; shared-base mode, one backbone with adapters switched per role)
a fresh process builds DMD2, runs a few training steps with AdamW, and reports the parameter
bytes held (every distinct tensor of every role, the teacher included) and the peak RSS.
With `--large`, the same comparison on a 142M-parameter SD-class UNet (random weights), where
weights, gradients and AdamW states set the peak, beside the `--dry-run` memory plan's prediction,
then the plan for SD1.5- and SDXL-sized teachers. (Benchmarks of students' quality are
`eval/bench.py`.) Three measurements per mode: the peak resident set above the start (the resident
set once the interpreter, torch, diffusers and peft are loaded and a tiny UNet has run one training
step, so that libraries' lazy imports and kernel initialisation are not counted), the same with
glibc's malloc given a fixed mmap threshold of 128 KiB (`MALLOC_MMAP_THRESHOLD_`: every tensor
above it is mapped on allocation and unmapped on free, so the resident set follows the live
tensors instead of keeping the heap's high-water mark), and the peak of the bytes of live tensors
(`fewstep.training.activations.LiveBytes`, counting every tensor made from the start on).
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

# ---- memory -------------------------------------------------------------------------------------
# SDXL's UNet2DConditionModel structure: three levels, cross-attention with linear projections in
# the lower two, text_time added conditions (widths and depths are each model's own)
_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
}


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
        **_SDXL_BLOCKS,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=256,
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=64 + 6 * 32,
        norm_num_groups=32,
    )


# ---- a backbone of over 100M parameters: where weights, gradients and AdamW states set the peak ----
LARGE_WIDTHS = (128, 256, 512, 512)  # SD1.5's UNet (320, 640, 1280, 1280) at 0.4 width: 142M parameters
LARGE_SHAPE = (4, 32, 32)  # 256 px through an SD VAE
TEXT_LEN = 77


def _sd_class_unet(widths=LARGE_WIDTHS, sample_size=32):
    """SD1.5's UNet2DConditionModel structure (four levels, cross-attention to 77 x 768 text
    tokens); SD1.5 itself is `widths=(320, 640, 1280, 1280), sample_size=64` (859.5M)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=widths,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )


def _sdxl_unet():
    """SDXL base's UNet2DConditionModel (2567.5M parameters), for the plan only (meta device)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        **_SDXL_BLOCKS,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _path():
    from fewstep.paths import VPPath

    return VPPath.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def _large_cfg(mode: str, batch: int, rank: int, gan: bool):
    from fewstep.config import config_from_dict

    return config_from_dict(
        {
            "objective": {
                "name": "dmd2",
                "guidance": 2.0,
                "fake_updates_per_generator": 1,
                "shared_base": mode.startswith("shared"),
                "gan": gan,
            },
            "data": {"batch_size": batch, "real_data": gan},
            "lora": {"rank": rank, "alpha": float(rank)},
            "precision": {"gradient_checkpointing": mode.endswith("-gc"), "mixed_precision": "no"},
        }
    )


def _text_cond(bb, batch: int) -> dict:
    """A text condition of the backbone's shapes (77 tokens; SDXL's pooled text and time ids)."""
    cfg = bb.config
    cond = {"encoder_hidden_states": torch.zeros(batch, TEXT_LEN, cfg.cross_attention_dim, device="meta")}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["text_embeds"] = torch.zeros(batch, pooled, device="meta")
        cond["time_ids"] = torch.zeros(batch, 6, device="meta")
    return cond


def plan_bytes(backbone_fn, latent_shape, mode: str, batch: int, rank: int, gan: bool):
    """The `--dry-run` memory plan (`fewstep.training.dry_run.MemoryPlan`) for DMD2 on a teacher
    built by `backbone_fn` on the meta device."""
    from fewstep.denoiser import Denoiser
    from fewstep.training.bundle import TeacherBundle
    from fewstep.training.dry_run import plan_memory

    with torch.device("meta"):
        bb = backbone_fn()
    den = Denoiser(bb, _path())
    den.requires_grad_(False)
    bundle = TeacherBundle(den, tuple(latent_shape), source=f"{type(bb).__name__} (meta)", family="sd15", text=True)
    cfg = _large_cfg(mode, batch, rank, gan)
    return plan_memory(cfg, 1, "none", "no", teacher=bundle, example_cond=_text_cond(bb, batch))


def _warm_up() -> None:
    """One AdamW training step of a tiny UNet2DConditionModel: loads what libraries load lazily
    on first use (kernels, their caches, the autograd engine) before the start is read."""
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 32, 32),
        cross_attention_dim=32,
        layers_per_block=1,
        norm_num_groups=8,
    )
    m.enable_gradient_checkpointing()  # the checkpointing code path, too
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    m.train()
    m(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 7, 32)).sample.sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _large_child(
    mode: str, steps: int, batch: int, rank: int, gan: bool, widths=LARGE_WIDTHS, shape=LARGE_SHAPE
) -> dict:
    """Runs in its own process: DMD2 on the 142M SD-class UNet (random weights) in `mode` (full,
    shared, full-gc, shared-gc), `steps` steps with a generator and a fake-score update each."""
    from fewstep.training.memory import current_rss_bytes

    rss_process = current_rss_bytes()
    import diffusers  # noqa: F401  the libraries the run loads, before the start is read
    import peft  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401

    from fewstep.denoiser import Denoiser
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.registry import BuildContext, build_objective
    from fewstep.training.activations import LiveBytes
    from fewstep.training.checkpointing import enable_activation_checkpointing
    from fewstep.training.lora import make_factories

    rss_imports = current_rss_bytes()
    _warm_up()
    # the start: interpreter and libraries loaded and initialised (read from /proc: ru_maxrss
    # would carry the parent's high-water mark over fork and exec)
    base_rss = current_rss_bytes()
    live = LiveBytes()  # every tensor made from here on, as long as it lives
    with live:
        torch.manual_seed(0)
        teacher = Denoiser(_sd_class_unet(widths, shape[-1]), _path(), zero_null=True)  # CFG against zero text
        teacher.requires_grad_(False)
        cfg = _large_cfg(mode, batch, rank, gan)
        make_student, make_copy = make_factories(cfg.lora, gradient_checkpointing=cfg.precision.gradient_checkpointing)
        ctx = BuildContext(
            latent_shape=shape,
            has_real_data=gan,
            lora=cfg.lora,
            gradient_checkpointing=cfg.precision.gradient_checkpointing,
            make_student=make_student,
            make_copy=make_copy,
        )
        obj = build_objective("dmd2", dict(cfg.objective.params), teacher, ctx)
        if cfg.precision.gradient_checkpointing:
            enable_activation_checkpointing(obj.nets.values())
        opts = {g: torch.optim.AdamW(trainable_parameters(obj, g), lr=1e-5) for g in obj.groups}
        live_built = live.current
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for step in range(steps):
            batch_d = {
                "cond": {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, 768, generator=g)},
                "x0": torch.randn(batch, *shape, generator=g),
                "shape": (batch, *shape),
            }
            for phase in obj.phases(step):  # as training/loop.py: every gradient set to None after each update
                loss, _ = obj.loss(phase, batch_d, step)
                loss.backward()
                opts[phase].step()
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
            del batch_d, loss
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "backbone": f"sd-class-{widths}",
        "mode": mode,
        "gan": gan,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "params": sum(p.numel() for n, p in teacher.backbone.named_parameters() if "lora_" not in n),
        "rss_process_start_bytes": rss_process,
        "rss_after_imports_bytes": rss_imports,
        "base_rss_bytes": base_rss,
        "peak_rss_bytes": peak,
        "peak_above_base_bytes": peak - base_rss,
        "live_peak_bytes": live.peak,
        "live_after_build_bytes": live_built,  # weights (AdamW moments come with the first update)
        "live_end_bytes": live.current,  # weights and AdamW moments
        "steps": steps,
        "batch": batch,
        "seconds_per_step": round(seconds / steps, 2),
    }


MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, fixed (no dynamic raise)


def cmd_large(args, command: str) -> int:
    """Full copies against shared base (with and without activation checkpointing) on the 142M
    UNet, each in fresh processes (glibc's malloc as it comes, then with a fixed mmap threshold),
    beside the dry-run plan; then the plan for SD1.5 and SDXL."""
    widths = tuple(int(w) for w in args.widths.split(","))
    shape = (4, args.latent_size, args.latent_size)
    if args.child:
        mode = args.child.split(":")[1]
        r = _large_child(mode, args.steps, args.batch, args.rank_large, args.gan, widths, shape)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    mib, gib = 2**20, 2**30

    def child(mode: str, env: dict) -> dict:
        cmd = [sys.executable, __file__, "--large", "--child", f"large:{mode}", "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--rank-large", str(args.rank_large), "--widths", args.widths]
        cmd += ["--latent-size", str(args.latent_size)] + (["--gan"] if args.gan else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"memory child large:{mode} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[7:])

    rows = []
    for mode in args.modes.split(","):
        r = child(mode, {})
        m = child(mode, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
        r["mmap_peak_above_base_bytes"] = m["peak_above_base_bytes"]
        r["mmap_live_peak_bytes"] = m["live_peak_bytes"]
        r["mmap_seconds_per_step"] = m["seconds_per_step"]
        plan = plan_bytes(lambda: _sd_class_unet(widths, shape[-1]), shape, mode, args.batch, args.rank_large, args.gan)
        r["plan_held_bytes"], r["plan_grad_bytes"] = plan.held_bytes, plan.grad_bytes
        r["plan_activation_bytes"], r["plan_transient_bytes"] = plan.activation_bytes or 0, plan.transient_bytes or 0
        r["plan_bytes"] = plan.peak_bytes
        rows.append(r)
        print(json.dumps(r), flush=True)
    full = next((r for r in rows if r["mode"] == "full"), None)
    lines = [
        f"DMD2 on an SD-class UNet2DConditionModel, {widths} widths ({rows[0]['params'] / 1e6:.1f}M), latents "
        f"{shape}, batch {args.batch}, fp32, GAN {'on' if args.gan else 'off'}, LoRA rank {args.rank_large} (shared "
        f"base); start: {rows[0]['base_rss_bytes'] / mib:.0f} MiB resident ({rows[0]['rss_after_imports_bytes'] / mib:.0f}"
        f" after the imports, {rows[0]['rss_process_start_bytes'] / mib:.0f} before them)",
        "| mode | peak RSS MiB | above start MiB | x full copy | above start, mmap threshold 128 KiB MiB "
        "| live tensors peak MiB | plan: weights+AdamW MiB | plan: gradients MiB | plan: activations MiB "
        "| plan: transient MiB | plan total MiB | plan / measured | plan / measured (mmap threshold) "
        "| plan / live | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        above, above_m, live = r["peak_above_base_bytes"], r["mmap_peak_above_base_bytes"], r["live_peak_bytes"]
        ratio = f"{above / full['peak_above_base_bytes']:.2f}" if full else "-"
        lines.append(
            f"| {r['mode']} | {r['peak_rss_bytes'] / mib:.0f} | {above / mib:.0f} | {ratio} | {above_m / mib:.0f} | "
            f"{live / mib:.0f} | {r['plan_held_bytes'] / mib:.0f} | {r['plan_grad_bytes'] / mib:.0f} | "
            f"{r['plan_activation_bytes'] / mib:.0f} | {r['plan_transient_bytes'] / mib:.0f} | "
            f"{r['plan_bytes'] / mib:.0f} | {r['plan_bytes'] / above:.2f} | {r['plan_bytes'] / above_m:.2f} | "
            f"{r['plan_bytes'] / live:.2f} | {r['seconds_per_step']} |"
        )
    plans = []
    if not args.no_full_size:
        lines += [
            "",
            f"The plan for full-size teachers (one process, fp32, batch {args.batch} at the native latent size):",
            "| teacher | mode | weights+AdamW GiB | gradients GiB | activations GiB | transient GiB | total GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, fn, fshape in (
            ("SD1.5 UNet (859.5M)", lambda: _sd_class_unet((320, 640, 1280, 1280), 64), (4, 64, 64)),
            ("SDXL UNet (2567.5M)", _sdxl_unet, (4, 128, 128)),
        ):
            for mode in ("full", "shared", "full-gc", "shared-gc"):
                p = plan_bytes(fn, fshape, mode, args.batch, args.rank_large, args.gan)
                act, tr = p.activation_bytes or 0, p.transient_bytes or 0
                plans.append(
                    {
                        "teacher": name,
                        "mode": mode,
                        "held_bytes": p.held_bytes,
                        "grad_bytes": p.grad_bytes,
                        "activation_bytes": act,
                        "transient_bytes": tr,
                        "total_bytes": p.peak_bytes,
                    }
                )
                lines.append(
                    f"| {name} | {mode} | {p.held_bytes / gib:.2f} | {p.grad_bytes / gib:.2f} | {act / gib:.2f} | "
                    f"{tr / gib:.2f} | {p.peak_bytes / gib:.2f} |"
                )
    print("\n".join(lines))
    out_dir = Path(args.out or "runs/bench/dmd_memory_large")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory_large.json").write_text(json.dumps({"command": command, "rows": rows, "plans": plans}, indent=1))
    return 0


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
    p.add_argument("--large", action="store_true", help="the 142M SD-class UNet against the dry-run plan")
    p.add_argument("--modes", default="full,shared,full-gc,shared-gc", help="--large: modes to measure")
    p.add_argument("--rank-large", type=int, default=32)
    p.add_argument("--gan", action="store_true", help="--large: DMD2 with the GAN head (real latents)")
    p.add_argument("--widths", default=",".join(map(str, LARGE_WIDTHS)), help="--large: the UNet's block widths")
    p.add_argument("--latent-size", type=int, default=LARGE_SHAPE[-1], help="--large: latent height and width")
    p.add_argument("--no-full-size", action="store_true", help="--large: skip the SD1.5 / SDXL plan")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rank = {"digits-dit": args.rank_digits, "sdxl-class": args.rank_sdxl}
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    from fewstep.errors import script_command

    command = script_command("eval/bench_memory.py", argv)
    return cmd_large(args, command) if args.large else cmd_memory(args, command)


if __name__ == "__main__":
    sys.exit(main())
