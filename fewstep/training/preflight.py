"""Every check a training run can make before it loads the teacher or touches the output folder.

    preflight(cfg)      # raises ConfigError naming the key; reads, never writes

The config's ranges, the objective's hyperparameters (its dataclass and `validate()`), the
trackers' names, the output folder (refused when it is the current folder, the home folder, a
repository root or fewstep's source; must be a folder that can be written or created), the
teacher source (an embedded name, a pipeline folder with model_index.json, or a hub id), the data
section (fewstep/data/spec.py: sources, folders, shards, caches), the prompts against the
teacher's kind, and a resume folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, ConfigError
from ..errors import UserError, check_output_folder, dangerous_folder

__all__ = ["preflight", "teacher_is_text"]

_EMBEDDED = ("digits-vp", "digits-flow", "digits-restore")
_TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "text_encoder_3")


def teacher_is_text(source: str) -> bool | None:
    """Whether a local pipeline folder is text-conditioned (True / False), or None when unknown."""
    if source in _EMBEDDED:
        return False
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None
    try:
        comps = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return any(isinstance(comps.get(k), list) and comps[k][0] is not None for k in _TEXT_COMPONENTS)


def _check_teacher(source: str) -> None:
    if source in _EMBEDDED:
        return
    p = Path(source).expanduser()
    if p.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not p.exists():
            raise ConfigError(f"teacher.source={source!r}: no such folder")
        if not p.is_dir():
            raise ConfigError(f"teacher.source={source!r} is a file; give a diffusers pipeline folder")
        index = p / "model_index.json"
        if not index.is_file():
            raise ConfigError(
                f"teacher.source={source!r}: {p} has no model_index.json (not a diffusers pipeline folder)"
            )
        try:
            json.loads(index.read_text())
        except ValueError as e:
            raise ConfigError(f"teacher.source={source!r}: {index} is not valid JSON ({e})") from None


def preflight(cfg: Config, check_teacher: bool = True) -> Config:
    """Check `cfg` as far as it can be checked without the teacher; returns it. `check_teacher`
    False: the caller passes its own teacher, so teacher.source is not read."""
    cfg.validate()
    run_dir = cfg.run_dir()
    why = dangerous_folder(run_dir)
    if why:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} is refused: {why} (a run may delete or replace its "
            "output folder); give a folder of its own, e.g. runs/<name>"
        )
    try:
        check_output_folder(run_dir, "output_dir")
    except UserError as e:
        raise ConfigError(str(e)) from None

    if cfg.data.real_latents is not None and not Path(cfg.data.real_latents).is_file():
        raise ConfigError(f"data.real_latents={cfg.data.real_latents!r}: no such file")
    from ..data.spec import check_data

    check_data(cfg.data)
    if cfg.resume not in (None, "latest") and not (Path(cfg.resume) / "state.json").is_file():
        raise ConfigError(f"resume={cfg.resume!r}: not a complete checkpoint folder (no state.json)")
    if check_teacher:
        _check_teacher(cfg.teacher.source)
        from .periodic_eval import check_eval

        check_eval(cfg, cfg.teacher.source)
        text = teacher_is_text(cfg.teacher.source)
        if text is False and cfg.data.prompts is not None:
            raise ConfigError(
                f"data.prompts: the teacher {cfg.teacher.source!r} is class-conditional (no text "
                "encoder); use data.num_classes, or a text-to-image teacher"
            )
        if text is True and cfg.data.prompts is None and cfg.data.source is None:
            raise ConfigError(
                f"data.prompts: the teacher {cfg.teacher.source!r} is text-conditioned; give a prompt "
                "file (one prompt a line)"
            )

    from ..objectives.registry import make_params

    try:
        make_params(cfg.objective.name, cfg.objective.params)
    except ConfigError:
        raise
    except ValueError as e:  # a validate() that raises ValueError naming objective.<key>
        raise ConfigError(str(e)) from None
    from .parallel import available_trackers

    available_trackers(cfg.log.trackers)

    return cfg
