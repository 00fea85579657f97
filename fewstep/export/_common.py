"""What every part of export shares: the error type, file names and tolerances."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError, read_json

CARD_NAME = "fewstep_card.json"
CARD_FORMAT = "fewstep-export/1"
RUN_CARD_NAMES = ("run_card.json", "card.json", "run.json")
PROBE_RTOL = 1e-5  # replayed pipeline vs fewstep sampler, relative to the sample's range
EXACT_TIMESTEP_SCALING = 1e4  # LCMScheduler boundary scalings: c_skip <= 0.25 / 1e8 at index >= 1
LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"


class ExportError(UserError):
    """A checkpoint, teacher or schedule that cannot be exported (the message says why)."""


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, ExportError)
