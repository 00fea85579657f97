"""Every registered objective as a short run on a tiny teacher (the DiT; the restoration
objectives on the tiny image-conditioned UNet with its own training pairs), for the equivalence tests:
the same global batch split into micro-batches (tests/test_accumulation.py) or over two processes
(tests/test_distributed.py through tests/dist/run_equivalence.py) must train the same weights.

One config per objective: its defaults, made cheap (few teacher / trajectory steps), with every
phase of the objective reached within `STEPS` steps, real latents from a file where it trains on
real data, and no grids, checkpoints or trackers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewstep.config import load_config
from fewstep.objectives import registry
from tests.dist.bundles import tiny_bundle

STEPS = 3
BATCH = 8
NAMES = sorted(registry.REGISTRY)
DATA_FREE = {"boot", "tbcm", "nct"}  # refuse real data, or train on teacher trajectories only
RESTORE = {"ircm", "tadsr"}  # restoration: trained on the teacher's own (degraded, clean) pairs
# per objective: reach every phase in STEPS steps, cheaply (and exercise the batch-structured parts)
EXTRA = {
    "dsm": ["objective.teacher_steps=2"],
    "dmd": ["objective.fake_updates_per_generator=1"],
    "dmd2": ["objective.fake_updates_per_generator=1", "objective.gan=true"],
    "decoupled_dmd": ["objective.fake_updates_per_generator=1"],
    "flash_dmd": ["objective.fake_updates_per_generator=1", "objective.dm_steps=1"],
    "msd": [
        "objective.fake_updates_per_generator=1",
        "objective.student_index=0",
        "objective.pretrain_steps=1",
        "data.conditions=[0,1,2,3,4]",
    ],
    "lcm": ["objective.trajectory_steps=2"],
    # the sCM family without conversion steps or tangent warm-up: from a student equal to the teacher
    # both have an exactly zero gradient, whose round-off Adam would blow up to full-size steps
    "scm": ["objective.convert_steps=0", "objective.tangent_warmup=0"],
    "tbcm": [
        "objective.convert_steps=0",
        "objective.tangent_warmup=0",
        "objective.route_steps=4",
        "objective.points_per_step=5",
    ],
    "rcm": [
        "objective.convert_steps=0",
        "objective.tangent_warmup=0",
        "objective.dmd_start=0",
        "objective.critic_updates_per_student=1",
        "optim.generator.lr=1e-3",  # rCM's own learning rates (2e-6, 4e-7) move the weights by round-off only
        "optim.fake_score.lr=1e-3",
    ],
    "tdm": ["objective.num_steps=2"],
    "ircm": ["objective.decouple_steps=1"],  # the linear phase, then the coupled one
    "tadsr": [],
}
QUIET = [
    "log.trackers=[]",
    "log.progress=false",
    "log.every=1",
    "log.sample_every=0",
    "log.sample_count=2",
    "checkpoint.every=0",
    "optim.default.lr=1e-3",
    "optim.default.warmup_steps=0",
    # Adam's eps: an attention key bias has an exactly zero gradient (softmax ignores a shift shared
    # by all keys), computed as round-off that another reduction order changes; at eps 1e-8 Adam
    # turns that round-off into full-size steps, at 1e-5 it leaves it at round-off size
    "optim.default.eps=1e-5",
    "ema.rate=0",
]


def real_latents(path: Path) -> Path:
    """Random real latents of the tiny DiT's shape, four of each class."""
    if not path.is_file():
        from safetensors.torch import save_file

        from tests.tiny import NUM_CLASSES

        g = torch.Generator().manual_seed(3)
        shape = tiny_bundle("dit").latent_shape
        n = 4 * NUM_CLASSES
        save_file(
            {"latents": torch.randn((n, *shape), generator=g), "class_labels": torch.arange(n) % NUM_CLASSES},
            str(path),
        )
    return path


def case_config(name: str, out: Path, latents: Path, *extra: str):
    over = [
        f"objective.name={name}",
        f"output_dir={out}",
        f"steps={STEPS}",
        f"data.batch_size={BATCH}",
        "seed=5",
        *QUIET,
        *EXTRA.get(name, []),
        *extra,
    ]
    if name == "nct":  # adapts a trained one-step generator: a 1-step DMD2 run of the tiny DiT
        over.append(f"objective.generator={generator_run(latents.parent / 'nct_generator', latents)}")
    if name in RESTORE:
        over.append("data.real_data=true")
    elif name not in DATA_FREE:
        over.append(f"data.real_latents={latents}")
    return load_config(None, over)


def generator_run(out: Path, latents: Path) -> Path:
    """A one-step generator for nct: DMD2 on the tiny DiT for one step, trained once per folder
    (in the process that launches the test, before any multi-process run reads it)."""
    if not (out / "run_card.json").is_file():
        from fewstep.training import run

        over = [f"output_dir={out}", "steps=1", f"data.batch_size={BATCH}", "seed=5", *QUIET]
        run(load_config(None, ["objective.name=dmd2", *over, "objective.fake_updates_per_generator=1"]), teacher())
    return out


def teacher(name: str | None = None):
    if name in RESTORE:
        from tests.dist.bundles import restore_bundle

        return restore_bundle()
    return tiny_bundle("dit")


def trained_state(objective) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the objective's networks, by role-qualified name (CPU, float32)."""
    out: dict[str, torch.Tensor] = {}
    for role, net in objective.nets.items():
        for n, p in net.named_parameters():
            if p.requires_grad:
                t = p.detach()
                t = t.full_tensor() if hasattr(t, "full_tensor") else t
                out[f"{role}.{n}"] = t.float().cpu().clone()
    return out


def records(run_dir: Path) -> list[dict[str, float]]:
    """Per-step losses and gradient norms of every group (the run's metrics.jsonl)."""
    out = []
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        out.append({k: v for k, v in r.items() if k.startswith(("loss/", "grad_norm/"))})
    return out


def start_state(state: dict[str, torch.Tensor], name: str | None = None) -> dict[str, torch.Tensor]:
    """The initial value of each tensor of `state` that is a copy of a teacher weight (students and
    fake scores start as the teacher; heads and other new parts are left out)."""
    init = {n: p.detach().float() for n, p in teacher(name).denoiser.named_parameters()}
    out = {}
    for k in state:
        n = k.split(".", 1)[1]
        if n in init and init[n].shape == state[k].shape:
            out[k] = init[n]
    return out


def rel_diff(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], name: str | None = None) -> float:
    """|got - ref| over how far training moved ref's teacher-initialised tensors: the float
    round-off of another reduction order is ~1e-6; another training (other draws, another
    weighting of the samples) is of order 1."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    start = start_state(ref, name)
    num = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
    if not start:  # only new parts train (nct's control adapter): relative to the weights' size
        den = sum(float((ref[k] ** 2).sum()) for k in ref) ** 0.5
        return num / den
    den = sum(float(((ref[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    assert den > 0, "training did not move the weights"
    return num / den
