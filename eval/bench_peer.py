"""fewstep's DMD2 beside NVlabs/FastGen's DMD2 on networks of equal size, at equal work.

    python eval/bench_peer.py [--rounds 3] [--cycles 3] [--out runs/bench_peer.json]
        [--fastgen PATH [--fastgen-deps DIR]] [--baseline PATH] [--compile] [--gan-tap LAYER]

The network: a diffusers `UNet2DModel` shaped like FastGen's EDM SongUNet in its DMD2 test
configuration (tests/test_dmd2model.py there: img_resolution 8, channel_mult [1], 128 channels,
4 blocks, attention at the bottleneck): one 8x8 level of 128 channels, 4 resnets down, a mid
block (resnet, attention, resnet), 5 resnets up, 11 class embeddings; 5,285,763 parameters per
role (FastGen's: 5,282,820). Pixels 3x8x8, batch 16, float32, one thread, class-conditional,
no CFG (FastGen's default guidance_scale None; fewstep guidance 1.0).

Work per update. fewstep's `objective.fake_updates_per_generator: 5` makes 5 fake-score updates
per generator update (the fake score updates every step, the generator every 5th). FastGen's
`student_update_freq: 5` makes 4: iteration i updates the student when i % 5 == 0 and the fake
score otherwise. For equal work FastGen runs here with student_update_freq 6 (5 fake-score updates
per generator update); per-update times do not depend on the ratio, and the cycle time is
1 generator update + 5 fake-score updates on both sides.

One update is what each training loop does per optimizer step: fewstep: loss, backward, gradient
clipping of the updated group, AdamW step, zero every gradient (fewstep.training.loop); FastGen:
`single_train_step` under its autocast context, backward, gradient clipping of the active
networks (its GradClip callback), `optimizers_schedulers_step`, `optimizers_zero_grad`
(fastgen/trainer.py `train_step` without the other callbacks). Each configuration runs in a
forked process (torch and diffusers imported once, before the fork), so its peak memory is its
own; one warm-up cycle, then --cycles timed cycles; the configurations are run interleaved, --rounds times, and medians over rounds are reported. Peak
memory is the process's peak resident set, and that peak minus the resident set after the
networks and optimizers are built (the training working set).

fewstep configurations: GAN off / on, full copies / shared base (LoRA rank 16 on one frozen
backbone); with the GAN on, the head on the fake score's bottleneck (DMD2; the default) or on the
frozen teacher's (`gan_features: teacher`, FastGen's choice). The noise levels are drawn as
FastGen does (one range for the DSM, DM and GAN terms: dm_t, gan_t = [0.02, 1], fake_t_min
0.02), so the passes that FastGen shares fewstep shares too. `--baseline PATH` also times a
fewstep source tree given by path (e.g. `git archive` of an earlier commit) with the same
settings: the before / after of a change, on the same machine in the same interleaved rounds.

Where the GAN head reads. fewstep's default tap on a UNet is the mid-block output (resnet,
attention, resnet after the encoder: 236.8 MFLOP per sample for a features-only pass of this
network, `torch.utils.flop_counter`); FastGen's discriminator reads its SongUNet's last encoder
block (`feature_indices` {0}: 152.6 MFLOP, its bottleneck attention comes after, in the decoder).
`--gan-tap down_blocks.0` adds the two fewstep GAN-on configurations again with
`objective.gan_feature_layer` at the end of the encoder, which costs the same 152.6 MFLOP as
FastGen's: the features-only passes at equal work.

`--compile` adds the fewstep configurations (full copies) again with `precision.compile` on: the
student, fake score and teacher backbones compiled in place (`fewstep.training.compile`), as a run
with the switch does; FastGen has no such switch. A compiled configuration warms up for
`--compile-warmup` cycles (compilation, and recompilation for each batch shape the passes use)
before its timed cycles, and its rows are marked "compiled".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SHAPE, CLASSES, RATIO = 16, (3, 8, 8), 10, 5
SAME_DRAWS = dict(dm_t_min=0.02, dm_t_max=1.0, gan_t_min=0.02, gan_t_max=1.0, fake_t_min=0.02)
NOTE = (
    "fewstep fake_updates_per_generator: 5 = 5 fake-score updates per generator update; FastGen "
    "student_update_freq: 5 = 4 (i % 5 == 0 updates the student); FastGen runs here at "
    "student_update_freq 6 = 5 per generator update (equal work)."
)


# ---- one configuration, in its own process ------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def unet():
    """The UNet2DModel of equal size to FastGen's 8x8 SongUNet (5,285,763 parameters)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=4,
        block_out_channels=(128,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        num_class_embeds=CLASSES + 1,  # + the null class
        norm_num_groups=32,
    )


