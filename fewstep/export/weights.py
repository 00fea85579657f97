"""The student's weights: reading safetensors, checking they fit the backbone config, a
checkpoint's full state (LoRA merged), and the LoRA adapter in diffusers' format."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._common import LORA_DIR, LORA_FILE, ExportError, _read_json
from .drives import Drive
from .run_dir import _Run


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    raise ExportError(f"{folder} holds no safetensors weights (diffusion_pytorch_model.safetensors)")


def _header(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


def _load_all(files: Sequence[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _expected_shapes(cls_name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a backbone built from `config` on the meta device (no memory)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        m = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _check_fit(cls_name: str, config: dict[str, Any], have: dict[str, tuple[int, ...]], what: str) -> None:
    want = _expected_shapes(cls_name, config)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if bad:
            parts.append(f"{len(bad)} of another shape (e.g. {bad[0]}: {have[bad[0]]} vs {want[bad[0]]})")
        raise ExportError(f"{what} do not fit a {cls_name} with this config: " + "; ".join(parts))


def _checkpoint_state(run: _Run, teacher_bb: Path, cls_name: str, config: dict[str, Any]) -> tuple[dict, dict | None]:
    """The student's full backbone state from a training checkpoint (LoRA merged into the teacher's
    weights; tensors a checkpoint leaves out because they are the teacher's, from the teacher),
    and the LoRA adapter alone (peft keys, adapter name removed) for LoRA students."""
    from ..training.lora import merge_lora_state_dict

    prefix = "student.backbone."
    raw = {k[len(prefix) :]: v for k, v in _load_all([run.student_file]).items() if k.startswith(prefix)}
    if run.weights == "student_ema" and run.checkpoint is not None and (run.checkpoint / "model.safetensors").is_file():
        base = {
            k[len(prefix) :]: v
            for k, v in _load_all([run.checkpoint / "model.safetensors"]).items()
            if k.startswith(prefix)
        }
        raw = {**base, **raw}
    if not raw:
        raise ExportError(
            f"checkpoint {run.student_file} holds no '{prefix}*' tensors (a shared-base or custom "
            "student layout): export the finished run dir instead"
        )
    teacher_sd = _load_all(_safetensors_files(teacher_bb))
    adapter = None
    if any(".lora_A." in k for k in raw):
        meta = run.lora or {}
        if not meta.get("rank") or meta.get("alpha") is None:
            raise ExportError(
                f"checkpoint {run.student_file} holds LoRA adapters but the run card gives no lora rank and alpha"
            )
        names = {k.split(".lora_A.")[1].split(".")[0] for k in raw if ".lora_A." in k}
        if len(names) != 1:
            raise ExportError(f"checkpoint {run.student_file}: expected one LoRA adapter, found {sorted(names)}")
        name = names.pop()
        plain = {k.replace(".base_layer.", "."): v for k, v in raw.items() if "lora_" not in k}
        full = {**teacher_sd, **plain, **{k: v for k, v in raw.items() if "lora_" in k}}
        state = merge_lora_state_dict(full, float(meta["alpha"]) / float(meta["rank"]), name)
        adapter = {k.replace(f".{name}.", "."): v for k, v in raw.items() if "lora_" in k}
    else:
        state = {**teacher_sd, **raw}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _check_fit(cls_name, config, shapes, f"checkpoint {run.student_file} weights")
    return state, adapter


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_adapter(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    return load_file(str(path)), meta


def _write_lora(
    pipeline_class: str, drive: Drive, adapter: dict[str, Tensor], rank: int, alpha: float, out_dir: Path
) -> dict[str, Any]:
    """Write the adapter with the pipeline class's own `save_lora_weights`. lora_B is multiplied by
    alpha / rank, so the file loads at scale 1 whatever alpha convention a loader assumes."""
    import diffusers

    scale = float(alpha) / float(rank)
    sd = {}
    for k, v in adapter.items():
        if ".lora_A." not in k and ".lora_B." not in k:
            raise ExportError(f"LoRA adapter key {k!r} is not a peft lora_A / lora_B weight")
        v = v.detach().float().contiguous()
        sd[k] = v * scale if ".lora_B." in k else v
    cls = getattr(diffusers, pipeline_class)
    out_dir.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(out_dir), **{drive.lora: sd}, safe_serialization=True)
    return {
        "folder": LORA_DIR,
        "file": f"{LORA_DIR}/{LORA_FILE}",
        "rank": int(rank),
        "alpha": float(alpha),
        "scale_folded_into_lora_B": scale,
        "tensors": len(sd),
    }
