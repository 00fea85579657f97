"""Per-family conditioning: how a diffusers backbone is called, what its unconditional inputs
are, and how its output is read. The `Denoiser` holds one of these; nothing else in fewstep
knows a backbone's keyword arguments.

A condition is a dict of tensors whose first dimension is the batch (e.g. ``{"class_labels":
(B,)}``, ``{"encoder_hidden_states": (B, L, D)}``); values that are not tensors are passed as
they are. ``null(cond)`` returns the unconditional counterpart used by classifier-free
guidance.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

Cond = dict[str, Any]

__all__ = [
    "Cond",
    "Conditioner",
    "ClassConditioner",
    "UNetTextConditioner",
    "PixArtConditioner",
    "SD3Conditioner",
    "FluxConditioner",
    "cat_cond",
    "index_cond",
    "conditioner_for",
]


def cat_cond(*conds: Cond) -> Cond:
    """Concatenate conditions along the batch dimension (tensors) or keep shared values."""
    out: Cond = {}
    for k in conds[0]:
        v = conds[0][k]
        out[k] = torch.cat([c[k] for c in conds], 0) if torch.is_tensor(v) and v.ndim > 0 else v
    return out


def index_cond(cond: Cond | None, idx) -> Cond | None:
    """Select samples of a batched condition (for subsets of a batch)."""
    if cond is None:
        return None
    return {k: (v[idx] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}


def _bsize(cond: Cond | None) -> int | None:
    for v in (cond or {}).values():
        if torch.is_tensor(v) and v.ndim > 0:
            return v.shape[0]
    return None


def _expand_null(null: Tensor, batch: int) -> Tensor:
    return null.expand(batch, *null.shape[1:]) if null.shape[0] == 1 else null


class Conditioner:
    """Base: `call` runs the backbone; `null` gives unconditional inputs."""

    # True where guidance is an input of the network (guidance-distilled Flux), not CFG.
    guidance_embedded: bool = False

    def call(self, backbone: nn.Module, x: Tensor, timestep: Tensor, cond: Cond | None) -> Tensor:
        raise NotImplementedError

    def null(self, cond: Cond | None, batch: int) -> Cond | None:
        raise NotImplementedError

    def check(self, cond: Cond | None, batch: int) -> None:
        """Raise a clear error for a condition that does not fit the backbone."""
        b = _bsize(cond)
        if b is not None and b != batch:
            raise ValueError(f"condition batch size {b} does not match x batch size {batch}")


def _learned_sigma_split(out: Tensor, in_channels: int) -> Tensor:
    # DiT / PixArt with learned variance output 2C channels; the mean is the first C.
    return out[:, :in_channels] if out.shape[1] == 2 * in_channels else out


class ClassConditioner(Conditioner):
    """Class-conditional `DiTTransformer2DModel` and `UNet2DModel` (or unconditional ones).

    null_class: the label used for the unconditional branch (DiT: num_embeds_ada_norm, which
    is 1000 in `DiTPipeline`; a class-conditional UNet2DModel needs one reserved class).
    """

    def __init__(self, null_class: int | None = None, in_channels: int | None = None, kind: str = "dit"):
        self.null_class = null_class
        self.in_channels = in_channels
        self.kind = kind

    def call(self, backbone, x, timestep, cond):
        labels = None if cond is None else cond.get("class_labels")
        if self.kind == "dit":
            if labels is None:
                raise ValueError("DiT backbone needs cond={'class_labels': LongTensor (B,)}")
            out = backbone(x, timestep=timestep, class_labels=labels).sample
        else:  # UNet2DModel
            out = backbone(x, timestep, class_labels=labels).sample
        return _learned_sigma_split(out, self.in_channels or x.shape[1])

    def null(self, cond, batch):
        if self.null_class is None:
            raise ValueError("classifier-free guidance needs a null class: this backbone has none "
                             "(set null_class, or use guidance 1)")
        ref = cond["class_labels"]
        return {**cond, "class_labels": torch.full_like(ref, self.null_class)}


class UNetTextConditioner(Conditioner):
    """`UNet2DConditionModel` (SD1.5/SD2: text embeddings; SDXL: + pooled text_embeds, time_ids).

    null_embeds: (1, L, D) encoding of the empty prompt (SD1.5/SD2 practice); for SDXL, DMD2 and
    LCM-LoRA-SDXL use zeros for both the prompt and pooled embeddings (`zero_null=True`), and the
    time ids stay as they are. A `timestep_cond` entry (the LCM guidance embedding) is passed on.
    """

    def __init__(self, null_embeds: Tensor | None = None, null_pooled: Tensor | None = None,
                 zero_null: bool = False):
        self.null_embeds = null_embeds
        self.null_pooled = null_pooled
        self.zero_null = zero_null

    def call(self, backbone, x, timestep, cond):
        if cond is None or "encoder_hidden_states" not in cond:
            raise ValueError("UNet2DConditionModel needs cond={'encoder_hidden_states': (B, L, D), ...}")
        dt = x.dtype
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"].to(dt), "time_ids": cond["time_ids"].to(dt)}
        kw = {}
        if cond.get("timestep_cond") is not None:
            kw["timestep_cond"] = cond["timestep_cond"].to(dt)
        return backbone(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
                        added_cond_kwargs=added, **kw).sample

    def null(self, cond, batch):
        out = dict(cond)
        ehs = cond["encoder_hidden_states"]
        if self.zero_null or self.null_embeds is None:
            out["encoder_hidden_states"] = torch.zeros_like(ehs)
        else:
            out["encoder_hidden_states"] = _expand_null(self.null_embeds.to(ehs), batch)
        if "text_embeds" in cond:
            te = cond["text_embeds"]
            if self.zero_null or self.null_pooled is None:
                out["text_embeds"] = torch.zeros_like(te)
            else:
                out["text_embeds"] = _expand_null(self.null_pooled.to(te), batch)
        return out


class PixArtConditioner(Conditioner):
    """`PixArtTransformer2DModel`: T5 embeddings with an attention mask; learned-sigma output.
    PixArt-alpha at 1024 also takes resolution / aspect_ratio (added_cond_kwargs)."""

    def __init__(self, null_embeds: Tensor | None = None, null_mask: Tensor | None = None,
                 in_channels: int | None = None):
        self.null_embeds = null_embeds
        self.null_mask = null_mask
        self.in_channels = in_channels

    def call(self, backbone, x, timestep, cond):
        if cond is None or "encoder_hidden_states" not in cond:
            raise ValueError("PixArt needs cond={'encoder_hidden_states': (B, L, D), 'encoder_attention_mask': (B, L)}")
        dt = x.dtype
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        if added["resolution"] is not None:
            added = {k: v.to(dt) for k, v in added.items()}
        out = backbone(x, encoder_hidden_states=cond["encoder_hidden_states"].to(dt), timestep=timestep,
                       added_cond_kwargs=added, encoder_attention_mask=cond.get("encoder_attention_mask")).sample
        return _learned_sigma_split(out, self.in_channels or x.shape[1])

    def null(self, cond, batch):
        if self.null_embeds is None:
            raise ValueError("PixArt guidance needs the encoding of the empty prompt (null_embeds)")
        out = dict(cond)
        out["encoder_hidden_states"] = _expand_null(self.null_embeds.to(cond["encoder_hidden_states"]), batch)
        if self.null_mask is not None:
            out["encoder_attention_mask"] = _expand_null(self.null_mask.to(cond["encoder_attention_mask"]), batch)
        return out


class SD3Conditioner(Conditioner):
    """`SD3Transformer2DModel`: joint text embeddings + pooled projections; timestep = 1000 t."""

    def __init__(self, null_embeds: Tensor | None = None, null_pooled: Tensor | None = None):
        self.null_embeds = null_embeds
        self.null_pooled = null_pooled

    def call(self, backbone, x, timestep, cond):
        if cond is None or "encoder_hidden_states" not in cond or "pooled_projections" not in cond:
            raise ValueError("SD3 needs cond={'encoder_hidden_states': (B, L, D), 'pooled_projections': (B, P)}")
        dt = x.dtype
        return backbone(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
                        pooled_projections=cond["pooled_projections"].to(dt), timestep=timestep).sample

    def null(self, cond, batch):
        out = dict(cond)
        ehs, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        out["encoder_hidden_states"] = (torch.zeros_like(ehs) if self.null_embeds is None
                                        else _expand_null(self.null_embeds.to(ehs), batch))
        out["pooled_projections"] = (torch.zeros_like(pooled) if self.null_pooled is None
                                     else _expand_null(self.null_pooled.to(pooled), batch))
        return out


class FluxConditioner(Conditioner):
    """`FluxTransformer2DModel`: latents are packed into 2x2 patches around the call (the rest of
    fewstep sees (B, C, H, W)); the network is fed t in [0, 1] (the pipeline divides the
    scheduler's timestep by 1000); Flux-dev is guidance-distilled: the guidance scale is an
    input (`guidance_embedded`), not a second pass."""

    def __init__(self, guidance_embeds: bool = True, timestep_scale: float = 1000.0):
        self.guidance_embedded = guidance_embeds
        self.timestep_scale = timestep_scale

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, h: int, w: int) -> Tensor:
        b, n, d = x.shape
        c = d // 4
        x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> Tensor:
        ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        return ids.reshape(-1, 3)

    def call(self, backbone, x, timestep, cond):
        if cond is None or "encoder_hidden_states" not in cond or "pooled_projections" not in cond:
            raise ValueError("Flux needs cond={'encoder_hidden_states': (B, L, D), 'pooled_projections': (B, P)}")
        b, c, h, w = x.shape
        dt = x.dtype
        ehs = cond["encoder_hidden_states"].to(dt)
        txt_ids = torch.zeros(ehs.shape[1], 3, device=x.device, dtype=dt)
        kw = {}
        if self.guidance_embedded:
            g = cond.get("guidance")
            if g is None:
                g = torch.full((b,), 3.5, device=x.device)
            kw["guidance"] = torch.as_tensor(g, device=x.device, dtype=torch.float32).expand(b)
        out = backbone(hidden_states=self.pack(x), encoder_hidden_states=ehs,
                       pooled_projections=cond["pooled_projections"].to(dt),
                       timestep=timestep / self.timestep_scale, img_ids=self.image_ids(h, w, x.device, dt),
                       txt_ids=txt_ids, **kw).sample
        return self.unpack(out, h, w)

    def null(self, cond, batch):
        raise ValueError("this Flux teacher is guidance-distilled: pass its guidance as an input "
                         "(cond['guidance']) and use guidance 1, there is no unconditional branch")


def conditioner_for(backbone: nn.Module, **kwargs) -> Conditioner:
    """Pick the conditioner for a diffusers backbone by its class."""
    name = type(backbone).__name__
    cfg = getattr(backbone, "config", {})
    if name == "DiTTransformer2DModel":
        return ClassConditioner(null_class=kwargs.get("null_class", cfg.get("num_embeds_ada_norm")),
                                in_channels=cfg.get("in_channels"), kind="dit")
    if name == "UNet2DModel":
        return ClassConditioner(null_class=kwargs.get("null_class"), in_channels=cfg.get("in_channels"),
                                kind="unet")
    if name == "UNet2DConditionModel":
        return UNetTextConditioner(kwargs.get("null_embeds"), kwargs.get("null_pooled"),
                                   kwargs.get("zero_null", False))
    if name == "PixArtTransformer2DModel":
        return PixArtConditioner(kwargs.get("null_embeds"), kwargs.get("null_mask"), cfg.get("in_channels"))
    if name == "SD3Transformer2DModel":
        return SD3Conditioner(kwargs.get("null_embeds"), kwargs.get("null_pooled"))
    if name == "FluxTransformer2DModel":
        return FluxConditioner(guidance_embeds=bool(cfg.get("guidance_embeds", False)))
    raise ValueError(f"no conditioner for backbone class {name}: supported are DiTTransformer2DModel, "
                     "UNet2DModel, UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel, "
                     "FluxTransformer2DModel")
