"""Processes, sharding and precision around the networks of an objective, through accelerate.

Data parallel: every process holds full networks and its slice of the global batch; after each
backward the gradients of the group being updated are averaged over processes (bucketed
all-reduce). fewstep does this itself instead of wrapping networks in DDP because objectives
call one network several times per backward, under `torch.func.jvp`, or only on some phases;
DDP's reducer supports none of that without special modes, while an explicit average is exactly
the data-parallel gradient in every case.

FSDP2 (accelerate's plugin, `fsdp_version: 2`): every network's backbone is sharded with
`fully_shard` through accelerate's `fsdp2_prepare_model` (mixed-precision policy, CPU offload
and wrap policy from the accelerate config), the frozen teacher included; gradients are
reduce-scattered by FSDP itself.

Mixed precision (bf16): each backbone's forward runs under autocast and its output is cast back
to float32, so only the backbone runs in bf16 and everything around it (paths, guidance,
losses) stays float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "make_accelerator",
    "is_fsdp",
    "block_classes",
    "shard_module",
    "wrap_autocast",
    "average_gradients",
    "broadcast_parameters",
    "reduce_mean",
    "grad_norm_and_clip",
]

_TRACKER_CHECKS = {
    "tensorboard": "is_tensorboard_available",
    "wandb": "is_wandb_available",
    "mlflow": "is_mlflow_available",
    "comet_ml": "is_comet_ml_available",
    "aim": "is_aim_available",
    "clearml": "is_clearml_available",
    "dvclive": "is_dvclive_available",
    "swanlab": "is_swanlab_available",
    "trackio": "is_trackio_available",
}


def available_trackers(names: list[str]) -> tuple[list[str], list[str]]:
    """(usable, skipped-because-not-installed); an unknown name is an error naming log.trackers."""
    import accelerate.utils as au

    ok, skipped = [], []
    for n in names:
        if n in ("none", ""):
            continue
        check = _TRACKER_CHECKS.get(n)
        if check is None:
            from ..config import ConfigError

            raise ConfigError(f"log.trackers: unknown tracker {n!r}; known: {', '.join(_TRACKER_CHECKS)}")
        fn = getattr(au, check, None)
        (ok if fn is not None and fn() else skipped).append(n)
    return ok, skipped


def make_accelerator(mixed_precision: str | None, trackers: list[str], project_dir: str):
    """An Accelerator for the run. mixed_precision None takes the launcher's setting."""
    from accelerate import Accelerator

    mp = mixed_precision
    if mp is None:
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if mp == "fp16":
        raise ValueError(
            "precision.mixed_precision=fp16 is not supported (fp16 diverges for score distillation); use bf16"
        )
    if mp not in ("no", "bf16"):
        raise ValueError(f"precision.mixed_precision={mp!r}: expected 'no' or 'bf16'")
    usable, _ = available_trackers(trackers)
    # accelerate keeps one process-wide state; a second run in the same process (tests, the demo)
    # may ask for another precision, so start its per-run part afresh (the process group stays)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mp, log_with=usable or None, project_dir=project_dir)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp2.yaml)"
        )
    return True


def block_classes(module: nn.Module) -> list[str]:
    """Default FSDP wrap units: the family's `fsdp_wrap` (DiT: none, it is sharded as one unit),
    else the model's `_no_split_modules`."""
    from ..families import family_of

    fam = family_of(module)
    if fam is not None and fam.fsdp_wrap is not None:
        return list(fam.fsdp_wrap)
    return list(getattr(module, "_no_split_modules", None) or [])


def shard_module(accelerator, module: nn.Module) -> nn.Module:
    """fully_shard a module in place with accelerate's FSDP2 plugin settings."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model, get_module_class_from_name
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule) or not any(True for _ in module.parameters()):
        return module
    plugin = accelerator.state.fsdp_plugin
    configured = getattr(plugin, "_fewstep_wrap_names", None)
    if configured is None:
        configured = plugin.transformer_cls_names_to_wrap
        plugin._fewstep_wrap_names = configured if configured is not None else "default"
    elif configured == "default":
        configured = None
    names = block_classes(module) if configured is None else list(configured)
    plugin.transformer_cls_names_to_wrap = [n for n in names if get_module_class_from_name(module, n) is not None]
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        # it moves the module to the meta device and reloads rank 0's weights; fewstep builds the same
        # weights on every process, and a module that shares tensors with the teacher must stay put
        plugin.cpu_ram_efficient_loading = False
    return fsdp2_prepare_model(accelerator, module)


def wrap_autocast(module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Run `module.forward` under autocast and return float32 floating outputs (in place; once)."""
    if getattr(module, "_fewstep_autocast", False):
        return
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = inner(*args, **kwargs)
        return _to_fp32(out)

    module.forward = forward
    module._fewstep_autocast = True


def _to_fp32(out: Any) -> Any:
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() and out.dtype in (torch.bfloat16, torch.float16) else out
    if hasattr(out, "sample") and torch.is_tensor(out.sample):
        out.sample = _to_fp32(out.sample)
        return out
    if isinstance(out, tuple):
        return type(out)(_to_fp32(o) for o in out) if not hasattr(out, "_fields") else type(out)(*map(_to_fp32, out))
    if isinstance(out, list):
        return [_to_fp32(o) for o in out]
    if isinstance(out, dict):
        return {k: _to_fp32(v) for k, v in out.items()}
    return out


def _buckets(params: list[nn.Parameter], numel: int = 2**24) -> Iterable[list[nn.Parameter]]:
    cur, size = [], 0
    for p in params:
        cur.append(p)
        size += p.numel()
        if size >= numel:
            yield cur
            cur, size = [], 0
    if cur:
        yield cur


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average .grad over processes. A parameter that has a gradient on any process gets the
    average with zeros where it has none; one that has none anywhere keeps None (as in a single
    process, where the optimizer skips it)."""
    import torch.distributed as dist

    if world_size <= 1 or not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for bucket in _buckets(live):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in bucket])
        dist.all_reduce(flat)
        flat /= world_size
        off = 0
        for p in bucket:
            g = flat[off : off + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += p.numel()


@torch.no_grad()
def broadcast_parameters(modules: list[nn.Module], world_size: int) -> None:
    """Give every process the main process's weights (trainable ones and buffers), so that
    randomly initialised parts (LoRA A, heads) agree before training."""
    import torch.distributed as dist

    if world_size <= 1:
        return
    seen: set[int] = set()
    for m in modules:
        for p in list(m.parameters()) + list(m.buffers()):
            if id(p) in seen or (isinstance(p, nn.Parameter) and not p.requires_grad):
                continue
            seen.add(id(p))
            dist.broadcast(p.data, src=0)


def reduce_mean(value: Tensor | float, accelerator) -> float:
    t = value.detach().float().reshape(()) if torch.is_tensor(value) else torch.tensor(float(value))
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t.to(accelerator.device), reduction="mean")
    return float(t)


def grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> float:
    """Total gradient norm of `params` (before clipping); clips in place when max_norm > 0.
    Works for plain tensors and FSDP2 DTensors alike."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    limit = float(max_norm) if max_norm and max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(grads, limit, error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
