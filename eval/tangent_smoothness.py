"""How smooth in time is a teacher? Its exact time derivative against secants at growing scales.

    python eval/tangent_smoothness.py                       # both embedded digits teachers
    python eval/tangent_smoothness.py --teachers digits-vp --angles 0.3 1.45 --count 32

For real digits latents x0 and TrigFlow angles theta (sigma_d = 1), x = cos x0 + sin z is held fixed
and F(x, theta) of the unguided teacher (`fewstep.objectives._trigflow.net_F`) is differentiated in
theta: exactly with `torch.func.jvp`, and by central secants over +-k timestep indices of the
teacher's own path (k = 0.2, 1, 10). Printed per angle: the mean per-sample norms |J| and |secant|
and the mean relative difference |J - secant| / |secant|. A function smooth on the scale of the
sampling steps has all three close; where |J| is several times the 10-index secant, the exact
tangent of sCM / TBCM is dominated by sub-step variation and `objective.tangent_delta` applies.
"""

from __future__ import annotations

import argparse

import torch

from fewstep.objectives import _trigflow as tf
from fewstep.paths import _bcast
from fewstep.pipeline_teacher import load_teacher
from fewstep.training.bundle import bundle_from_teacher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["digits-vp", "digits-flow"])
    ap.add_argument("--angles", nargs="+", type=float, default=[0.3, 0.8, 1.2, 1.45])
    ap.add_argument(
        "--indices",
        nargs="+",
        type=float,
        default=[0.2, 1.0, 10.0],
        help="half-widths of the secants, in timestep indices (1/num_train_timesteps of t)",
    )
    ap.add_argument("--count", type=int, default=16, help="real latents per angle")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(
        "| teacher | angle | secant half-width (indices) | mean norm of exact derivative | mean norm of secant | relative difference |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.teachers:
        torch.manual_seed(args.seed)
        t = load_teacher(name)
        bundle = bundle_from_teacher(t, name, "cpu")
        if bundle.real_data is None:
            raise SystemExit(f"--teachers {name}: no real data to take points from")
        x0, labels = bundle.real_data()
        idx = torch.randperm(x0.shape[0])[: args.count]
        x0 = x0[idx].float()
        cond = {"class_labels": labels[idx].long()} if labels is not None else None
        d, path = t.denoiser, t.denoiser.path
        n = float(getattr(path, "num_train_timesteps", 1000))
        for th in args.angles:
            theta = torch.full((x0.shape[0],), float(th))
            z = torch.randn_like(x0)
            x = _bcast(torch.cos(theta), x0) * x0 + _bcast(torch.sin(theta), x0) * z

            def F(tt, x=x, d=d, cond=cond, path=path):
                return tf.net_F(d, x, tt, cond, 1.0, path)

            with torch.no_grad(), tf.forward_ad_safe(d):
                _, J = torch.func.jvp(F, (theta,), (torch.ones_like(theta),))
            t_mid = tf.t_of_angle(path, theta.double())
            for k in args.indices:
                up = tf.angle_of_t(path, (t_mid + k / n).clamp(max=1.0)).float()
                dn = tf.angle_of_t(path, (t_mid - k / n).clamp(min=0.0)).float()
                with torch.no_grad():
                    sec = (F(up) - F(dn)) / _bcast(up - dn, x0)
                nj, ns = J.flatten(1).norm(dim=1), sec.flatten(1).norm(dim=1)
                rel = (J - sec).flatten(1).norm(dim=1) / ns
                print(f"| {name} | {th:g} | {k:g} | {nj.mean():.2f} | {ns.mean():.2f} | {rel.mean():.3f} |")


if __name__ == "__main__":
    main()
