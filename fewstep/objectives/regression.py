"""Teacher samples made once and cached on disk: DMD's regression pairs and the teacher's latent
statistics for Decoupled DMD's mean/variance regulariser.

    key = sample_key(teacher_fingerprint(teacher), times=..., guidance=..., n=..., ...)
    noise, y, cond = cached_teacher_samples(teacher, key, conds, n, latent_shape, times, guidance, ...)

A cache file is safetensors (`teacher_samples_<key>.safetensors`) holding the noise, the teacher's
deterministic multi-step CFG samples and the conditions; the key hashes the teacher's weights and
every sampler setting, so a changed teacher or sampler never reads a stale file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..conditioning import Cond, index_cond
from ..samplers import sample

__all__ = [
    "teacher_fingerprint",
    "sample_key",
    "cached_teacher_samples",
    "pool_conditions",
    "teacher_sample_set",
    "channel_stats",
    "channel_gaussian_kl",
]


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def teacher_fingerprint(denoiser: Any, skip: Callable[[str], bool] = lambda n: "lora_" in n) -> str:
    """sha256 of a teacher's backbone weights and buffers (names, shapes, dtypes, bytes) plus its
    path settings. Adapter weights (names with "lora_") are skipped: they are not the teacher."""
    h = hashlib.sha256()
    bb = denoiser.backbone
    path = denoiser.path
    h.update(f"{type(bb).__name__}|{type(path).__name__}|{path.prediction_type}".encode())
    for attr in ("shift", "sigma_d"):
        if hasattr(path, attr):
            h.update(f"{attr}={getattr(path, attr)}".encode())
    if hasattr(path, "alphas_cumprod"):
        h.update(_tensor_bytes(path.alphas_cumprod))
    for name, t in sorted(bb.state_dict().items()):
        if skip(name):
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _cond_digest(cond: Cond | None) -> str:
    h = hashlib.sha256()
    for k in sorted(cond or {}):
        v = cond[k]
        h.update(k.encode())
        h.update(_tensor_bytes(v) if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()


def sample_key(fingerprint: str, cond: Cond | None, **settings: Any) -> str:
    """A short key for teacher samples: teacher fingerprint + conditions + sampler settings."""
    blob = json.dumps({"teacher": fingerprint, "cond": _cond_digest(cond), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def cached_teacher_samples(
    teacher: Callable,
    key: str,
    cond: Cond | None,
    n: int,
    latent_shape: Sequence[int],
    times: Sequence[float],
    guidance: float,
    seed: int,
    cache_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> tuple[Tensor, Tensor, Cond | None]:
    """(noise, samples, cond) for n pairs, read from `cache_dir` or made and written there.

    Args:
        teacher: the teacher Denoiser (or a role view of it), called with CFG `guidance`.
        cond:    n conditions (batched dict) or None.
        times:   the teacher's sampling times (deterministic DDIM / Euler: `renoise="ddim"`).
    Returns CPU float32 noise (n, *latent_shape) and samples, and the conditions on the CPU.
    """
    path = Path(cache_dir) / f"teacher_samples_{key}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.exists():
        data = load_file(str(path))
        c = {k[5:]: v for k, v in data.items() if k.startswith("cond.")}
        if data["noise"].shape[0] != n:
            raise ValueError(f"cache file {path} holds {data['noise'].shape[0]} pairs, expected {n}; delete it")
        return data["noise"], data["samples"], (c or None)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *latent_shape), generator=g, dtype=torch.float32)
    out = []
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        cb = index_cond(cond, idx)
        cb = None if cb is None else {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cb.items()}
        out.append(sample(teacher, noise[idx].to(device), cb, times, guidance=guidance, renoise="ddim").float().cpu())
    samples = torch.cat(out)
    tensors = {"noise": noise.contiguous(), "samples": samples.contiguous()}
    for k, v in (cond or {}).items():
        if torch.is_tensor(v):
            tensors["cond." + k] = v.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(
        tensors,
        str(tmp),
        metadata={"key": key, "n": str(n), "guidance": str(guidance), "times": json.dumps([float(t) for t in times])},
    )
    os.replace(tmp, path)  # atomic: several processes may write the same file
    return noise, samples, cond


def pool_conditions(cond: Cond | None, n: int, num_classes: int | None) -> Cond | None:
    """n conditions for a set of teacher samples, on the CPU: balanced labels 0..num_classes-1 for
    class-conditional teachers, else a batch's conditions `cond` tiled (None stays None)."""
    if num_classes:
        return {"class_labels": torch.arange(n) % int(num_classes)}
    if cond is None:
        return None
    b = next(v.shape[0] for v in cond.values() if torch.is_tensor(v) and v.ndim > 0)
    idx = torch.arange(n) % b
    return {k: (v.detach().cpu()[idx] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}


def teacher_sample_set(
    teacher: Any,
    teacher_key: str | None,
    cond: Cond | None,
    *,
    n: int,
    steps: int,
    guidance: float,
    tag: str,
    seed: int,
    latent_shape: Sequence[int],
    cache_dir: str | os.PathLike,
    device: torch.device | str,
) -> tuple[Tensor, Tensor, Cond | None]:
    """`cached_teacher_samples` for n conditions with the teacher's own `steps`-step sampling
    times (deterministic), keyed by the teacher's fingerprint, the conditions and these settings."""
    times = [float(t) for t in teacher.path.sampling_times(steps)]
    key = sample_key(
        teacher_key or "unknown",
        cond,
        tag=tag,
        n=n,
        times=times,
        guidance=guidance,
        renoise="ddim",
        shape=tuple(latent_shape),
        seed=seed,
    )
    return cached_teacher_samples(teacher, key, cond, n, latent_shape, times, guidance, seed, cache_dir, device=device)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of (B, C, ...) latents over every axis but C."""
    dims = [0] + list(range(2, x.ndim))
    x = x.float()
    return x.mean(dims), x.var(dims, unbiased=False)


def channel_gaussian_kl(x: Tensor, mean_ref: Tensor, var_ref: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean over channels of KL(N(mu_c, var_c) || N(mean_ref_c, var_ref_c)), with mu_c, var_c the
    per-channel statistics of x (B, C, ...): the mean/variance regulariser of Decoupled DMD.

    Generic maths kept here until it moves to `_maths.py`."""
    mu, var = channel_stats(x)
    var = var + eps
    vr = var_ref.to(var) + eps
    kl = 0.5 * (torch.log(vr / var) + (var + (mu - mean_ref.to(mu)) ** 2) / vr - 1.0)
    return kl.mean()
