"""Per-family conditioning: how a diffusers backbone is called, what its unconditional inputs
are, and how its output is read. The `Denoiser` holds one of these; nothing else in fewstep
knows a backbone's keyword arguments.

A condition is a dict of tensors whose first dimension is the batch (e.g. ``{"class_labels":
(B,)}``, ``{"encoder_hidden_states": (B, L, D)}``); values that are not tensors are passed as
they are. ``null(cond)`` returns the unconditional counterpart used by classifier-free
guidance.
"""

from __future__ import annotations

from typing import Any

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
    if null.shape[0] not in (1, batch):
        raise ValueError(f"null conditioning has batch size {null.shape[0]}: it must be 1 or the batch size {batch}")
    return null.expand(batch, *null.shape[1:]) if null.shape[0] == 1 else null


def _need(cond: Cond | None, keys: tuple[str, ...], family: str, usage: str) -> Cond:
    """Raise an error naming the missing keys and the expected condition of a family."""
    missing = [k for k in keys if cond is None or cond.get(k) is None]
    if missing:
        raise ValueError(f"{family} backbone: condition is missing {missing}; it needs cond={usage}")
    return cond  # type: ignore[return-value]


def _check_dim(cond: Cond, key: str, ndim: int, last: int | None, family: str) -> None:
    v = cond[key]
    if not torch.is_tensor(v) or v.ndim != ndim or (last is not None and v.shape[-1] != last):
        want = f"{ndim}-D" + (f" with last dimension {last}" if last is not None else "")
        got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ValueError(f"{family} backbone: cond[{key!r}] must be a {want} tensor, got shape {got}")


def _null_like(null: Tensor | None, ref: Tensor, batch: int, key: str, family: str) -> Tensor:
    """The stored null embedding, on ref's device/dtype, expanded to the batch, with a clear error
    when its shape does not match the condition's (e.g. a different text length)."""
    if null is None:
        raise ValueError(
            f"{family} guidance needs the null conditioning for {key!r} (the encoding of the "
            "empty prompt): give it to the conditioner, or use guidance 1"
        )
    if tuple(null.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(
            f"{family}: null {key!r} has shape {tuple(null.shape[1:])} per sample but the "
            f"condition has {tuple(ref.shape[1:])}: encode both with the same text length"
        )
    return _expand_null(null.to(ref), batch)


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
        if labels is not None and (not torch.is_tensor(labels) or labels.ndim != 1 or labels.is_floating_point()):
            got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"cond['class_labels'] must be an integer tensor of shape (B,), got {got}")
        if self.kind == "dit":
            if labels is None:
                raise ValueError("DiT backbone needs cond={'class_labels': LongTensor (B,)}")
            out = backbone(x, timestep=timestep, class_labels=labels).sample
        else:  # UNet2DModel
            out = backbone(x, timestep, class_labels=labels).sample
        return _learned_sigma_split(out, self.in_channels or x.shape[1])

    def null(self, cond, batch):
        if self.null_class is None:
            raise ValueError(
                "classifier-free guidance needs a null class: this backbone has none "
                "(set null_class, or use guidance 1)"
            )
        _need(cond, ("class_labels",), "class-conditional", "{'class_labels': LongTensor (B,)}")
        ref = cond["class_labels"]
        return {**cond, "class_labels": torch.full_like(ref, self.null_class)}


class _PromptNullConditioner(Conditioner):
    """A text family whose null condition is the encoding of the empty prompt (prompt embeddings
    `null_embeds` (1, L, D) and pooled ones `null_pooled` (1, P)), or zeros with `zero_null=True`."""

    def __init__(self, null_embeds: Tensor | None = None, null_pooled: Tensor | None = None, zero_null: bool = False):
        self.null_embeds = null_embeds
        self.null_pooled = null_pooled
        self.zero_null = zero_null

    def _null_entry(self, key: str, value: Tensor, null: Tensor | None, batch: int) -> Tensor:
        """The null of cond[key] (prompt or pooled embeddings): zeros, or `null` expanded to the batch."""
        return torch.zeros_like(value) if self.zero_null else _null_like(null, value, batch, key, self.family)