def _fewstep_child(cfg: dict) -> dict:
    sys.path.insert(0, cfg["tree"])
    import torch
    from diffusers import DDPMScheduler

    from fewstep.denoiser import Denoiser
    from fewstep.objectives.base import trainable_parameters
    from fewstep.objectives.dmd import DMDParams, build, context
    from fewstep.paths import path_from_scheduler_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bb = unet()
    teacher = Denoiser(bb, path_from_scheduler_config(dict(DDPMScheduler().config)), null_class=CLASSES)
    teacher.requires_grad_(False)
    kw = dict(cfg["params"])
    params = DMDParams(variant="dmd2", guidance=1.0, fake_updates_per_generator=RATIO, **kw)
    lora = argparse.Namespace(rank=16, alpha=16.0, target_modules=None, dropout=0.0)
    obj = build(params, teacher, context(latent_shape=SHAPE, has_real_data=True, lora=lora))
    if cfg.get("compile"):
        from fewstep.training.compile import compile_backbones

        compile_backbones(obj.nets.values())
    opts = {
        g: torch.optim.AdamW(trainable_parameters(obj, g), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999))
        for g in obj.groups
    }
    n_params = {r: sum(p.numel() for p in n.parameters()) for r, n in obj.nets.items()}
    g = torch.Generator().manual_seed(1)
    batch = {
        "cond": {"class_labels": torch.randint(0, CLASSES, (BATCH,), generator=g)},
        "x0": torch.randn((BATCH, *SHAPE), generator=g),
        "shape": (BATCH, *SHAPE),
    }

    def update(phase: str, step: int) -> float:
        t0 = time.perf_counter()
        loss, _ = obj.loss(phase, batch, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(obj, phase), 1.0)
        opts[phase].step()
        for net in obj.nets.values():
            net.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    rss_built = _rss_mib()
    times: dict[str, list[float]] = {"generator": [], "fake_score": []}
    warm = cfg.get("warmup_cycles", 1)
    for step in range((cfg["cycles"] + warm) * RATIO):
        for phase in obj.phases(step):
            dt = update(phase, step)
            if step >= warm * RATIO:  # the first cycles warm up (and compile)
                times[phase].append(dt)
    return {"times": times, "rss_built_mib": rss_built, "peak_mib": _peak_mib(), "params": n_params}


