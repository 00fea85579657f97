"""`precision.compile`: torch.compile of the backbones the run calls (student, fake score, teacher).

Each backbone is compiled in place (`nn.Module.compile`), so its parameters, state-dict keys,
hooks and optimizers are untouched and checkpoints stay interchangeable with eager runs. A backbone
that fails to compile (an operation dynamo cannot trace, no C++ compiler for inductor on CPU, ...)
fails on its first call, not here: that call prints one line naming the backbone and the error and
runs it eagerly from then on, so a run never stops because of compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["compile_backbones", "compile_module"]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")  # "backend raised:"
    return f"{type(e).__name__}: {text[:200]}"


def compile_backbones(
    nets: Iterable[nn.Module],
    mode: str | None = None,
    say: Callable[[str], None] = print,
    backend: str | Callable = "inductor",
) -> list[nn.Module]:
    """Compile each distinct backbone among `nets` (Denoisers, role views, or bare modules) in
    place, with an eager fallback on its first failing call. Returns the backbones compiled."""
    import torch

    from ..objectives.base import unwrap

    done: dict[int, nn.Module] = {}
    for net in nets:
        bb = getattr(unwrap(net), "backbone", None)
        if not isinstance(bb, nn.Module) or id(bb) in done:
            continue
        done[id(bb)] = compile_module(bb, mode, say, backend)
    if done:
        # role switches (shared-base adapters, gradient checkpointing) add guarded variants
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return list(done.values())


def compile_module(
    module: nn.Module,
    mode: str | None = None,
    say: Callable[[str], None] = print,
    backend: str | Callable = "inductor",
) -> nn.Module:
    """Compile one module in place, with the eager fallback on its first failing call."""
    module.compile(mode=mode, backend=backend)
    module._compiled_call_impl = _guarded(module, module._compiled_call_impl, say)
    return module


def _guarded(bb: nn.Module, compiled: Callable, say: Callable[[str], None]) -> Callable:
    name = type(bb).__name__

    from torch._dynamo.exc import TorchDynamoException

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as e:  # tracing or the backend failed (inductor's errors arrive wrapped);
            # anything else, e.g. an exception a hook raises on purpose to stop a pass early, is the model's own
            bb._compiled_call_impl = None  # eager from now on
            say(f"precision.compile: {name} does not compile ({_first_line(e)}); it runs eagerly")
            return bb._call_impl(*args, **kwargs)

    return call
