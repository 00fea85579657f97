"""The hyperparameters of DMD, DMD2 and Decoupled DMD (`fewstep.objectives.dmd`, whose module
docstring gives the maths): one dataclass with every default and its range checks. MSD, Flash-DMD
and rCM take DMD2's part of their keys from it too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .base import refuse_settings

__all__ = ["VARIANTS", "DMDParams", "params_from_dict", "check_run"]

VARIANTS = ("dmd", "dmd2", "ddmd")  # registry names dmd, dmd2, decoupled_dmd


@dataclass
class DMDParams:
    """Every default of the DMD family; the YAML keys under `objective:`. The registry sets
    `variant` from objective.name (dmd, dmd2, decoupled_dmd). Optimizer settings (lr, AdamW betas,
    clipping) are the entry point's `optim.generator` / `optim.fake_score`; LoRA rank / alpha /
    targets are `lora.*`; the student's EMA is `ema.rate`."""

    variant: str = "dmd2"  # "dmd2", "dmd" (DM + regression, DMD1) or "ddmd" (Decoupled DMD)
    num_steps: int = 1  # student sampling steps (1-4)
    student_times: list[float] | None = None  # student input times, one per step, decreasing in (0, 1]
    conditioning_time: float = 1.0  # 1-step input time when student_times is unset (DMD2: SD1.5 1.0, SDXL 0.4)
    guidance: float = 4.0  # CFG scale of the real score (Imagen form u + w (c - u))
    dm_t_min: float = 0.02  # DM re-noising time range (DMD2: timesteps 20..980)
    dm_t_max: float = 0.98
    fake_t_min: float = 0.001  # fake-score DSM time range [fake_t_min, 1]
    fake_target: str = "native"  # "native" (eps / v / flow target) or "x0"
    fake_updates_per_generator: int | None = None  # two time-scale rule (None: 5; DMD: 1)
    # ---- GAN (DMD2) -----------------------------------------------------------------------
    gan: bool = False  # classifier head on the fake score's bottleneck; needs real latents
    gan_generator_weight: float = 3e-3  # lambda_G (DMD2 ImageNet 3e-3, SDXL 5e-3)
    gan_disc_weight: float = 1e-2  # lambda_D
    gan_block: int | None = None  # transformer block feeding the head (None: the middle one)
    gan_feature_layer: str | None = None  # dotted module path feeding the head (any backbone); None: the
    #   family's tap (fewstep.objectives.gan)
    gan_head_width: int = 128  # channels of the head
    gan_features: str = "fake_score"  # whose features the head reads: "fake_score" (DMD2) or "teacher"
    #   (frozen; the head alone trains)
    gan_t_min: float = 0.001  # noise levels the head sees
    gan_t_max: float = 1.0
    # ---- regression (DMD) -----------------------------------------------------------------
    regression_weight: float | None = None  # lambda_reg (None: 0.25 for DMD, 0 otherwise); > 0 caches teacher pairs
    regression_pairs: int = 1024  # number of (noise, condition) -> teacher sample pairs
    regression_steps: int = 50  # teacher sampler steps (deterministic DDIM / Euler)
    regression_guidance: float | None = None  # teacher CFG for the pairs (None: `guidance`)
    regression_distance: str = "l2"  # "l2" or "pseudo_huber" in latent space (no LPIPS offline)
    regression_huber_c: float = 0.03  # pseudo-Huber c
    # ---- Decoupled DMD (variant ddmd) -----------------------------------------------------
    ca_weight: float = 1.0  # CFG-augmentation term weight
    dm_weight: float = 1.0  # DM term weight (or mean/variance KL weight)
    ca_t_min: float = 0.02  # CA re-noising range, capped by the generator's input time
    ca_t_max: float = 0.98
    ca_schedule: str = "decoupled"  # "coupled": the CA term reuses the DM term's tau and noise (ablation);
    #   "uncapped": its own draw, over [ca_t_min, ca_t_max] without the cap at the input time (ablation)
    ca_normaliser: str = "own"  # "own": each term divided by DMD's normaliser at its own re-noising;
    #   "dm": both by the DM term's, mean|x_hat - x0_real_c| at tau_DM (one scale for the sum, as DMD2's)
    dm_kind: str = "dm"  # "dm" (fake vs real conditional) or "meanvar" (per-channel KL; a batch statistic:
    #   computed per micro-batch on each process, so it depends on data.micro_batch_size and the process count)
    meanvar_target: str = "teacher"  # "teacher" (cached teacher samples) or "real" (batch["x0"])
    meanvar_samples: int = 512  # teacher samples for the "teacher" statistics
    meanvar_steps: int = 25  # teacher sampler steps for those samples
    # ---- memory ---------------------------------------------------------------------------
    shared_base: bool = False  # one frozen backbone; LoRA student and fake switched per role (lora.*)
    cache_dir: str = "runs/cache/dmd"  # teacher sample caches (regression pairs, teacher statistics)

    def __post_init__(self):
        if self.regression_weight is None:
            self.regression_weight = 0.25 if self.variant == "dmd" else 0.0
        if self.fake_updates_per_generator is None:
            self.fake_updates_per_generator = 1 if self.variant == "dmd" else 5

    @property
    def times(self) -> list[float]:
        return (
            [float(t) for t in self.student_times]
            if self.student_times is not None
            else [float(self.conditioning_time)]
        )

    def validate(self) -> None:
        """Raise on a bad value, naming the key (checks that need the run's data are in `build`)."""

        def bad(msg):
            raise ValueError(msg)

        if self.variant not in VARIANTS:
            bad(f"objective.variant={self.variant!r} is not one of {VARIANTS}")
        n = int(self.num_steps)
        if not 1 <= n <= 8:
            bad(f"objective.num_steps={self.num_steps} must be between 1 and 8")
        if self.student_times is None and n > 1:
            bad(
                f"objective.num_steps={n} needs objective.student_times with {n} entries "
                f"(e.g. {[round(1 - i / n, 4) for i in range(n)]})"
            )
        ts = self.times
        if len(ts) != n:
            bad(f"objective.num_steps={n} needs objective.student_times with {n} entries, got {len(ts)}: {ts}")
        if any(not 0 < t <= 1 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
            key = "objective.student_times" if self.student_times is not None else "objective.conditioning_time"
            bad(f"{key} must be strictly decreasing in (0, 1], got {ts}")
        for lo, hi, name in (
            (self.dm_t_min, self.dm_t_max, "dm_t"),
            (self.gan_t_min, self.gan_t_max, "gan_t"),
            (self.ca_t_min, self.ca_t_max, "ca_t"),
            (self.fake_t_min, 1.0, "fake_t"),
        ):
            if not 0 <= lo < hi <= 1:
                bad(f"objective.{name}_min / {name}_max must satisfy 0 <= min < max <= 1, got {lo}, {hi}")
        if self.gan_features not in ("fake_score", "teacher"):
            bad(f"objective.gan_features={self.gan_features!r} must be 'fake_score' or 'teacher'")
        if self.fake_target not in ("native", "x0"):
            bad(f"objective.fake_target={self.fake_target!r} must be 'native' or 'x0'")
        if int(self.fake_updates_per_generator) < 1:
            bad(f"objective.fake_updates_per_generator={self.fake_updates_per_generator} must be >= 1")
        if self.regression_weight < 0:
            bad(f"objective.regression_weight={self.regression_weight} must be >= 0")
        if self.variant == "dmd" and not self.regression_weight > 0:
            bad(
                "objective.regression_weight must be > 0 for DMD (its regression loss; without it use "
                "objective.name: dmd2)"
            )
        if self.regression_weight > 0:
            if n != 1:
                bad(f"objective.regression_weight > 0 needs a 1-step student (objective.num_steps={n})")
            if self.regression_distance not in ("l2", "pseudo_huber"):
                bad(f"objective.regression_distance={self.regression_distance!r} must be 'l2' or 'pseudo_huber'")
            if int(self.regression_pairs) < 1 or int(self.regression_steps) < 1:
                bad("objective.regression_pairs and objective.regression_steps must be >= 1")
        if self.variant == "ddmd" and self.ca_t_min >= min(ts):
            bad(
                f"objective.ca_t_min={self.ca_t_min} must be below the smallest student time {min(ts)} "
                "(the CA term is re-noised below the generator's input level)"
            )
        if self.ca_schedule not in ("decoupled", "coupled", "uncapped"):
            bad(f"objective.ca_schedule={self.ca_schedule!r} must be 'decoupled', 'coupled' or 'uncapped'")
        if self.ca_schedule == "coupled" and self.dm_kind != "dm":
            bad("objective.ca_schedule='coupled' shares the DM term's draw: it needs objective.dm_kind='dm'")
        if self.ca_normaliser not in ("own", "dm"):
            bad(f"objective.ca_normaliser={self.ca_normaliser!r} must be 'own' or 'dm'")
        if self.ca_normaliser == "dm" and self.dm_kind != "dm":
            bad("objective.ca_normaliser='dm' divides by the DM term's normaliser: it needs objective.dm_kind='dm'")
        if self.dm_kind not in ("dm", "meanvar"):
            bad(f"objective.dm_kind={self.dm_kind!r} must be 'dm' or 'meanvar'")
        if self.dm_kind == "meanvar" and self.variant != "ddmd":
            bad("objective.dm_kind='meanvar' is a Decoupled DMD option (objective.name: decoupled_dmd)")
        if self.meanvar_target not in ("teacher", "real"):
            bad(f"objective.meanvar_target={self.meanvar_target!r} must be 'teacher' or 'real'")
        if int(self.meanvar_samples) < 2 or int(self.meanvar_steps) < 1:
            bad("objective.meanvar_samples must be >= 2 and objective.meanvar_steps >= 1")


def params_from_dict(d: dict[str, Any] | None) -> DMDParams:
    """DMDParams from a YAML mapping (without the registry); an unknown key is an error that names
    it. `name` (dmd, dmd2, decoupled_dmd) sets the variant."""
    d = dict(d or {})
    name = d.pop("name", None)
    if name is not None:
        d.setdefault("variant", {"dmd": "dmd", "dmd2": "dmd2", "decoupled_dmd": "ddmd"}.get(name, name))
    known = {f.name for f in dataclasses.fields(DMDParams)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"objective: unknown key(s) {['objective.' + k for k in unknown]}; known keys are {sorted(known)}"
        )
    p = DMDParams(**d)
    p.validate()
    return p


def check_run(params: DMDParams, teacher: Any, ctx: Any) -> None:
    """The checks of `params` that need the run: real data, a teacher with an unconditional branch,
    and what shared-base mode cannot run with."""
    name = {"dmd": "dmd", "dmd2": "dmd2", "ddmd": "decoupled_dmd"}[params.variant]
    has_real = bool(getattr(ctx, "has_real_data", False))
    if params.gan and not has_real:
        raise ValueError(
            f"objective.gan=true needs real data (real latents in batch['x0']): set data.real_data: "
            f"true, or objective.gan: false ({name})"
        )
    ddmd = params.variant == "ddmd"
    if ddmd and params.dm_kind == "meanvar" and params.meanvar_target == "real" and not has_real:
        raise ValueError(
            "objective.meanvar_target='real' needs real data (batch['x0']): set data.real_data: true "
            "or objective.meanvar_target: teacher"
        )
    if ddmd and teacher.conditioner.guidance_embedded:
        raise ValueError(
            "objective.name=decoupled_dmd needs a teacher with an unconditional branch; this one is "
            "guidance-distilled (guidance is an input), so the CFG-augmentation term has no (c - u)"
        )
    if params.shared_base:
        refuse_settings(
            ctx,
            sharded="objective.shared_base=true cannot run sharded (FSDP shards each network on its own); "
            "use lora.student / lora.fake instead",
        )
