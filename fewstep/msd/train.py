"""The MSD driver of the training entry point: one config (`objective.name: msd`), one run dir,
K students trained one after another, each an ordinary run of the `msd` objective in
`<run dir>/student_<k>/` with `data.conditions` = its subset and `objective.student_index` = k.

    <run dir>/msd.json               the partition (written first; a resume checks it is unchanged)
    <run dir>/student_<k>/...        student k's run: config.yaml, checkpoints/, final/, run_card.json
    <run dir>/run_card.json          written when every student has finished: the students, their
                                     conditions and the routing (export and evaluation read it)

`steps` is each student's number of steps (K students train K x steps in all). Resume
(`resume=latest`) skips finished students and continues the unfinished one from its own latest
checkpoint; `stop_after` stops the student in progress after that many of its steps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_to_dict
from ..training.outdir import aside_path, set_aside
from .partition import Partition, partition_labels, partition_prompts, prompt_vectors

__all__ = ["PARTITION_FILE", "STUDENT_DIR", "make_partition", "run_msd"]

PARTITION_FILE = "msd.json"


def STUDENT_DIR(k: int) -> str:
    return f"student_{k}"


def make_partition(cfg: Config, params: Any, bundle: Any) -> Partition:
    """The partition the config asks for, on this teacher (errors name the key)."""
    k = int(params.num_students)
    if bundle.text:
        from ..training.data import read_prompts

        if cfg.data.prompts is None:
            raise ConfigError("data.prompts: objective.name=msd on a text teacher partitions the prompt file; give one")
        prompts = read_prompts(cfg.data.prompts)
        emb = None
        if params.partition == "kmeans":
            import torch

            with torch.no_grad():
                emb = prompt_vectors(bundle.encode_prompts(prompts))
        return partition_prompts(prompts, k, params.partition, params.partition_file, emb, params.partition_seed)
    n = cfg.data.num_classes or bundle.num_classes
    if not n:
        raise ConfigError("objective.name=msd needs a conditional teacher (class labels or data.prompts) to partition")
    return partition_labels(int(n), k, params.partition, params.partition_file)


def _student_cfg(cfg: Config, k: int, part: Partition, run_dir: Path) -> Config:
    sub = copy.deepcopy(cfg)
    sub.name = f"{cfg.name}/{STUDENT_DIR(k)}"
    sub.output_dir = str(run_dir / STUDENT_DIR(k))
    sub.seed = int(cfg.seed) + k
    sub.objective.params = {**cfg.objective.params, "student_index": k}
    sub.data.conditions = list(part.subsets[k])
    sub.resume, sub.overwrite = None, False
    d = run_dir / STUDENT_DIR(k)
    if d.is_dir() and any(d.iterdir()):
        from ..training.checkpoint import latest_checkpoint

        if latest_checkpoint(d) is not None:
            sub.resume = "latest"
        else:  # started but never checkpointed: start this student afresh
            sub.overwrite = True
    return sub.validate()


def run_msd(cfg: Config, teacher: Any = None, accelerator: Any = None):
    """Train the K students of an `objective.name: msd` config; returns the entry point's RunResult
    (steps = the steps of all students together)."""
    from ..objectives.registry import make_params
    from ..training.parallel import make_accelerator

    t0 = time.time()
    cfg.validate()
    params = make_params("msd", cfg.objective.params)
    if params.student_index is not None:
        raise ConfigError("objective.student_index is set by the entry point for each student's sub-run; remove it")
    if cfg.data.conditions is not None:
        raise ConfigError(
            "data.conditions: MSD sets each student's conditions from objective.partition; leave it unset"
        )
    run_dir = cfg.run_dir()
    if accelerator is None:
        accelerator = make_accelerator(cfg.precision.mixed_precision, cfg.log.trackers, str(run_dir))
    _prepare_run_dir(cfg, run_dir, accelerator)
    try:
        res = _train_students(cfg, params, teacher, run_dir, accelerator, t0)
    except BaseException:
        _settle_aside(run_dir, accelerator, failed=True)
        raise
    _settle_aside(run_dir, accelerator, failed=False)
    return res


def _train_students(cfg: Config, params: Any, teacher: Any, run_dir: Path, accelerator: Any, t0: float):
    from ..training.bundle import load_bundle
    from ..training.loop import RunResult, run

    main = accelerator.is_main_process
    bundle = _with_cached_real_data(teacher if teacher is not None else load_bundle(cfg.teacher, accelerator.device))
    part = make_partition(cfg, params, bundle)
    _record_partition(part, run_dir, accelerator)

    results, logs, steps, skipped, res = [], {}, 0, 0, None
    for k in range(part.num_students):
        d = run_dir / STUDENT_DIR(k)
        if (d / "run_card.json").is_file():  # finished before a resume
            card = json.loads((d / "run_card.json").read_text())
            steps += int(card.get("steps", 0))
            results.append(card)
            continue
        if main:
            print(
                f"fewstep train [msd]: student {k + 1}/{part.num_students} on {len(part.subsets[k])} condition(s) "
                f"{_show(part, k)}",
                flush=True,
            )
        res = run(_student_cfg(cfg, k, part, run_dir), teacher=bundle, accelerator=accelerator)
        steps += res.steps
        skipped += res.skipped
        logs = {f"student_{k}/{n}": v for n, v in res.logs.items()}
        if res.stopped_early:
            return RunResult(
                run_dir=run_dir, steps=steps, stopped_early=True, skipped=skipped, wall_time=time.time() - t0, logs=logs
            )
        results.append(json.loads((d / "run_card.json").read_text()) if main else {})
    files: dict[str, str] = {}
    if main:
        card = _run_card(cfg, params, part, results, steps, time.time() - t0)
        (run_dir / "run_card.json").write_text(json.dumps(card, indent=1, default=str))
        files["run_card"] = "run_card.json"
    return RunResult(
        run_dir=run_dir,
        steps=steps,
        stopped_early=False,
        skipped=skipped,
        wall_time=time.time() - t0,
        logs=logs,
        files=files,
        objective=getattr(res, "objective", None),
    )  # the last student's (same sampler for all)


def _prepare_run_dir(cfg: Config, run_dir: Path, accelerator: Any) -> None:
    """The output-folder rules of the entry point, for the whole MSD run."""
    nonempty = run_dir.is_dir() and any(run_dir.iterdir())
    if cfg.resume is not None:
        if cfg.resume != "latest":
            raise ConfigError(
                f"resume={cfg.resume!r}: an MSD run resumes with resume=latest (each student continues "
                "from its own latest checkpoint)"
            )
        if (run_dir / "run_card.json").is_file():
            raise ConfigError(f"resume=latest: {run_dir} holds a finished MSD run")
    elif nonempty:
        set_aside(cfg, run_dir, accelerator)  # kept until a student of the new run has a checkpoint
    accelerator.wait_for_everyone()


def _settle_aside(run_dir: Path, accelerator: Any, failed: bool) -> None:
    """overwrite=true: delete the replaced run once the new one has a checkpoint or finished; put it
    back when the new run failed before any student wrote one."""
    aside = aside_path(run_dir)
    if not accelerator.is_main_process or not aside.exists():
        return
    if failed and not any(run_dir.glob("student_*/checkpoints/*/manifest.json")):
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(aside, run_dir)
    elif not failed:
        shutil.rmtree(aside, ignore_errors=True)


def _with_cached_real_data(bundle: Any) -> Any:
    """The bundle with its real data encoded once for all students."""
    if bundle.real_data is None:
        return bundle
    real, cache = bundle.real_data, {}

    def cached_real():
        if "v" not in cache:
            cache["v"] = real()
        return cache["v"]

    return dataclasses.replace(bundle, real_data=cached_real)


def _record_partition(part: Partition, run_dir: Path, accelerator: Any) -> None:
    """Write msd.json, or check that a resumed run's partition is unchanged."""
    pfile = run_dir / PARTITION_FILE
    record = {
        "num_students": part.num_students,
        "partition": part.to_json(),
        "students": [STUDENT_DIR(k) for k in range(part.num_students)],
    }
    if pfile.is_file():
        old = json.loads(pfile.read_text())
        if old.get("partition", {}).get("subsets") != record["partition"]["subsets"]:
            raise ConfigError(
                f"resume=latest: objective.partition / num_students now give another partition than "
                f"the one {pfile} records; resume with the same settings or start afresh"
            )
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        pfile.write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()


