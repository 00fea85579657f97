"""`fewstep eval`: score teachers, exported student pipelines and training runs with FID, KID,
precision/recall (torch-fidelity), class accuracy (the digits judge), CLIP score (torchmetrics,
local weights) and within-condition diversity, under named protocols, offline.

    from fewstep.evaluation import EvalSpec, evaluate
    results = evaluate(EvalSpec(pipeline="digits-vp", steps=[1, 2, 4], out="eval_out"))

Modules: protocols (presets), inputs (reading folders and files, atomic writes), sources (loading
what generates) and generation (`Source`, what generates), scores (FID / KID / precision-recall;
`fidelity_metrics` for one call on tensors, datasets or folders), diversity and clip_score (the
other metrics), digits (the real digits as reference, class accuracy, `digits_scores`), panel (the
digits judge panel, bootstrap intervals, the real-vs-real floor, the claims rule), safe_weights
(extractor weights handed to torch-fidelity), run (the evaluation itself), checks (what it checks
before generating), images (keeping and saving images), report (results.md).
"""

from .diversity import diversity, vendi_score
from .inputs import ImageFolder, InputError
from .protocols import PROTOCOLS, Protocol, get_protocol
from .run import METRICS, EvalSpec, evaluate, markdown_table
from .scores import Extractor, ReferenceFeatures, fidelity_from_features, fidelity_metrics

__all__ = [
    "EvalSpec",
    "evaluate",
    "markdown_table",
    "METRICS",
    "PROTOCOLS",
    "Protocol",
    "get_protocol",
    "ImageFolder",
    "InputError",
    "Extractor",
    "ReferenceFeatures",
    "fidelity_from_features",
    "fidelity_metrics",
    "diversity",
    "vendi_score",
]
