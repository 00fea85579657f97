"""Module entry point for `fewstep eval`: `python -m eval.evaluate --pipeline digits-vp --out eval_out`
(or `python eval/evaluate.py ...`). Same arguments; see `fewstep/evaluate.py`."""
from __future__ import annotations

import sys

from fewstep.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
