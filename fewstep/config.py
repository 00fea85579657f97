"""The training configuration: typed dataclasses holding every default, YAML presets and
`key=value` overrides.

    cfg = load_config("configs/digits/dsm.yaml", ["objective.t_min=0.05", "optim.generator.lr=1e-4"])

A preset is a YAML mapping with the same nesting as `Config`; overrides use dotted keys and YAML
values (`data.batch_size=64`, `lora.target_modules=[to_q,to_v]`, `resume=latest`). An unknown key
or a value of the wrong type is an error that names the full dotted key. The `objective:` section
holds `name` plus the objective's own hyperparameters, which are checked against that objective's
dataclass (see `fewstep.objectives.registry`); `optim:` holds one entry per optimizer group of the
objective (`optim.generator`, `optim.fake_score`, ...) plus `optim.default`, from which every group
takes the values it does not set (old group names, RENAMED_GROUPS, are read with a warning).
The typed conversion of each value (and ConfigError) is in `fewstep.config_convert`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config_convert import ConfigError, coerce, dataclass_from

__all__ = [
    "Config",
    "ConfigError",
    "TeacherConfig",
    "ObjectiveConfig",
    "DataConfig",
    "OptimGroupConfig",
    "LoraConfig",
    "PrecisionConfig",
    "EMAConfig",
    "CheckpointConfig",
    "FaultsConfig",
    "LogConfig",
    "EvalConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "coerce",
    "config_to_dict",
    "resolve_group",
    "DEFAULT_GROUP",
    "RENAMED_GROUPS",
]

RENAMED_GROUPS = {"guidance": "fake_score"}  # old optimizer group name -> now (guidance: the CFG scale only)


# ---------------------------------------------------------------------------------------------
# the schema
# ---------------------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    source: str = "digits-vp"  # "digits-vp" | "digits-flow" | local pipeline folder | hub id (cached)
    family: str | None = None  # override the family detected from the pipeline (sd15, sdxl, ...)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype of the frozen teacher
    resolution: int | None = None  # text teachers: image size in pixels (default: the model's own)


@dataclass
class ObjectiveConfig:
    name: str = "dsm"  # a name in fewstep.objectives.registry
    params: dict[str, Any] = field(default_factory=dict)  # the objective's hyperparameters (its dataclass)


@dataclass
class DataConfig:
    batch_size: int = 32  # global batch per step, split evenly over the processes
    micro_batch_size: int | None = None  # memory cap: the most samples a process puts through the loss at
    #   once; its share (batch_size / processes) runs in micro-batches of this size with gradients
    #   accumulated, one optimizer step per training step, the same update as one full batch (null: all at once)
    real_data: bool = False  # put real latents in batch["x0"]: data.source's, else the embedded digits'
    source: Literal["folder", "webdataset", "datasets", "cache"] | None = None  # the user's real images
    #   (implies real data): an image folder, webdataset tar shards, a saved `datasets` dataset, or a
    #   latent cache written by `fewstep encode`; see fewstep/data/ and configs/README.md
    path: str | list[str] | None = None  # the folder / shard list (braces or globs) / dataset folder / cache
    labels: str | None = None  # folder: "subfolders" or a labels file; webdataset: member extension
    #   (default cls); datasets: the label column
    captions: str | None = None  # folder / webdataset: caption file extension (default txt); datasets: column
    image_key: str | None = None  # webdataset: the image member's extension; datasets: column (default image)
    split: str | None = None  # datasets: the split of a saved DatasetDict (default train)
    resolution: int | None = None  # images are resized and centre-cropped to this (default: the teacher's)
    encode_batch: int = 32  # images per VAE call when encoding on the fly
    prompt_column: str | None = None  # data.prompts names a saved `datasets` folder: its prompt column
    real_latents: str | None = None  # or from a safetensors file: "latents" (N, C, H, W), scaled as the
    #   teacher's VAE scales them, optional "class_labels" (N,); with
    #   data.prompts, line i of the prompt file is the caption of latent i
    prompts: str | None = None  # text teachers: prompt file, one prompt a line (null: data.source's captions)
    num_classes: int | None = None  # class-conditional teachers: labels 0..num_classes-1 (default: teacher's)
    conditions: list[int] | None = None  # train on these conditions only: class labels, or (text) 0-based line
    #   numbers of data.prompts (MSD sets one subset per student)


@dataclass
class OptimGroupConfig:
    """One optimizer group (AdamW + scheduler). None means: take the value of `optim.default`."""

    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    grad_clip: float | None = None  # max global grad norm of the group; 0 = no clipping
    scheduler: (
        Literal[
            "constant",
            "linear",
            "cosine",
            "cosine_with_restarts",
            "cosine_restarts",
            "polynomial",
            "constant_with_warmup",
        ]
        | None
    ) = None  # diffusers' get_scheduler (training/schedules.py); all with linear warm-up from 0
    warmup_steps: int | None = None  # counted in updates of this group
    num_cycles: int | None = None  # cosine_with_restarts only (hard restarts)


# The defaults every group starts from (DMD2's: AdamW (0.9, 0.999), wd 0.01, clip 10, constant).
DEFAULT_GROUP = OptimGroupConfig(
    lr=1e-5,
    betas=(0.9, 0.999),
    weight_decay=0.01,
    eps=1e-8,
    grad_clip=10.0,
    scheduler="constant",
    warmup_steps=0,
    num_cycles=1,
)


def _default_optim() -> dict[str, OptimGroupConfig]:
    return {"default": dataclasses.replace(DEFAULT_GROUP)}


@dataclass
class LoraConfig:
    student: bool = False  # LoRA student on frozen teacher weights (else a full copy)
    fake: bool = False  # LoRA fake score / other teacher copies (`ctx.make_copy`)
    rank: int = 64  # DMD2 SDXL: rank 64, alpha 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # module name suffixes; None = the family default (training/lora.py)


@dataclass
class PrecisionConfig:
    mixed_precision: Literal["no", "bf16"] | None = None  # None: what `accelerate launch` says ("no" otherwise)
    gradient_checkpointing: bool = False  # activation checkpointing of trainable backbones
    allow_tf32: bool = True  # CUDA matmuls in TF32 where fp32 runs
    compile: bool = False  # torch.compile the student, fake score and teacher backbones (eager fallback)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None  # torch.compile's mode


@dataclass
class EMAConfig:
    rate: float = 0.0  # EMA decay of the student's trainable weights; 0 = off (e.g. 0.999)
    start_step: int = 0  # copy the weights (no averaging) before this step


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints; 0 = only when stopping early
    keep: int = 3  # keep the last N complete checkpoints
    state_dict: Literal["full", "sharded"] = "sharded"  # FSDP only: one gathered file or one shard per process


@dataclass
class FaultsConfig:
    max_consecutive_nonfinite: int = 10  # stop after this many skipped updates in a row


@dataclass
class LogConfig:
    every: int = 10  # steps between tracker / metrics.jsonl records
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # used when installed; [] = none
    sample_every: int = 500  # steps between sample grids; 0 = only at the end
    sample_count: int = 16  # images in a grid
    sample_seed: int = 0  # fixed noise and labels for the grids
    progress: bool = True  # tqdm bar on the main process


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations of the student during training (FID, class accuracy
    #   on a small sample, by the digits judge: digits teachers only); 0 = off
    num_samples: int = 200  # samples per evaluation, labels balanced over the classes
    seed: int = 0  # fixed noise and labels: every evaluation scores the same draws


@dataclass
class Config:
    name: str = "run"  # preset name; the default output_dir is runs/<name>
    seed: int = 0
    steps: int | None = None  # total training steps (schedules are laid out over these); default 1000
    generator_steps: int | None = None  # student updates instead: sets steps (DMD: x fake_updates_per_generator)
    stop_after: int | None = None  # stop (with a checkpoint) after this step; resume continues
    output_dir: str | None = None
    overwrite: bool = False  # replace a non-empty output_dir (the old run is kept until the first checkpoint)
    resume: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    resume_branch: bool = False  # resume a non-latest checkpoint; later ones are moved aside (`resume.branch`)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: dict[str, OptimGroupConfig] = field(default_factory=_default_optim)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    def validate(self) -> Config:
        """Range checks that types alone do not catch (each error names its key)."""

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        self.steps = 1000 if self.steps is None and self.generator_steps is None else self.steps
        need(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need((self.generator_steps or 1) >= 1, "generator_steps", f"must be >= 1, got {self.generator_steps}")
        need(self.stop_after is None or self.stop_after >= 1, "stop_after", "must be >= 1")
        need(self.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.data.batch_size}")
        mb = self.data.micro_batch_size
        need(mb is None or mb >= 1, "data.micro_batch_size", f"must be >= 1 or null, got {mb}")
        need(self.data.num_classes is None or self.data.num_classes >= 1, "data.num_classes", "must be >= 1")
        c = self.data.conditions
        need(
            c is None or (len(c) > 0 and min(c) >= 0 and len(set(c)) == len(c)),
            "data.conditions",
            f"must be distinct labels / prompt lines >= 0 (null: all), got {c}",
        )
        need(self.lora.rank >= 1, "lora.rank", f"must be >= 1, got {self.lora.rank}")
        need(0.0 <= self.lora.dropout < 1.0, "lora.dropout", "must lie in [0, 1)")
        need(0.0 <= self.ema.rate < 1.0, "ema.rate", f"must lie in [0, 1), got {self.ema.rate}")
        need(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(self.faults.max_consecutive_nonfinite >= 0, "faults.max_consecutive_nonfinite", "must be >= 0")
        need(self.log.every >= 1, "log.every", "must be >= 1")
        need(self.log.sample_every >= 0, "log.sample_every", "must be >= 0")
        need(self.log.sample_count >= 1, "log.sample_count", "must be >= 1")
        need(self.eval.every >= 0, "eval.every", f"must be >= 0 (0 = off), got {self.eval.every}")
        need(self.eval.num_samples >= 2, "eval.num_samples", f"must be >= 2 (FID), got {self.eval.num_samples}")
        need("default" in self.optim, "optim.default", "is required")
        for name in self.optim:
            r = resolve_group(self, name)
            need(r.lr is not None and r.lr >= 0 and math.isfinite(r.lr), f"optim.{name}.lr", "must be finite and >= 0")
            need(all(0.0 <= b < 1.0 for b in r.betas), f"optim.{name}.betas", f"must lie in [0, 1), got {r.betas}")
            need(r.weight_decay >= 0, f"optim.{name}.weight_decay", "must be >= 0")
            need(r.eps > 0, f"optim.{name}.eps", "must be > 0")
            need(r.grad_clip >= 0, f"optim.{name}.grad_clip", "must be >= 0 (0 = no clipping)")
            need(r.warmup_steps >= 0, f"optim.{name}.warmup_steps", "must be >= 0")
            need(r.num_cycles >= 1, f"optim.{name}.num_cycles", "must be >= 1")
        need(not self.resume_branch or self.resume is not None, "resume_branch", "needs resume=<checkpoint folder>")
        if self.resume is not None and self.overwrite:
            raise ConfigError("resume and overwrite=true exclude each other: overwrite would delete what resume reads")
        return self


def resolve_group(cfg: Config, group: str, suggested: dict[str, Any] | None = None) -> OptimGroupConfig:
    """The settings of an optimizer group: its own `optim.<group>` values, then what the objective
    suggests for it (`suggested`, e.g. DMD's generator_lr), then `optim.default`, then DEFAULT_GROUP."""
    own = cfg.optim.get(group, OptimGroupConfig())
    base = cfg.optim.get("default", OptimGroupConfig())
    hints = typing.get_type_hints(OptimGroupConfig)
    sug = {
        k: coerce(v, hints[k], f"objective's suggested optim.{group}.{k}")
        for k, v in (suggested or {}).items()
        if k in hints
    }
    vals = {}
    for f in dataclasses.fields(OptimGroupConfig):
        v = getattr(own, f.name)
        if v is None:
            v = sug.get(f.name)
        if v is None:
            v = getattr(base, f.name)
        if v is None:
            v = getattr(DEFAULT_GROUP, f.name)
        vals[f.name] = v
    return OptimGroupConfig(**vals)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated Config from plain nested data (a loaded YAML preset)."""
    data = dict(data or {})
    obj = data.pop("objective", None)
    if obj is not None:
        if isinstance(obj, str):
            obj = {"name": obj}
        if not isinstance(obj, dict):
            raise ConfigError(f"objective: expected a mapping with a 'name', got {obj!r}")
        obj = dict(obj)
        name = coerce(obj.pop("name", ObjectiveConfig.name), str, "objective.name")
        params = obj.pop("params", None) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"objective.params: expected a mapping, got {params!r}")
        params = {**params, **obj}
    optim = data.pop("optim", None)
    cfg = dataclass_from(Config, data, "")
    if obj is not None:
        cfg.objective = ObjectiveConfig(name=name, params=params)
    if optim is not None:
        if not isinstance(optim, dict):
            raise ConfigError(f"optim: expected a mapping of group name -> settings, got {optim!r}")
        groups = _default_optim()
        for g, v in _renamed_groups(optim).items():
            key = f"optim.{g}"
            if v is None and g != "default":  # `optim.<group>: null` drops the group (e.g. from a preset)
                groups.pop(str(g), None)
                continue
            if v is None:
                v = {}
            if not isinstance(v, dict):
                raise ConfigError(
                    f"{key}: expected a mapping of settings "
                    f"({', '.join(f.name for f in dataclasses.fields(OptimGroupConfig))}), got {v!r}"
                )
            if g == "default":
                merged = {f.name: getattr(groups["default"], f.name) for f in dataclasses.fields(OptimGroupConfig)}
                merged.update(v)
                v = merged
            groups[str(g)] = dataclass_from(OptimGroupConfig, v, key)
        cfg.optim = groups
    return cfg.validate()


def _renamed_groups(optim: dict[str, Any]) -> dict[str, Any]:
    """`optim` with old group names replaced by the new ones (one warning per old name)."""
    for old, new in RENAMED_GROUPS.items():
        if old in optim and new in optim:
            raise ConfigError(
                f"optim.{old} and optim.{new} are both set: optim.{old} is the old name of "
                f"optim.{new}; keep only optim.{new}"
            )
        if old in optim:
            warnings.warn(
                f"optim.{old} is deprecated: the fake score's optimizer group is now optim.{new} "
                "(`guidance` means the CFG scale only)",
                FutureWarning,
                stacklevel=4,
            )
    return {RENAMED_GROUPS.get(str(g), g): v for g, v in optim.items()}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested data (YAML / JSON ready); the objective is flattened back to name + params."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    d = plain(cfg)
    d["objective"] = {"name": cfg.objective.name, **plain(cfg.objective.params)}
    return d


# ---------------------------------------------------------------------------------------------
# YAML presets and overrides
# ---------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.generator.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to nested plain data (returns a new dict)."""
    import copy

    data = copy.deepcopy(data)
    for ov in overrides:
        parts, value = parse_override(ov)
        if parts == ["resume", "branch"]:  # the documented spelling of resume_branch
            parts = ["resume_branch"]
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif isinstance(nxt, str) and p == "objective" and i == 0:  # "objective: dmd2" shorthand
                nxt = node[p] = {"name": nxt}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section (it holds {nxt!r})")
            node = nxt
        node[parts[-1]] = value
    return data


def _preset_name(path: Path) -> str:
    parts = path.resolve().with_suffix("").parts
    if "configs" in parts:
        i = len(parts) - 1 - parts[::-1].index("configs")
        rel = parts[i + 1 :]
        if rel:
            return "/".join(rel)
    return path.stem


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when `path` is None) and apply `key=value` overrides.
    The preset's name (its path under configs/, e.g. "digits/dsm") names the default output dir."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(path)
        data.setdefault("name", _preset_name(Path(path)))
    data = apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None