class UNetTextConditioner(_PromptNullConditioner):
    """`UNet2DConditionModel` (SD1.5/SD2: text embeddings; SDXL: + pooled text_embeds, time_ids).

    cond: {"encoder_hidden_states": (B, L, D)}, plus for SDXL ("text_time" added conditions)
    "text_embeds": (B, P) pooled embeddings and "time_ids": (B, 6) (original size, crop top-left,
    target size, in pixels). A "timestep_cond" entry (the LCM guidance embedding) is passed on.

    Null conditioning for guidance: null_embeds (1, L, D) (and null_pooled (1, P) for SDXL) is the
    encoding of the empty prompt (SD1.5/SD2 practice); `zero_null=True` uses zeros for both the
    prompt and pooled embeddings (SDXL's `force_zeros_for_empty_prompt`, what DMD2 and
    LCM-LoRA-SDXL use). The time ids stay as they are, as in the SDXL pipeline.
    """

    family = "UNet2DConditionModel"
    usage = "{'encoder_hidden_states': (B, L, D)} (+ 'text_embeds': (B, P), 'time_ids': (B, 6) for SDXL)"

    def call(self, backbone, x, timestep, cond):
        cfg = backbone.config
        _need(cond, ("encoder_hidden_states",), self.family, self.usage)
        _check_dim(cond, "encoder_hidden_states", 3, _cross_dim(cfg), self.family)
        dt = x.dtype
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            _need(cond, ("text_embeds", "time_ids"), "SDXL " + self.family, self.usage)
            added = {"text_embeds": cond["text_embeds"].to(dt), "time_ids": cond["time_ids"].to(dt)}
        kw = {}
        if cond.get("timestep_cond") is not None:
            kw["timestep_cond"] = cond["timestep_cond"].to(dt)
        return backbone(
            x, timestep, encoder_hidden_states=cond["encoder_hidden_states"].to(dt), added_cond_kwargs=added, **kw
        ).sample

    def null(self, cond, batch):
        _need(cond, ("encoder_hidden_states",), self.family, self.usage)
        out = dict(cond)
        ehs = cond["encoder_hidden_states"]
        out["encoder_hidden_states"] = self._null_entry("encoder_hidden_states", ehs, self.null_embeds, batch)
        if cond.get("text_embeds") is not None:
            out["text_embeds"] = self._null_entry("text_embeds", cond["text_embeds"], self.null_pooled, batch)
        return out


def _cross_dim(cfg) -> int | None:
    d = cfg.get("cross_attention_dim")
    if isinstance(d, (list, tuple)):
        d = d[0] if len(set(d)) == 1 else None
    return None if cfg.get("encoder_hid_dim") is not None else d