def _fastgen_child(cfg: dict) -> dict:
    sys.path[:0] = [cfg["fastgen"], *cfg["deps"]]
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from fastgen.configs.config_utils import override_config_with_opts
    from fastgen.configs.methods.config_dmd2 import ModelConfig
    from fastgen.methods import DMD2Model

    c = ModelConfig()
    c.net = override_config_with_opts(c.net, ["-", "img_resolution=8", "channel_mult=[1]", "channel_mult_noise=1"])
    c.discriminator = override_config_with_opts(
        c.discriminator, ["-", "feature_indices=[0]", "all_res=[8]", "in_channels=128"]
    )
    c.device, c.precision, c.pretrained_model_path = torch.device("cpu"), "float32", ""
    c.input_shape = list(SHAPE)
    c.student_update_freq = RATIO + 1  # 5 fake-score updates per student update, as fewstep's 5
    c.gan_loss_weight_gen = 1e-3 if cfg["gan"] else 0.0
    m = DMD2Model(c)
    m.on_train_begin()
    m.init_optimizers()
    n_params = {k: sum(p.numel() for p in v.parameters()) for k, v in m.model_dict.items()}
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    data = {
        "real": torch.randn((BATCH, *SHAPE), generator=g),
        "condition": torch.nn.functional.one_hot(labels, CLASSES).float(),
        "neg_condition": torch.zeros(BATCH, CLASSES),
    }

    def update(it: int) -> float:
        t0 = time.perf_counter()
        with m.autocast():
            loss_map, _ = m.single_train_step(data, it)
        m.grad_scaler.scale(loss_map["total_loss"]).backward()
        params = [p for o in m.get_optimizers(it) for grp in o.param_groups for p in grp["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        m.optimizers_schedulers_step(it)
        m.optimizers_zero_grad(it)
        return time.perf_counter() - t0

    rss_built = _rss_mib()
    times: dict[str, list[float]] = {"generator": [], "fake_score": []}
    freq = c.student_update_freq
    for it in range((cfg["cycles"] + 1) * freq):
        dt = update(it)
        if it >= freq:
            times["generator" if it % freq == 0 else "fake_score"].append(dt)
    return {"times": times, "rss_built_mib": rss_built, "peak_mib": _peak_mib(), "params": n_params}


# ---- the driver ---------------------------------------------------------------------------------
def configurations(args) -> list[dict]:
    tree = str(ROOT)
    out = []
    for gan in (False, True):
        for shared in (False, True):
            p = dict(SAME_DRAWS, gan=gan, shared_base=shared)
            out.append(
                dict(name=f"fewstep gan {'on' if gan else 'off'} {'shared' if shared else 'full'}", tree=tree, params=p)
            )
        if gan:
            p = dict(SAME_DRAWS, gan=True, gan_features="teacher")
            out.append(dict(name="fewstep gan on (teacher features) full", tree=tree, params=p))
    if args.gan_tap:
        for feats in ("fake_score", "teacher"):
            p = dict(SAME_DRAWS, gan=True, gan_features=feats, gan_feature_layer=args.gan_tap)
            label = "teacher features, " if feats == "teacher" else ""
            out.append(dict(name=f"fewstep gan on ({label}tap {args.gan_tap}) full", tree=tree, params=p))
    if args.compile:  # the full-copy configurations above, again compiled
        out += [
            {**c, "name": f"{c['name']} compiled", "compile": True, "warmup_cycles": args.compile_warmup}
            for c in out
            if c["name"].endswith(" full") and "tap " not in c["name"]
        ]
    if args.baseline:
        for gan in (False, True):
            out.append(
                dict(
                    name=f"baseline gan {'on' if gan else 'off'} full",
                    tree=str(Path(args.baseline).resolve()),
                    params=dict(SAME_DRAWS, gan=gan),
                )
            )
    if args.fastgen:
        deps = [str(Path(d).resolve()) for d in args.fastgen_deps]
        for gan in (False, True):
            out.append(
                dict(
                    name=f"FastGen gan {'on' if gan else 'off'} full",
                    fastgen=str(Path(args.fastgen).resolve()),
                    deps=deps,
                    gan=gan,
                )
            )
    for c in out:
        c["cycles"] = args.cycles
    return out


def run_child(cfg: dict) -> dict:
    """One configuration in a forked process (torch and diffusers are imported once, before the
    fork; fewstep or FastGen in the child), so each has its own peak memory."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            res = _fastgen_child(cfg) if "fastgen" in cfg else _fewstep_child(cfg)
            payload = json.dumps(res)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            import traceback

            payload, code = json.dumps({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}), 1
        with os.fdopen(w, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    res = json.loads(data) if data else {"error": "no result"}
    if "error" in res:
        raise RuntimeError(f"{cfg['name']} failed: {res['error']}")
    return res


def summarise(name: str, runs: list[dict]) -> dict:
    med = statistics.median
    gen = med(med(r["times"]["generator"]) for r in runs)
    fake = med(med(r["times"]["fake_score"]) for r in runs)
    return {
        "name": name,
        "s_per_fake_update": fake,
        "s_per_generator_update": gen,
        "s_per_cycle": gen + RATIO * fake,
        "peak_rss_mib": med(r["peak_mib"] for r in runs),
        "peak_above_built_mib": med(r["peak_mib"] - r["rss_built_mib"] for r in runs),
        "params": runs[0]["params"],
        "rounds": len(runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=3, help="timed cycles of 1 generator + 5 fake-score updates")
    ap.add_argument("--fastgen", help="path of a NVlabs/FastGen checkout (its `fastgen` package inside)")
    ap.add_argument("--fastgen-deps", nargs="*", default=[], help="directories with FastGen's dependencies")
    ap.add_argument("--baseline", help="path of another fewstep source tree to time beside this one")
    ap.add_argument("--gan-tap", help="also time the GAN-on configurations with the head on this layer")
    ap.add_argument("--compile", action="store_true", help="also time fewstep with precision.compile on")
    ap.add_argument("--compile-warmup", type=int, default=2, help="warm-up cycles of a compiled configuration")
    ap.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    ap.add_argument("--out", default="runs/bench_peer.json")
    args = ap.parse_args()
    import diffusers  # noqa: F401  (imported once; every configuration is a fork of this process)
    import torch

    torch.set_num_threads(1)
    cfgs = configurations(args)
    if args.only:
        cfgs = [c for c in cfgs if any(s in c["name"] for s in args.only)]
    print(NOTE, flush=True)
    results: dict[str, list[dict]] = {c["name"]: [] for c in cfgs}
    for rnd in range(args.rounds):
        for c in cfgs:  # interleaved: every configuration once per round
            res = run_child(c)
            results[c["name"]].append(res)
            t = res["times"]
            print(
                f"round {rnd + 1}/{args.rounds} {c['name']}: fake {statistics.median(t['fake_score']):.3f} s, "
                f"generator {statistics.median(t['generator']):.3f} s, peak {res['peak_mib']:.0f} MiB",
                flush=True,
            )
    rows = [summarise(n, r) for n, r in results.items()]
    by = {r["name"]: r for r in rows}
    print(f"\n{NOTE}\nbatch {BATCH}, {SHAPE} pixels, float32, 1 thread; medians of {args.rounds} interleaved rounds")
    print(
        "| configuration | s / fake-score update | s / generator update | s / cycle (1 G + 5 F) | peak RSS MiB | peak above built MiB | vs FastGen (F, G, cycle) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gan = "gan on" if "gan on" in r["name"] else "gan off"
        peer = by.get(f"FastGen {gan} full")
        ratio = ""
        if peer and not r["name"].startswith("FastGen"):
            ratio = ", ".join(
                f"{r[k] / peer[k]:.2f}x" for k in ("s_per_fake_update", "s_per_generator_update", "s_per_cycle")
            )
        print(
            f"| {r['name']} | {r['s_per_fake_update']:.3f} | {r['s_per_generator_update']:.3f} | "
            f"{r['s_per_cycle']:.3f} | {r['peak_rss_mib']:.0f} | {r['peak_above_built_mib']:.0f} | {ratio} |"
        )
    for gan in ("off", "on"):
        base, new = by.get(f"baseline gan {gan} full"), by.get(f"fewstep gan {gan} full")
        if base and new:
            print(
                f"before -> after, gan {gan}, full copies: fake-score update {base['s_per_fake_update']:.3f} -> "
                f"{new['s_per_fake_update']:.3f} s ({new['s_per_fake_update'] / base['s_per_fake_update']:.2f}x), "
                f"generator update {base['s_per_generator_update']:.3f} -> {new['s_per_generator_update']:.3f} s "
                f"({new['s_per_generator_update'] / base['s_per_generator_update']:.2f}x)"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"note": NOTE, "rows": rows, "runs": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
