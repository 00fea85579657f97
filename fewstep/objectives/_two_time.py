"""A second time input for a teacher-architecture backbone, zero-initialised, that folds back into
the stock architecture for export.

BOOT conditions its student on the trajectory time s it should jump to; TwinFlow conditions its
one network on the current time t and a target time r. Neither is an input of a diffusers
backbone, so the second time enters where the first does, in the time embedding:

    TimestepEmbedding.linear_1(phi(timestep))  ->  linear_1(phi(timestep)) + W (phi(a) - phi(b))

phi is the backbone's own sinusoidal projection (`time_proj`), W a new bias-free Linear of the
same shape as linear_1, initialised to zero, so the extended network starts as the teacher. The
pair (a, b) of native timesteps depends on the mode:

    "trajectory" (BOOT)  a = timestep(s), b = timestep(1)             zero at s = 1 (the boundary)
    "gap" (TwinFlow)     a = timestep(t) - timestep(r), b = 0         zero at r = t (plain flow)

Export folds the added term at the student's sampling setting (target 0) into linear_1, so the
saved backbone is the teacher's class with the teacher's config:

    trajectory, s = 0    bias   += W (phi(timestep(0)) - phi(timestep(1)))
    gap, r = 0           weight += W, bias -= W phi(0)     (a = timestep(t) - timestep(0) = timestep(t))

Where the time embedding sits is a fact of the backbone family: the family record's
`time_embedding` lists every TimestepEmbedding fed the timestep with its projection (DiT has one
per block). A backbone of no known family, or of a family without one, cannot take a second time
(`install` raises, naming the key). Every listed embedder is extended, all reading one shared
state, set per call by `TwoTimeDenoiser`.

Activation checkpointing would recompute the embedding in backward with whatever state is set
then; the objectives refuse it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..denoiser import Denoiser
from ..paths import _as_t, _fp

__all__ = ["MODES", "TwoTimeDenoiser", "fold", "install", "is_installed", "time_embedders"]

MODES = ("trajectory", "gap")
_ATTR = "_fewstep_second_time"


class _State:
    """The (a, b) native timesteps of the current call, (B,) each, or None (term off)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.a: Tensor | None = None
        self.b: Tensor | None = None


class SecondTimeLinear(nn.Module):
    """linear_1 of a TimestepEmbedding plus W (phi(a) - phi(b)); W starts at zero."""

    def __init__(self, base: nn.Module, proj: nn.Module, state: _State):
        super().__init__()
        self.base = base
        lin = getattr(base, "base_layer", base)  # a peft LoRA layer keeps the Linear inside
        self.extra = nn.Linear(lin.in_features, lin.out_features, bias=False).to(lin.weight.device, lin.weight.dtype)
        nn.init.zeros_(self.extra.weight)
        object.__setattr__(self, "_proj", proj)  # the parent's time_proj (no weights): not a submodule here
        object.__setattr__(self, "_state", state)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        st = self._state
        if st.a is None:
            return out
        a, b = st.a, st.b
        n = x.shape[0]
        if n % a.shape[0]:
            raise RuntimeError(f"second time: batch {n} is not a multiple of the {a.shape[0]} second times")
        reps = n // a.shape[0]  # classifier-free guidance runs [cond; uncond] as one batch
        feat = self._proj(a.repeat(reps).to(x.device)) - self._proj(b.repeat(reps).to(x.device))
        return out + self.extra(feat.to(x.dtype))


def time_embedders(backbone: nn.Module) -> list[tuple[nn.Module, str, nn.Module]] | None:
    """(TimestepEmbedding, "linear_1", time_proj) of every embedding of the backbone's timestep,
    from its family record; None when the family has no such record."""
    from ..families import family_of

    fam = family_of(backbone)
    if fam is None or fam.time_embedding is None:
        return None
    return [(emb, "linear_1", proj) for emb, proj in fam.time_embedding(backbone)]


def is_installed(backbone: nn.Module) -> bool:
    return getattr(backbone, _ATTR, None) is not None


def install(backbone: nn.Module, mode: str, key: str = "teacher.source") -> _State:
    """Extend every time embedding of `backbone` in place (see the module docstring). Raises a
    ValueError naming `key` when the backbone has no time embedding that can take a second time."""
    if mode not in MODES:
        raise ValueError(f"second time: mode must be one of {MODES}, got {mode!r}")
    if is_installed(backbone):
        st = getattr(backbone, _ATTR)
        if st.mode != mode:
            raise ValueError(f"second time: already installed in mode {st.mode!r}, not {mode!r}")
        return st
    found = time_embedders(backbone)
    if not found:
        from ..families import all_families

        able = [f.name for f in all_families() if f.time_embedding is not None]
        raise ValueError(
            f"{key}: the teacher's backbone {type(backbone).__name__} has no time embedding that can "
            f"take a second time (its family record names none; families with one: {', '.join(able)})"
        )
    state = _State(mode)
    for emb, attr, proj in found:
        setattr(emb, attr, SecondTimeLinear(getattr(emb, attr), proj, state))
    object.__setattr__(backbone, _ATTR, state)
    return state