class PixArtConditioner(Conditioner):
    """`PixArtTransformer2DModel` (PixArt-alpha / -Sigma): T5 embeddings with an attention mask;
    learned-sigma output (the first C channels are the prediction).

    cond: {"encoder_hidden_states": (B, L, D), "encoder_attention_mask": (B, L) 1 = keep}. Models
    with `use_additional_conditions` (PixArt-alpha 1024) also take "resolution" (B, 2) (height,
    width in pixels) and "aspect_ratio" (B, 1); when absent they are computed from the latent size
    and `vae_scale_factor`, as the pipeline does. The null is the T5 encoding of "" and its mask;
    a null of another length is padded with masked-out zeros (or cut where masked out).
    """

    family = "PixArt"
    usage = "{'encoder_hidden_states': (B, L, D), 'encoder_attention_mask': (B, L)}"

    def __init__(
        self,
        null_embeds: Tensor | None = None,
        null_mask: Tensor | None = None,
        in_channels: int | None = None,
        vae_scale_factor: int = 8,
    ):
        self.null_embeds, self.null_mask = null_embeds, null_mask  # the null condition of CFG
        self.in_channels, self.vae_scale_factor = in_channels, vae_scale_factor

    def call(self, backbone, x, timestep, cond):
        _need(cond, ("encoder_hidden_states",), self.family, self.usage)
        _check_dim(cond, "encoder_hidden_states", 3, backbone.config.get("caption_channels"), self.family)
        dt = x.dtype
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(backbone, "use_additional_conditions", False):
            b, _, h, w = x.shape
            res, ar = cond.get("resolution"), cond.get("aspect_ratio")
            if res is None:
                res = torch.tensor(
                    [[h * self.vae_scale_factor, w * self.vae_scale_factor]], dtype=torch.float32, device=x.device
                ).expand(b, 2)
            if ar is None:
                ar = res[:, :1].float() / res[:, 1:2].float()
            added = {"resolution": res.to(x.device, dt), "aspect_ratio": ar.to(x.device, dt)}
        mask = cond.get("encoder_attention_mask")
        out = backbone(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
            timestep=timestep,
            added_cond_kwargs=added,
            encoder_attention_mask=mask,
        ).sample
        return _learned_sigma_split(out, self.in_channels or x.shape[1])

    def null(self, cond, batch):
        _need(cond, ("encoder_hidden_states",), self.family, self.usage)
        if self.null_embeds is None:
            raise ValueError("PixArt guidance needs the encoding of the empty prompt (null_embeds, null_mask)")
        ehs = cond["encoder_hidden_states"]
        emb = self.null_embeds.to(ehs)
        mask = (self.null_mask if self.null_mask is not None else torch.ones(emb.shape[:2], dtype=torch.long)).to(
            ehs.device
        )
        length = ehs.shape[1]
        if emb.shape[1] < length:  # pad with masked-out zeros
            pad = length - emb.shape[1]
            emb = torch.cat([emb, emb.new_zeros(emb.shape[0], pad, emb.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1)
        elif emb.shape[1] > length:
            if bool(mask[:, length:].any()):
                raise ValueError(
                    f"PixArt: the null prompt has {int(mask.sum(1).max())} tokens but the condition "
                    f"only {length}: encode both with the same max_sequence_length"
                )
            emb, mask = emb[:, :length], mask[:, :length]
        out = dict(cond)
        out["encoder_hidden_states"] = _null_like(emb, ehs, batch, "encoder_hidden_states", self.family)
        if cond.get("encoder_attention_mask") is not None:
            out["encoder_attention_mask"] = _expand_null(mask.to(cond["encoder_attention_mask"]), batch)
        return out


class SD3Conditioner(_PromptNullConditioner):
    """`SD3Transformer2DModel`: joint text embeddings (CLIP-L, CLIP-G and T5 concatenated) plus
    pooled projections; fed timestep = 1000 t as the pipeline does.

    The null is the encoding of "" through the same encoders (the SD3 pipeline's default negative
    prompt); `zero_null=True` uses zeros instead."""

    family = "SD3"
    usage = "{'encoder_hidden_states': (B, L, D), 'pooled_projections': (B, P)}"

    def call(self, backbone, x, timestep, cond):
        cfg = backbone.config
        _need(cond, ("encoder_hidden_states", "pooled_projections"), self.family, self.usage)
        _check_dim(cond, "encoder_hidden_states", 3, cfg.get("joint_attention_dim"), self.family)
        _check_dim(cond, "pooled_projections", 2, cfg.get("pooled_projection_dim"), self.family)
        dt = x.dtype
        return backbone(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
            pooled_projections=cond["pooled_projections"].to(dt),
            timestep=timestep,
        ).sample

    def null(self, cond, batch):
        _need(cond, ("encoder_hidden_states", "pooled_projections"), self.family, self.usage)
        out = dict(cond)
        ehs, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        out["encoder_hidden_states"] = self._null_entry("encoder_hidden_states", ehs, self.null_embeds, batch)
        out["pooled_projections"] = self._null_entry("pooled_projections", pooled, self.null_pooled, batch)
        return out


class FluxConditioner(Conditioner):
    """`FluxTransformer2DModel`: latents are packed into 2x2 patches around the call (the rest of
    fewstep sees (B, C, H, W)); the network is fed t in [0, 1] (the pipeline divides the
    scheduler's timestep by 1000), text ids are zeros and image ids are (0, row, column), as in
    FluxPipeline.

    Flux-dev is guidance-distilled (`guidance_embeds` in its config): the guidance scale is an
    input ("guidance" in cond, (B,); the Denoiser puts its `guidance` argument there), not a
    second pass. With null_embeds / null_pooled (the encoding of a negative prompt) the
    unconditional branch exists too (FluxPipeline's `true_cfg_scale`), e.g. for Flux-schnell or
    for objectives that need conditional and unconditional outputs."""

    family = "Flux"
    usage = "{'encoder_hidden_states': (B, L, D), 'pooled_projections': (B, P)} (+ 'guidance': (B,))"

    def __init__(
        self,
        guidance_embeds: bool = True,
        timestep_scale: float = 1000.0,
        null_embeds: Tensor | None = None,
        null_pooled: Tensor | None = None,
        default_guidance: float = 3.5,
    ):
        self.guidance_embedded = guidance_embeds
        self.timestep_scale = timestep_scale
        self.null_embeds = null_embeds
        self.null_pooled = null_pooled
        self.default_guidance = default_guidance

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents need even height and width, got shape {tuple(x.shape)}")
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
        cfg = backbone.config
        _need(cond, ("encoder_hidden_states", "pooled_projections"), self.family, self.usage)
        _check_dim(cond, "encoder_hidden_states", 3, cfg.get("joint_attention_dim"), self.family)
        _check_dim(cond, "pooled_projections", 2, cfg.get("pooled_projection_dim"), self.family)
        if cfg.get("in_channels") is not None and 4 * x.shape[1] != cfg.get("in_channels"):
            raise ValueError(
                f"Flux backbone takes {cfg.get('in_channels')} packed channels, i.e. latents "
                f"with {cfg.get('in_channels') // 4} channels; got shape {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        dt = x.dtype
        ehs = cond["encoder_hidden_states"].to(dt)
        txt_ids = torch.zeros(ehs.shape[1], 3, device=x.device, dtype=dt)
        kw = {}
        if self.guidance_embedded:
            g = cond.get("guidance")
            if g is None:
                g = self.default_guidance
            kw["guidance"] = torch.as_tensor(g, dtype=torch.float32).to(x.device).expand(b)
        out = backbone(
            hidden_states=self.pack(x),
            encoder_hidden_states=ehs,
            pooled_projections=cond["pooled_projections"].to(dt),
            timestep=timestep / self.timestep_scale,
            img_ids=self.image_ids(h, w, x.device, dt),
            txt_ids=txt_ids,
            **kw,
        ).sample
        return self.unpack(out, h, w)

    def null(self, cond, batch):
        if self.null_embeds is None or self.null_pooled is None:
            if self.guidance_embedded:
                raise ValueError(
                    "this Flux teacher is guidance-distilled: its guidance is an input (the "
                    "Denoiser's `guidance` goes to cond['guidance']); an unconditional branch "
                    "needs null_embeds and null_pooled (a negative prompt's encoding)"
                )
            raise ValueError(
                "Flux classifier-free guidance needs null_embeds and null_pooled (the encoding "
                "of a negative prompt), or use guidance 1"
            )
        _need(cond, ("encoder_hidden_states", "pooled_projections"), self.family, self.usage)
        out = dict(cond)
        ehs, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        out["encoder_hidden_states"] = _null_like(self.null_embeds, ehs, batch, "encoder_hidden_states", self.family)
        out["pooled_projections"] = _null_like(self.null_pooled, pooled, batch, "pooled_projections", self.family)
        return out


def conditioner_for(backbone: nn.Module, **kwargs) -> Conditioner:
    """The conditioner of a diffusers backbone, as its family record (`fewstep.families`) builds it.

    kwargs (each family reads the ones it needs): null_class (class-conditional), null_embeds,
    null_pooled (text families: the encoding of the empty prompt), null_mask (PixArt), zero_null
    (SDXL / SD3 zeros as null), vae_scale_factor (PixArt resolution conditions), default_guidance
    (guidance-distilled Flux)."""
    from .families import all_families, family_of  # the families build on the classes above

    fams = all_families()
    known = sorted({k for f in fams for k in f.conditioner_kwargs})
    unknown = set(kwargs) - set(known)
    if unknown:
        raise ValueError(f"conditioner_for: unknown arguments {sorted(unknown)}; known are {known}")
    fam = family_of(backbone)
    if fam is None:
        classes = ", ".join(dict.fromkeys(c for f in fams for c in f.backbone_classes))
        raise ValueError(f"no conditioner for backbone class {type(backbone).__name__}: supported are {classes}")
    return fam.conditioner(backbone, kwargs)
