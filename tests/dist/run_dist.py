"""Launched by tests/test_distributed.py (and usable by hand):

    ACCELERATE_USE_CPU=1 PYTHONPATH=. torchrun --nproc_per_node 2 tests/dist/run_dist.py OUT_DIR

Runs the dsm objective on a tiny DiT with two gloo processes:
  OUT_DIR/ddp            data parallel, 2 steps, a checkpoint, resumed for 2 more
  OUT_DIR/fsdp_sharded   FSDP2 through accelerate's plugin, stopped after 2 steps with a sharded
                         checkpoint, then resumed to 4
  OUT_DIR/fsdp_full      the same with a full (gathered) checkpoint
  OUT_DIR/dmd2_*         DMD2 (two optimizer groups, global-RNG draws) under FSDP2: 4 steps straight,
                         and 2 + a sharded checkpoint + 2 resumed
On CPU accelerate does not select FSDP itself, so the script sets the distributed type to FSDP
with the plugin before training (the sharding code path is the one a GPU launch takes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fewstep.config import load_config
from fewstep.training import run
from tests.dist.bundles import tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "data.real_data=false",
    "objective.teacher_steps=1",
    "steps=4",
    "data.batch_size=4",
    "log.every=1",
    "log.trackers=[]",
    "log.progress=false",
    "optim.default.lr=1e-2",
    "optim.default.warmup_steps=1",
    "ema.rate=0.5",
    "checkpoint.every=0",
    "log.sample_every=0",
    "log.sample_count=2",
]


def cfg(out: Path, *extra: str):
    return load_config(ROOT / "configs" / "digits" / "dsm.yaml", [f"output_dir={out}", *COMMON, *extra])


DMD2 = [
    "objective.fake_updates_per_generator=1",
    "objective.gan=false",
    "data.real_data=false",
    "objective.guidance=2.0",
    "data.batch_size=4",
    "steps=4",
    "log.every=1",
    "log.trackers=[]",
    "log.progress=false",
    "checkpoint.every=0",
    "log.sample_every=0",
    "log.sample_count=2",
    "checkpoint.state_dict=sharded",
    "optim.default.warmup_steps=0",
]


def dmd2_cfg(out: Path, *extra: str):
    return load_config(ROOT / "configs" / "digits" / "dmd2_1step_vp.yaml", [f"output_dir={out}", *DMD2, *extra])


def fsdp_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator()
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
        state_dict_type="SHARDED_STATE_DICT",
    )
    acc.state.distributed_type = DistributedType.FSDP
    return acc


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = {}
    first = run(cfg(out / "ddp", "stop_after=2"), teacher=tiny_bundle("dit"))
    r = run(cfg(out / "ddp", "resume=latest"), teacher=tiny_bundle("dit"))
    result["ddp"] = {"steps": r.steps, "world": int(os.environ["WORLD_SIZE"]), "stopped": first.stopped_early}
    for kind in ("sharded", "full"):
        d = out / f"fsdp_{kind}"
        extra = [f"checkpoint.state_dict={kind}"]
        first = run(cfg(d, *extra, "stop_after=2"), teacher=tiny_bundle("dit"), accelerator=fsdp_accelerator())
        second = run(cfg(d, *extra, "resume=latest"), teacher=tiny_bundle("dit"), accelerator=fsdp_accelerator())
        result[f"fsdp_{kind}"] = {"stopped": first.stopped_early, "steps": second.steps}
    run(dmd2_cfg(out / "dmd2_straight"), teacher=tiny_bundle("dit"), accelerator=fsdp_accelerator())
    run(dmd2_cfg(out / "dmd2_resumed", "stop_after=2"), teacher=tiny_bundle("dit"), accelerator=fsdp_accelerator())
    r = run(dmd2_cfg(out / "dmd2_resumed", "resume=latest"), teacher=tiny_bundle("dit"), accelerator=fsdp_accelerator())
    result["dmd2"] = {"steps": r.steps}
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "dist_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
