"""Periodic evaluation during training: every `eval.every` steps the student samples
`eval.num_samples` images (labels balanced over the classes, fixed noise from `eval.seed`, so
every evaluation scores the same draws) and the evaluation stack scores them
(`fewstep.evaluation.digits.digits_scores`: FID in the digits judge's features against all 1,797
real digits, and the judge's class accuracy). The scores go to the trackers and metrics.jsonl as
`eval/fid` and `eval/class_acc`.

Only teachers with a judge can be scored this way: the embedded digits teachers. A small sample
gives a biased FID (it falls as the sample grows), so these numbers follow the trend of one run;
compare students with `fewstep eval` on the protocol's 2,000 samples.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config, ConfigError
from ..samplers import initial_noise, sample

__all__ = ["JUDGED_TEACHERS", "check_eval", "due", "evaluate_student"]

JUDGED_TEACHERS = ("digits-vp", "digits-flow")  # teachers whose samples the project's judge can read


def check_eval(cfg: Config, source: str) -> None:
    """Raise a ConfigError naming eval.every when periodic evaluation is asked of a teacher
    without a judge."""
    if cfg.eval.every and source not in JUDGED_TEACHERS:
        raise ConfigError(
            f"eval.every={cfg.eval.every}: periodic evaluation needs a judge for the teacher's images, and "
            f"only the embedded teachers ({', '.join(JUDGED_TEACHERS)}) have one; teacher {source!r} has none. "
            "Set eval.every=0 and score an export with `fewstep eval` (Inception FID, CLIP score)"
        )


def due(cfg: Config, done: int) -> bool:
    """Whether the student is evaluated after step `done` (every eval.every steps, and at the end)."""
    every = cfg.eval.every
    return bool(every) and (done % every == 0 or done == cfg.steps)


def evaluate_student(
    cfg: Config,
    student: nn.Module,
    sampling: dict,
    bundle,
    num_classes: int | None,
    device: torch.device,
    main: bool,
    sharded: bool,
    batch_size: int = 250,
) -> dict[str, float]:
    """{"eval/fid", "eval/class_acc"} of the student's samples on the main process ({} elsewhere;
    every process samples when the networks are sharded). Torch's RNG is left as it was."""
    if not (main or sharded):
        return {}
    from ..evaluation.digits import digits_scores

    n = cfg.eval.num_samples
    k = num_classes or 10
    labels = torch.arange(n) % k
    noise = initial_noise((n, *bundle.latent_shape), torch.Generator().manual_seed(cfg.eval.seed))
    fresh = torch.Generator().manual_seed(cfg.eval.seed + 1)
    rng = torch.get_rng_state()
    images = []
    for i in range(0, n, batch_size):
        x0 = sample(
            student,
            noise[i : i + batch_size].to(device),
            {"class_labels": labels[i : i + batch_size].to(device)},
            sampling["times"],
            renoise=sampling["renoise"],
            generator=fresh,
        )
        images.append((bundle.decode(x0) if bundle.decode is not None else x0).float().cpu())
    torch.set_rng_state(rng)
    if not main:
        return {}
    scores = digits_scores(torch.cat(images), labels)
    return {"eval/fid": float(scores["fid"]), "eval/class_acc": float(scores["class_acc"])}
