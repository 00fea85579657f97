"""`fewstep export` on the command line."""

from __future__ import annotations

import argparse

from ._common import ExportError
from .folder import export_student

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="a finished run dir (run_card.json, final/) or <run>/checkpoints/step_N"
    )
    p.add_argument("--out", required=True, help="pipeline folder to write (atomically)")
    p.add_argument(
        "--weights",
        choices=["student", "student_ema"],
        default="student",
        help="the raw student weights or the EMA the run kept (default: student)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--teacher", help="the teacher's pipeline folder, instead of the run card's teacher source")
    p.add_argument(
        "--lora",
        choices=["auto", "off", "required"],
        default="auto",
        help="LoRA students: also write the adapter in diffusers' format (default auto: where the "
        "pipeline class loads LoRA)",
    )
    p.add_argument(
        "--eval-results",
        action="append",
        default=[],
        help="a `fewstep eval` results.json to summarise in the card (repeatable; results under the run "
        "dir are found on their own)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the folder to this Hugging Face Hub model repo (owner/name; created if missing) "
        "with huggingface_hub; the token is huggingface_hub's (HF_TOKEN or `hf auth login`)",
    )
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repo private")
    p.add_argument(
        "--link-components",
        action="store_true",
        help="hard-link the teacher's VAE / text encoders instead of copying them (same file system)",
    )
    p.add_argument(
        "--decoder",
        help="a `fewstep distill-decoder` folder: the pipeline's vae becomes that small AutoencoderTiny "
        "(the teacher's full VAE stays in vae_full/); default: the full VAE",
    )


def _restoration_run(checkpoint: str) -> bool:
    """A run of a restoration student (teacher of the image-conditioned family)."""
    import json
    from pathlib import Path

    card = Path(checkpoint) / "run_card.json"
    if not card.is_file():
        return False
    try:
        return json.loads(card.read_text()).get("teacher", {}).get("family") == "restore"
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    import sys

    if _restoration_run(args.checkpoint):  # an LDMSuperResolutionPipeline student: fewstep.restoration
        from ..errors import one_line
        from ..restoration import export_restorer

        try:
            out = export_restorer(args.checkpoint, args.out, weights=args.weights, overwrite=args.overwrite)
        except (ValueError, OSError) as e:
            print(f"fewstep export: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"fewstep export: wrote {out} (LDMSuperResolutionPipeline + DDIMScheduler; see its README.md)")
        return 0
    try:
        if args.private and not args.push_to_hub:
            raise ExportError("--private applies to --push-to-hub REPO; give the repo")
        if args.push_to_hub:
            from .hub import check_repo_id

            check_repo_id(args.push_to_hub)  # before anything is written
        options = ("weights", "overwrite", "teacher", "lora", "eval_results", "link_components", "decoder")
        res = export_student(args.checkpoint, args.out, **{k: getattr(args, k) for k in options})
    except ExportError as e:
        from ..errors import one_line

        print(f"fewstep export: error: {one_line(e)}", file=sys.stderr)
        return 2
    steps = ", ".join(res.card["supported_steps"])
    print(
        f"fewstep export: wrote {res.out} ({res.pipeline_class} + {res.plan.scheduler_class}; "
        f"num_inference_steps {steps}; guidance_scale {res.card['guidance_scale']:g}) in {res.seconds:.1f}s"
    )
    if res.plan.needs_patch:
        print(f"note: {res.plan.needs_patch}")
    if args.push_to_hub:
        from ..errors import one_line
        from .hub import push_to_hub

        if not (res.card.get("teacher") or {}).get("license", {}).get("license"):
            print("note: the teacher's licence is not known, so the card names none; set `license` in README.md")
        try:
            url = push_to_hub(res.out, args.push_to_hub, private=args.private)
        except ExportError as e:
            print(f"fewstep export: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(
            f"fewstep export: pushed {res.out} to {args.push_to_hub} ({'private' if args.private else 'public'}): {url}"
        )
    return 0
