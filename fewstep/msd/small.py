"""A smaller student: the teacher's own backbone class built from its config with fewer channels
or blocks, so it runs through the same Denoiser adapter, conditioner and stock pipeline.

    student = smaller_student(teacher, width=0.5, depth=1.0)   # half the attention heads / channels

The config keys scaled are the ones diffusers backbones use for width and depth (no class names):
    width   num_attention_heads (transformers; the head size is kept, so rotary / head-dim
            constraints still hold; caption_projection_dim follows when it equals the inner width),
            block_out_channels (UNets; rounded to a multiple of norm_num_groups)
    depth   num_layers, num_single_layers (transformers), layers_per_block (UNets)
Initialisation: every teacher tensor whose name and shape the small network shares is copied
(with half the depth, the first blocks, the embeddings and the output layer); the rest keeps the
class's own initialisation. The MSD recipe then pre-trains it by score matching on the teacher's
outputs (`fewstep.objectives.msd`).
"""

from __future__ import annotations

import math
from typing import Any

from ..config import ConfigError
from ..denoiser import Denoiser

__all__ = ["smaller_config", "smaller_student"]

DEPTH_KEYS = ("num_layers", "num_single_layers", "layers_per_block")


def _scale(n: int, f: float, multiple: int = 1) -> int:
    return max(multiple, round(n * f / multiple) * multiple)


def smaller_config(config: dict[str, Any], width: float = 1.0, depth: float = 1.0) -> tuple[dict[str, Any], dict]:
    """(the scaled config, {key: (old, new)}). Raises ConfigError naming objective.student_width /
    student_depth when the config has no key to scale."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}
    changes: dict[str, tuple[Any, Any]] = {}
    if not (0 < width <= 1):
        raise ConfigError(f"objective.student_width={width} must lie in (0, 1]")
    if not (0 < depth <= 1):
        raise ConfigError(f"objective.student_depth={depth} must lie in (0, 1]")
    if width < 1:
        if isinstance(cfg.get("num_attention_heads"), int) and isinstance(cfg.get("attention_head_dim"), int):
            heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
            new = _scale(heads, width)
            cfg["num_attention_heads"] = new
            changes["num_attention_heads"] = (heads, new)
            if cfg.get("caption_projection_dim") == heads * dim:  # SD3: the text stream's width
                cfg["caption_projection_dim"] = new * dim
                changes["caption_projection_dim"] = (heads * dim, new * dim)
        elif isinstance(cfg.get("block_out_channels"), list):
            groups = int(cfg.get("norm_num_groups") or 1)
            old = list(cfg["block_out_channels"])
            new = [_scale(int(c), width, groups) for c in old]
            heads = cfg.get("attention_head_dim")
            if isinstance(heads, int) and any(c % heads for c in new):  # UNet2DCondition: heads per block
                new = [max(groups, heads) * max(1, round(c / max(groups, heads))) for c in new]
            cfg["block_out_channels"] = new
            changes["block_out_channels"] = (old, new)
        else:
            raise ConfigError(
                "objective.student_width: the teacher's backbone config has no width key "
                "(num_attention_heads with attention_head_dim, or block_out_channels)"
            )
    if depth < 1:
        found = False
        for k in DEPTH_KEYS:
            v = cfg.get(k)
            if isinstance(v, int) and v > 0:
                new = _scale(v, depth)
                cfg[k], changes[k], found = new, (v, new), True
        if not found:
            raise ConfigError(f"objective.student_depth: the teacher's backbone config has none of {DEPTH_KEYS}")
    return cfg, changes


def smaller_student(teacher: Denoiser, width: float = 1.0, depth: float = 1.0) -> tuple[Denoiser, dict]:
    """A trainable float32 Denoiser around a smaller copy of the teacher's backbone class, on the
    teacher's device, and the config changes made."""
    bb = teacher.backbone
    config = getattr(bb, "config", None)
    if config is None or not hasattr(type(bb), "from_config"):
        raise ConfigError(
            f"objective.student_width / student_depth: the teacher's backbone "
            f"({type(bb).__name__}) has no diffusers config to build a smaller copy from"
        )
    plain = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg, changes = smaller_config(plain, width, depth)
    dev = next(iter(bb.parameters())).device
    small = type(bb).from_config(cfg).to(device=dev)  # from_config builds float32 weights
    own = small.state_dict()
    src = bb.state_dict()
    shared = {k: v.detach().float().clone() for k, v in src.items() if k in own and own[k].shape == v.shape}
    small.load_state_dict(shared, strict=False)
    small.requires_grad_(True)
    small.train()
    n_small, n_teacher = sum(p.numel() for p in small.parameters()), sum(p.numel() for p in bb.parameters())
    info = {
        "changes": {k: list(v) for k, v in changes.items()},
        "parameters": n_small,
        "teacher_parameters": n_teacher,
        "copied_tensors": len(shared),
        "tensors": len(own),
        "parameter_ratio": round(n_small / max(1, n_teacher), 4),
    }
    if math.isclose(n_small, n_teacher):
        raise ConfigError(
            "objective.student_width / student_depth: the smaller student has as many parameters as "
            "the teacher (nothing was scaled)"
        )
    return Denoiser(small, teacher.path, teacher.conditioner), info
