"""What a run leaves behind: the student's final weights (a diffusers model folder with the config
that rebuilds its backbone, LoRA merged; the EMA likewise; the adapter alone), sample grids, the
run card and the one-line summary."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..images import save_grid
from ..samplers import initial_noise, sample
from .ema import EMA
from .lora import lora_meta, lora_only_state_dict, merge_lora_state_dict

__all__ = ["save_final", "backbone_config", "backbone_of", "sample_grid", "run_card", "print_summary"]


def backbone_of(m: nn.Module) -> nn.Module:
    """The network a role runs: a Denoiser's (or role view's) backbone, else the module itself."""
    bb = getattr(m, "backbone", None)
    return bb if isinstance(bb, nn.Module) else m


def backbone_config(bb: nn.Module) -> dict | None:
    """The config that rebuilds `bb` with diffusers (`<_class_name>.from_pretrained(folder)`), or
    None for a backbone that is not a diffusers model."""
    cfg = getattr(bb, "config", None)
    if cfg is None or not hasattr(cfg, "items"):
        return None
    import diffusers

    orig = next((c for c in type(bb).__mro__ if c.__module__.startswith("diffusers.")), type(bb))
    out = {"_class_name": orig.__name__, "_diffusers_version": diffusers.__version__}
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(cfg).items() if not k.startswith("_")})
    return out


def _module_record(bb: nn.Module) -> dict[str, Any]:
    """For a backbone that is not a diffusers model: its class, for the code that rebuilds it."""
    cls = type(bb)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "note": "not a diffusers model: build this class as the training script did, then load "
        "model.safetensors into it",
    }


def save_final(
    run_dir: Path, student: nn.Module, ema: EMA | None, accelerator, folder: str = "student"
) -> dict[str, str]:
    """The student's weights as a diffusers model folder (LoRA merged), its EMA likewise, and the
    LoRA adapters alone. Collective under FSDP."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def grab() -> tuple[nn.Module, dict[str, torch.Tensor]]:
        # a role view (adapter merged) or a second-time student (folded) is saved as a plain copy,
        # made from the weights the student holds now (the EMA's, inside ema.swapped())
        m = student.standalone() if hasattr(student, "standalone") else student
        bb = backbone_of(m)
        state = get_model_state_dict(bb, options=opts)
        return bb, {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    bb, sd = grab()
    sd_ema = None
    if ema is not None:
        with ema.swapped():
            sd_ema = grab()[1]
    if not accelerator.is_main_process:
        return {}
    meta = lora_meta(bb)
    config = backbone_config(bb)
    out = run_dir / "final"
    files = {}

    def write(folder: str, state: dict[str, torch.Tensor]) -> None:
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        plain = merge_lora_state_dict(state, meta["alpha"] / meta["rank"], meta["adapter"]) if meta else state
        if config is not None:
            (d / "config.json").write_text(json.dumps(config, indent=1, default=list))
            save_file(plain, str(d / "diffusion_pytorch_model.safetensors"))
        else:
            (d / "backbone.json").write_text(json.dumps(_module_record(bb), indent=1))
            save_file(plain, str(d / "model.safetensors"))
        files[folder] = str(d.relative_to(run_dir))

    write(folder, sd)
    if sd_ema is not None:
        write(f"{folder}_ema", sd_ema)
    # the student's adapter alone (a shared backbone may also hold other roles' adapters)
    adapter = (
        {
            k.replace(f".{meta['adapter']}.", "."): v
            for k, v in lora_only_state_dict(sd).items()
            if f".{meta['adapter']}." in k
        }
        if meta
        else {}
    )
    if adapter:
        save_file(
            adapter,
            str(out / f"{folder}_lora.safetensors"),
            metadata={
                "rank": str(meta["rank"]),
                "alpha": str(meta["alpha"]),
                "target_modules": json.dumps(meta["targets"]),
            },
        )
        files[f"{folder}_lora"] = str((out / f"{folder}_lora.safetensors").relative_to(run_dir))
    return files


def sample_grid(
    cfg,
    student: nn.Module,
    sampling: dict,
    bundle,
    source,
    run_dir: Path,
    step_done: int,
    main: bool,
    sharded: bool,
    device,
    ema: EMA | None = None,
) -> Path | None:
    """The student's sample grid at `step_done` (with `ema`: under the EMA weights), written by the
    main process (every process samples when the networks are sharded); torch's RNG is left as it was."""
    if not (main or sharded):
        return None
    rng = torch.get_rng_state()
    n = cfg.log.sample_count
    noise = initial_noise((n, *bundle.latent_shape), torch.Generator().manual_seed(cfg.log.sample_seed), device)
    with ema.swapped() if ema is not None else nullcontext():
        x0 = sample(
            student,
            noise,
            source.grid_cond(n),
            sampling["times"],
            renoise=sampling["renoise"],
            generator=torch.Generator().manual_seed(cfg.log.sample_seed + 1),
        )
    torch.set_rng_state(rng)
    if not main:
        return None
    images = bundle.decode(x0) if bundle.decode is not None else x0
    k = source.num_classes
    tag = "_ema" if ema is not None else ""
    return save_grid(
        images, run_dir / "samples" / f"step_{step_done:07d}{tag}.png", nrow=k if k and k <= n and k <= 16 else None
    )


def _jsonable(p: Any) -> dict | None:
    if p is None or not dataclasses.is_dataclass(p):
        return None
    return json.loads(json.dumps(dataclasses.asdict(p), default=str))


def run_card(cfg, params: Any, obj: Any, bundle, family: str | None, **facts: Any) -> dict[str, Any]:
    """The run card (run_card.json): what was trained, from which teacher, how the student samples,
    how long it took, and where its files are. `facts` (all required but `updates`): num_classes,
    steps_done, wall, loop_time (seconds), skipped (non-finite updates), world (processes), sharded,
    mp (mixed precision), files, logs (the last step's), updates (optimizer updates per group)."""
    f = SimpleNamespace(**{"updates": None, **facts})
    from ..config import config_to_dict

    return {
        "name": cfg.name,
        "objective": cfg.objective.name,
        "objective_params": _jsonable(params),
        "teacher": {
            "source": bundle.source,
            "family": family,
            "latent_shape": list(bundle.latent_shape),
            "num_classes": f.num_classes,
            "null_class": bundle.null_class,
        },
        "sampling": {
            "times": [float(t) for t in obj.sampling["times"]],
            "renoise": obj.sampling["renoise"],
            **({"prediction_type": obj.sampling["prediction_type"]} if obj.sampling.get("prediction_type") else {}),
            # the objective's own grids at other step counts (evaluation and export read them)
            **(
                {"times_by_steps": {str(k): [float(t) for t in v] for k, v in obj.sampling["times_by_steps"].items()}}
                if obj.sampling.get("times_by_steps")
                else {}
            ),
        },
        "steps": f.steps_done,
        "steps_planned": cfg.steps,
        "updates": f.updates,  # optimizer updates per group (DMD family: "generator" < steps)
        "batch_size": cfg.data.batch_size,
        "wall_time_s": round(f.wall, 2),
        "train_time_s": round(f.loop_time, 2),
        "nonfinite_skipped": f.skipped,
        "processes": f.world,
        "sharded": f.sharded,
        "mixed_precision": f.mp,
        "lora": {"student": cfg.lora.student, "fake": cfg.lora.fake, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha}
        if (cfg.lora.student or cfg.lora.fake)
        else None,
        "ema_rate": cfg.ema.rate,
        "files": f.files,
        "final_logs": f.logs,
        "config": config_to_dict(cfg),
    }


def print_summary(
    cfg: Any,
    env: Any,
    tr: Any,
    done: int,
    start_step: int,
    wall: float,
    loop_time: float,
    logs: dict[str, float],
    stopped_early: bool,
) -> None:
    """The run's one-line summary on stdout: steps, updates, speed, skipped updates, final losses."""
    its = (done - start_step) / max(loop_time, 1e-9)
    losses = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in logs.items() if k.startswith("loss/"))
    what = "stopped (checkpoint written, resume=latest continues)" if stopped_early else "done"
    ups = ", ".join(f"{g} {n}" for g, n in tr.made.items())
    print(
        f"fewstep train {what}: {cfg.name} [{cfg.objective.name}] {done}/{cfg.steps} steps "
        f"(updates: {ups}) in {wall:.1f}s ({its:.2f} it/s), {tr.skipped} non-finite updates skipped"
        f"{', final ' + losses if losses else ''}; outputs in {env.run_dir}",
        flush=True,
    )
