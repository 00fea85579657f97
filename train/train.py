"""The training entry point.

    accelerate launch train/train.py --config configs/digits/dsm.yaml [key=value ...] [--dry-run]
    accelerate launch --config_file configs/accelerate/fsdp2.yaml train/train.py --config ...

One script, whatever the objective: it loads the preset (fewstep/config.py), then runs
`fewstep.training.run`, whose body (fewstep/training/loop.py) reads top to bottom: accelerator ->
teacher -> objective via the registry -> optimizers per group -> prepare -> for each step and
phase: loss, backward, clip, non-finite check, step, zero all grads, after_step -> EMA -> log,
sample grid, checkpoint -> final weights and run card. The loop lives in the package so that
`fewstep train` and the tests run exactly the same code in-process.
"""

import sys

from fewstep.train_cmd import main

if __name__ == "__main__":
    sys.exit(main())
