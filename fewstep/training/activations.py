"""The activation terms of the `--dry-run` memory plan, measured on the meta device (no memory,
no weights read):

- `activation_bytes`: the bytes a backbone keeps for backward during one forward pass with
  gradients. One pass of the backbone through its conditioner (the adapter's own call, so the
  keyword arguments are the family's) runs under `saved_tensors_hooks`, and every distinct storage
  saved for backward that is not a weight is counted once. With activation checkpointing on, a
  checkpointed block saves only its inputs, and the count shows it. The plan adds one such pass at
  the per-process batch: score-distillation objectives run their gradient-recording passes one
  phase at a time, and a phase's backward frees its activations before the next phase starts.
- `transient_bytes`: the peak of the bytes alive during one forward pass without gradients (the
  real score's classifier-free-guidance pass at twice the batch, in DMD): what the pass allocates
  and frees again, on top of what lives across it. `LiveBytes` counts it.

Attention runs as one fused kernel on CPUs and GPUs (`scaled_dot_product_attention` picks flash or
memory-efficient attention there), which keeps the output and its log-sum-exp, never the
batch x heads x queries x keys score matrix; on the meta device the same call decomposes into the
math path, which builds that matrix. Both counts therefore run the call as a fused kernel would
(`FusedAttention`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["FusedAttention", "LiveBytes", "activation_bytes", "example_condition", "transient_bytes"]


def example_condition(bundle: Any, batch: int, device: str | torch.device = "cpu") -> dict | None:
    """A condition of the right shapes for `bundle`'s backbone, where the bundle says enough to
    build one (class labels for class-conditional teachers); else None (the plan then says the
    activations were not estimated)."""
    if getattr(bundle, "num_classes", None) and not getattr(bundle, "text", False):
        return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
    return None


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that ops create while the mode is active, for as long as
    they live: each new storage an op returns adds its size to `current` and a finalizer on the
    storage subtracts it when the storage is freed; `peak` is the largest `current` seen. Views and
    in-place results share a storage already there and add nothing; storages that existed before
    (weights, inputs made outside the mode) are never counted. Works on meta tensors and real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                continue
            key, n = s._cdata, s.nbytes()
            if key in self._live:  # an in-place or out= result (a storage may have been resized)
                self.current += n - self._live[key]
                self._live[key] = n
            else:
                if inputs is None:
                    inputs = {
                        a.untyped_storage()._cdata
                        for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor) and a.layout == torch.strided
                    }
                if key in inputs:  # a view or in-place result of a tensor made before the mode
                    continue
                self._live[key] = n
                self.current += n
                weakref.finalize(s, self._free, key).atexit = False
            self.peak = max(self.peak, self.current)
        return out


class _FusedSDPA(torch.autograd.Function):
    """Scaled dot-product attention as a fused kernel allocates and saves: the output (queries'
    shape, the values' last dimension) and a float32 log-sum-exp per query; backward keeps the
    queries, keys, values, output and log-sum-exp. Shapes only (for the meta device)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dim() == 4:  # (batch, heads, queries, dim) laid out as (batch, queries, heads, dim), as the
            # kernels do: merging the heads afterwards is then a view, not a copy
            out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the plan never runs backward
        raise RuntimeError("the meta-device attention model has no backward")


class FusedAttention(TorchFunctionMode):
    """Runs `scaled_dot_product_attention` on meta tensors as `_FusedSDPA` (what flash and
    memory-efficient attention allocate), not as the math path the meta device falls back to."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
            if q is not None and q.device.type == "meta":
                return _FusedSDPA.apply(q, k, v)
        return func(*args, **kwargs)


def _one_pass(denoiser: Any, latent_shape: tuple[int, ...], batch: int, cond: dict | None, grad: bool, run) -> None:
    """One pass of `denoiser.backbone` at `batch` through its conditioner (a shared-base role view
    with its adapter active), with `run(call)` wrapping the call: with gradients in train mode (some
    backbones checkpoint only in training mode), without in eval mode, as the frozen teacher runs."""
    bb: nn.Module = denoiser.backbone
    shared, role = getattr(denoiser, "shared", None), getattr(denoiser, "role", None)
    p0 = next(bb.parameters())  # the meta device in a dry run (a real teacher: its own device)
    was_training = bb.training
    bb.train(grad)
    if shared is not None:  # a shared-base role view: its adapter takes part, as in the run
        shared.activate(role)
    try:
        c = {k: (v.to(p0.device) if torch.is_tensor(v) else v) for k, v in (cond or {}).items()}

        def call() -> None:
            x = torch.zeros(batch, *latent_shape, device=p0.device, dtype=p0.dtype, requires_grad=grad)
            timestep = torch.full((batch,), 500.0, device=p0.device)
            denoiser.conditioner.call(bb, x, timestep, c)

        with torch.set_grad_enabled(grad), FusedAttention():
            run(call)
    finally:
        bb.train(was_training)
        if shared is not None:
            shared.activate(None)


def activation_bytes(denoiser: Any, latent_shape: tuple[int, ...], batch: int, cond: dict | None) -> int:
    """Bytes saved for backward by one forward pass of `denoiser.backbone` at `batch` (meta
    device; the backbone's own checkpointing setting applies; a shared-base role view runs with
    its adapter active; attention as a fused kernel)."""
    bb: nn.Module = denoiser.backbone
    weights = {p.untyped_storage()._cdata for p in bb.parameters()}
    weights |= {b.untyped_storage()._cdata for b in bb.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in weights:
            saved[s._cdata] = s.nbytes()
        return t

    def run(call) -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            call()

    _one_pass(denoiser, latent_shape, batch, cond, True, run)
    return sum(saved.values())


def transient_bytes(denoiser: Any, latent_shape: tuple[int, ...], batch: int, cond: dict | None) -> int:
    """Peak bytes alive during one forward pass of `denoiser.backbone` without gradients at
    `batch` (its input and condition included, the weights not), counted by `LiveBytes` (meta
    device; attention as a fused kernel)."""
    live = LiveBytes()

    def run(call) -> None:
        with live:
            call()

    _one_pass(denoiser, latent_shape, batch, cond, False, run)
    return live.peak
