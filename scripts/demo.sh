#!/usr/bin/env bash
# Sets up the environment and runs the main job on the embedded default: a DMD2 1-step
# distillation of the digits teacher, then student and teacher FID / class accuracy side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/fewstep demo "$@"
