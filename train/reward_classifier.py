"""Train the digits reward classifier (Flash-DMD's embedded reward) and write
fewstep/digits/weights/reward_classifier.safetensors plus its card reward_classifier.json.

    OMP_NUM_THREADS=1 python train/reward_classifier.py        # under a minute on one CPU core

It is NOT an evaluation judge. A student fine-tuned on a reward learns whatever that network
rewards, including its blind spots; scoring the result with the same network would measure the
hacking, not the digits. So the reward classifier is a separate network: the judge's recipe
(`train/judge.py`, same data split) with another seed (7), half the width (16 channels) and
another feature size (32), trained for fewer epochs (20). The judge that scores runs
(fewstep/digits/weights/judge.safetensors) is never used as a reward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from judge import main as train_classifier  # noqa: E402  (train/judge.py: the judge's recipe)

from fewstep.digits.data import WEIGHTS_DIR  # noqa: E402

OUT = WEIGHTS_DIR / "reward_classifier.safetensors"
DEFAULTS = ["--seed", "7", "--width", "16", "--feature-dim", "32", "--epochs", "20", "--out", str(OUT)]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    card = train_classifier(DEFAULTS + argv)  # later flags override the defaults
    card.update(
        {
            "name": "fewstep-digits-reward-classifier",
            "command": " ".join(["python train/reward_classifier.py", *argv]),
            "role": "reward for Flash-DMD's reward phase (fewstep.objectives.rewards.DigitsClassReward); "
            "NOT an evaluation judge: runs are scored by fewstep-digits-judge, a different network",
        }
    )
    OUT.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


if __name__ == "__main__":
    main()