@contextmanager
def second_time(backbone: nn.Module, a: Tensor | None, b: Tensor | None) -> Iterator[None]:
    st: _State = getattr(backbone, _ATTR)
    old = st.a, st.b
    st.a, st.b = a, b
    try:
        yield
    finally:
        st.a, st.b = old


def fold(backbone: nn.Module, path) -> nn.Module:
    """A copy of an extended backbone with the second-time term folded into linear_1 at the
    sampling setting (target time 0): the teacher's own class, keys and config."""
    st: _State = getattr(backbone, _ATTR)
    bb = copy.deepcopy(backbone)
    t0, t1 = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    ts0, ts1 = float(path.timestep(t0)), float(path.timestep(t1))
    if st.mode == "gap" and ts0 != 0.0:
        raise ValueError(f"second time: the path's timestep at t=0 is {ts0}, not 0; the gap cannot be folded")
    with torch.no_grad():
        for emb in [m for m in bb.modules() if isinstance(getattr(m, "linear_1", None), SecondTimeLinear)]:
            wrap: SecondTimeLinear = emb.linear_1
            lin = getattr(wrap.base, "base_layer", wrap.base)
            if lin.bias is None:
                raise ValueError("second time: the time embedding's linear_1 has no bias to fold into")
            w = wrap.extra.weight.to(torch.float64)
            dev = w.device
            if st.mode == "trajectory":
                feat = wrap._proj(torch.tensor([ts0], device=dev)) - wrap._proj(torch.tensor([ts1], device=dev))
                lin.bias.add_((feat.to(torch.float64) @ w.T)[0].to(lin.bias.dtype))
            else:
                lin.weight.add_(w.to(lin.weight.dtype))
                feat = wrap._proj(torch.zeros(1, device=dev)).to(torch.float64)
                lin.bias.sub_((feat @ w.T)[0].to(lin.bias.dtype))
            emb.linear_1 = wrap.base
    object.__setattr__(bb, _ATTR, None)
    return bb


class TwoTimeDenoiser(Denoiser):
    """A Denoiser over an extended backbone. Called like any Denoiser it runs the sampling setting
    (target time 0), so the samplers, the entry point's grids and evaluation use it unchanged;
    objectives pass `target` (continuous times (B,) or a float) and, for TwinFlow's negative-time
    branch, `sign=-1` (the backbone is fed -timestep(t); the path maths use t itself).

    `standalone()` returns a plain Denoiser with the term folded in (what the entry point saves)."""

    def __init__(self, backbone: nn.Module, path, conditioner, mode: str, key: str = "teacher.source"):
        super().__init__(backbone, path, conditioner)
        install(backbone, mode, key)
        self.mode = mode
        self._target: Tensor | float | None = None
        self._sign = 1.0

    def forward(
        self,
        x_t: Tensor,
        t,
        cond: Cond | None = None,
        guidance=1.0,
        output: str = "x0",
        target: Tensor | float | None = None,
        sign: Tensor | float = 1.0,
    ):
        """target: the second time (continuous, (B,) or a float; None: 0, the sampling setting);
        sign: +1, or -1 for TwinFlow's negative-time branch, per sample (B,) or for all."""
        self._target, self._sign = target, sign
        try:
            return super().forward(x_t, t, cond, guidance, output)
        finally:
            self._target, self._sign = None, 1.0

    @staticmethod
    def _per_sample(v: Tensor | float, like: Tensor) -> Tensor:
        """A float or (B,) tensor as a (N,) tensor like `like` (N a multiple of B: CFG batches)."""
        v = _as_t(v, like) if not torch.is_tensor(v) or v.ndim == 0 else v.to(like)
        return v.repeat(like.shape[0] // v.shape[0]) if v.shape[0] != like.shape[0] else v

    def _pair(self, tt: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor]:
        r = self._per_sample(0.0 if self._target is None else self._target, timestep)
        ts_r = _fp(self.path.timestep(r))
        if self.mode == "trajectory":
            return ts_r, _fp(self.path.timestep(torch.ones_like(r)))
        gap = _fp(self.path.timestep(tt)) - ts_r
        return gap * self._per_sample(self._sign, gap), torch.zeros_like(gap)

    def output(self, x_t: Tensor, t, cond: Cond | None = None) -> Tensor:
        tt = _as_t(t, x_t)
        self.conditioner.check(cond, x_t.shape[0])
        timestep = _fp(self.path.timestep(tt))
        a, b = self._pair(tt, timestep)
        with second_time(self.backbone, a, b):
            out = self.conditioner.call(
                self.backbone, x_t.to(self.dtype), timestep * self._per_sample(self._sign, timestep), cond
            )
        if out.shape != x_t.shape:
            raise ValueError(f"backbone output shape {tuple(out.shape)} does not match input {tuple(x_t.shape)}")
        return _fp(out)

    def standalone(self) -> Denoiser:
        bb = fold(self.backbone, self.path)
        bb.requires_grad_(False)
        return Denoiser(bb, self.path, self.conditioner)
