"""Module entry point for `fewstep eval`: `python -m eval.eval_cmd --pipeline digits-vp --out eval_out`
(or `python eval/eval_cmd.py ...`). Same arguments; see `fewstep/eval_cmd.py`."""

from __future__ import annotations

import sys

from fewstep.eval_cmd import main

if __name__ == "__main__":
    sys.exit(main())
