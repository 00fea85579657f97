"""NCT: Noise Consistency Training, a new control for a frozen one-step generator, data-free
(outline in ALGORITHMS.md sec. 15; the authors' code was not available here, so the exact loss
below is this project's reading of the outline and the paper, stated in full).

G(z, y) is the frozen one-step generator (a student of this project, from its run dir), C a
control signal model (`fewstep.controls.CONTROLS`), G_phi(z, y, c) the generator with the
control adapter (`fewstep.controls.AdaptedGenerator`, zero-initialised). Per sample:

    z0 ~ N(0, I), x = G(z0, y), c = C(decode(x))      the generator's own output sets the control,
                                                     so z0 is coupled with c and G(z0) satisfies it
    z_s = sqrt(1 - s^2) z0 + s eps                    the noise-space VP process: z_s ~ N(0, I) for
                                                     every s, its dependence on c fades as s -> 1
    s ~ U[0, 1], s' = max(0, s - delta), the same eps for both
                                                     (`levels: coupling`, a named variant: the
                                                     coupling a = sqrt(1 - s^2) ~ U[0, 1] instead,
                                                     a' = min(1, a + delta), so free noise is
                                                     trained as often as coupled noise; with s
                                                     uniform, a < 0.3 in 4.6% of draws)
    L_nc = mean (G_phi(z_s, y, c) - sg G_phi(z_s', y, c))^2
                                                     noise consistency (the paper's form, the
                                                     default): the adapted output at a less coupled
                                                     noise is pulled onto the one at a more coupled
                                                     noise, so that along the chain s' -> s free
                                                     noise (s = 1) inherits what coupled noise
                                                     (s = 0) gives: an image that satisfies c
    L_b  = mean (G_phi(z0, y, c) - G(z0, y))^2        boundary: where the noise already fits c,
                                                     the adapted generator is the generator
    L_c  = mean (C(decode(G_phi(z_s, y, c))) - c)^2   the control term: only the control model
    L    = w_nc L_nc + w_b L_b + w_c L_c

`consistency: residual` is a named variant (this project's first reading, measured beside the
default in BENCHMARKS.md): the consistency acts on what the adapter changes, r(z) = G_phi(z, y, c)
- G(z, y), as L_nc = mean (r(z_s) - sg r(z_s'))^2. It asks only that the change be smooth in s,
so free noise is pulled toward the control by L_c alone.

When the adapter ignores the control (G_phi = G) and the generator's output does not depend on
its noise and already satisfies the control, every term of either form is zero.

No real image is read: the builder refuses a run with real data (ctx.has_real_data) and the loss
refuses a batch that carries "x0"; the only images are the generator's own outputs. One
optimizer group, "generator", trains the adapter alone (the generator stays frozen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..controls import AdaptedGenerator, ControlAdapter, adapter_layers, control_model
from .base import Batch, GlobalBatchDraws, freeze

__all__ = ["NCTConfig", "NCT", "build", "load_generator", "noise_levels"]


@dataclass
class NCTConfig:
    generator: str = ""  # run dir of the one-step generator (run_card.json, final/<generator_weights>)
    generator_weights: str = "student"  # "student" or "student_ema"
    control: str = "downsample"  # a name in fewstep.controls.CONTROLS
    delta: float = 0.2  # s' = max(0, s - delta): the less-noised side of a consistency pair
    nc_weight: float = 1.0
    boundary_weight: float = 1.0
    control_weight: float = 1.0
    adapter_width: int = 64
    adapter_fold: bool = True  # fold the control's features onto the backbone's token grid (space to
    #   depth) rather than average-pool them there (false: the first design, measured beside it)
    levels: str = "uniform"  # "uniform": s ~ U[0, 1] (the paper's reading); "coupling": the coupling
    #   sqrt(1 - s^2) ~ U[0, 1], so weakly coupled (nearly free) noise is drawn as often as coupled noise
    consistency: str = "output"  # "output": the paper's noise consistency on the adapted outputs;
    #   "residual": on the adapter's change of the output (a named variant)
    feature_layer: str | None = None  # dotted module path in the generator's backbone (default: family tap)
    adapter_layers: str | list[str] | None = None  # null: one layer (feature_layer or the family tap);
    #   "blocks": every transformer block (or UNet down block and mid block); or a list of paths
    layer_name: str | list[str] = ""  # filled in by the builder (recorded in the run card for export)
    adapter_config: dict = field(default_factory=dict)  # filled in by the builder

    def validate(self) -> None:
        control_model(self.control)
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"objective.delta={self.delta}: must be in (0, 1]")
        if min(self.nc_weight, self.boundary_weight, self.control_weight) < 0:
            raise ValueError("objective.nc_weight, boundary_weight and control_weight must be >= 0")
        if self.levels not in ("uniform", "coupling"):
            raise ValueError(f"objective.levels={self.levels!r}: 'uniform' (the paper's reading) or 'coupling'")
        if self.consistency not in ("output", "residual"):
            raise ValueError(f"objective.consistency={self.consistency!r}: 'output' (the paper's form) or 'residual'")
        if self.generator_weights not in ("student", "student_ema"):
            raise ValueError(f"objective.generator_weights={self.generator_weights!r}: 'student' or 'student_ema'")


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a.float() - b.float()) ** 2).mean()


def _coupling(level: Tensor) -> Tensor:
    """How much of z0 the noise z_s at `level` s carries: sqrt(1 - s^2) (and s from a coupling, alike)."""
    return (1 - level * level).clamp_min(0).sqrt()


def noise_levels(u: Tensor, levels: str, delta: float) -> tuple[Tensor, Tensor]:
    """(s, s') of a consistency pair from uniform draws u: "uniform" takes s = u and s' = max(0, s -
    delta); "coupling" takes u as the coupling sqrt(1 - s^2) of z_s to z0 and couples z_s' by delta
    more (at most 1, where s' = 0)."""
    if levels == "coupling":
        return _coupling(u), _coupling((u + delta).clamp_max(1.0))
    return u, (u - delta).clamp_min(0.0)


class NCT:
    def __init__(
        self,
        adapted: AdaptedGenerator,
        teacher: nn.Module,
        params: NCTConfig,
        t0: float,
        decode,
        sampling,
        seed: int = 0,
    ):
        self.p = params
        self.seed = int(seed)
        self.t0 = float(t0)
        self.decode = decode
        self.control = control_model(params.control)
        self.nets = {"student": adapted, "teacher": teacher}
        self.groups = {"generator": ["student"]}
        self.sampling = dict(sampling)

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def loss(self, phase: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if phase != "generator":
            raise ValueError(f"nct has one phase, 'generator'; got {phase!r}")
        if batch.get("x0") is not None:
            raise ValueError("nct is data-free: the batch carries real data (batch['x0']); set data.real_data=false")
        shape = tuple(batch["shape"])
        cond = batch.get("cond")
        device = batch["index"].device if torch.is_tensor(batch.get("index")) else torch.device("cpu")
        draws = GlobalBatchDraws(batch, self.seed, step, rows=shape[0], device=device)
        z0 = draws.normal(*shape[1:])
        eps = draws.normal(*shape[1:])
        u = draws.uniform(torch.float64).float()
        s, s2 = noise_levels(u, self.p.levels, self.p.delta)
        adapted = self.nets["student"]

        def noise(level: Tensor) -> Tensor:
            lv = level.reshape(-1, *([1] * (z0.ndim - 1)))
            return _coupling(lv) * z0 + lv * eps

        z_s, z_s2 = noise(s), noise(s2)
        with torch.no_grad():
            x = adapted(z0, self.t0, cond)  # no control: the frozen generator
            c = self.control(self.decode(x))
            ccond = {**(cond or {}), "control": c}
            target = adapted(z_s2, self.t0, ccond)
            if self.p.consistency == "residual":
                base_s = adapted(z_s, self.t0, cond)
                target = target - adapted(z_s2, self.t0, cond)
        out_s = adapted(z_s, self.t0, ccond)
        l_nc = _mse(out_s - base_s, target) if self.p.consistency == "residual" else _mse(out_s, target)
        l_b = _mse(adapted(z0, self.t0, ccond), x)
        l_c = _mse(self.control(self.decode(out_s)), c)
        loss = self.p.nc_weight * l_nc + self.p.boundary_weight * l_b + self.p.control_weight * l_c
        with torch.no_grad():  # the control error from free noise (s = 1), what a user notices
            err_free = (
                _mse(self.control(self.decode(out_s[s > 0.9])), c[s > 0.9])
                if (s > 0.9).any()
                else torch.tensor(float("nan"))
            )
        return loss, {
            "loss": float(loss.detach()),
            "noise_consistency": float(l_nc.detach()),
            "boundary": float(l_b.detach()),
            "control": float(l_c.detach()),
            "control_free_noise": float(err_free),
        }


def load_generator(run_dir: str | Path, teacher, make_copy, weights: str = "student"):
    """The one-step generator of a training run: a copy of the teacher Denoiser with the run's
    weights, and the run card's sampling."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    card_file = run_dir / "run_card.json"
    if not card_file.is_file():
        raise FileNotFoundError(f"objective.generator={str(run_dir)!r}: no run_card.json (train the generator first)")
    card = json.loads(card_file.read_text())
    wdir = run_dir / card["files"].get(weights, f"final/{weights}")
    wfile = wdir / "diffusion_pytorch_model.safetensors"
    if not wfile.is_file():
        raise FileNotFoundError(f"objective.generator: no {weights} weights at {wfile}")
    gen = make_copy(teacher)
    gen.backbone.load_state_dict(load_file(str(wfile)))
    freeze(gen)
    return gen, card["sampling"]


def _token_grid(backbone: nn.Module) -> int | None:
    """The side of a patch-embedding backbone's token grid (a DiT: sample_size / patch_size), or
    None where the backbone has none (a UNet's blocks are feature maps: pooled onto)."""
    cfg = getattr(backbone, "config", None)
    size, patch = getattr(cfg, "sample_size", None), getattr(cfg, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0 and size % patch == 0:
        return size // patch
    return None


def build(params: NCTConfig | dict[str, Any] | None, teacher, ctx: Any) -> NCT:
    from .rewards import differentiable_decode

    if not isinstance(params, NCTConfig):
        params = NCTConfig(**(params or {}))
    params.validate()
    if getattr(ctx, "has_real_data", False):
        raise ValueError("objective nct is data-free: set data.real_data=false (and no data.real_latents)")
    if not params.generator:
        raise ValueError("objective.generator: the run dir of the one-step generator to adapt (e.g. a DMD2 1-step run)")
    gen, sampling = load_generator(params.generator, teacher, ctx.make_copy, params.generator_weights)
    if len(sampling["times"]) != 2:
        raise ValueError(
            f"objective.generator: NCT adapts a one-step generator; this one samples at {sampling['times']}"
        )
    decode = differentiable_decode(getattr(ctx, "decode", None)) or (lambda x: x)
    single = params.adapter_layers is None  # one layer: the family tap or objective.feature_layer
    which = ([params.feature_layer] if params.feature_layer else None) if single else params.adapter_layers
    layers = adapter_layers(gen.backbone, which)
    names, widths = [n for n, _ in layers], [w for _, w in layers]
    params.layer_name = names[0] if single else names
    # the control's channels: the control model applied to one decoded sample
    with torch.no_grad():
        probe = decode(torch.zeros(1, *ctx.latent_shape, device=ctx.device))
        cc = int(control_model(params.control)(probe).shape[1])
    grid = _token_grid(gen.backbone) if params.adapter_fold else None
    adapter = ControlAdapter(cc, widths[0] if single else widths, params.adapter_width, grid=grid).to(ctx.device)
    params.adapter_config = dict(adapter.config)
    adapted = AdaptedGenerator(gen, params.layer_name, adapter)
    return NCT(adapted, teacher, params, sampling["times"][0], decode, sampling, seed=getattr(ctx, "seed", 0))