def _run_card(cfg: Config, params: Any, part: Partition, results: list[dict], steps: int, wall: float) -> dict:
    first = results[0]
    return {
        "name": cfg.name,
        "objective": "msd",
        "objective_params": {**(first.get("objective_params") or {}), "student_index": None},
        "teacher": first.get("teacher"),
        "sampling": first.get("sampling"),
        "msd": {
            "num_students": part.num_students,
            "partition": part.to_json(),
            "students": [
                {
                    "index": k,
                    "dir": STUDENT_DIR(k),
                    "conditions": part.subsets[k],
                    "steps": r.get("steps"),
                    "files": r.get("files"),
                    "train_time_s": r.get("train_time_s"),
                }
                for k, r in enumerate(results)
            ],
            "student_width": params.student_width,
            "student_depth": params.student_depth,
            "stages": dict(zip(("pretrain_steps", "gan_start_step"), params.stages(cfg.steps))),
        },
        "steps": steps,
        "steps_per_student": cfg.steps,
        "wall_time_s": round(wall, 2),
        "files": {},
        "config": config_to_dict(cfg),
    }


def _show(part: Partition, k: int) -> str:
    s = part.subsets[k]
    if part.kind == "labels":
        return f"(labels {s})" if len(s) <= 12 else f"(labels {s[:12]} ...)"
    return f"(prompt lines {s[:8]}{' ...' if len(s) > 8 else ''})"
