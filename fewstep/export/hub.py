"""The Hugging Face Hub side of an export: the model card's metadata built with huggingface_hub's
`ModelCardData` (licence inherited from the teacher, `base_model`, tags with `lora` for LoRA
students, the `fewstep eval` results as model-index eval results with their protocol), an
offline check of that metadata, and `push_to_hub` (create_repo + upload_folder).

    data = card_metadata(card)              # card: the dict written as fewstep_card.json
    problems = check_metadata(ModelCard.load(folder / "README.md"))   # [] when it is valid
    url = push_to_hub(folder, "me/my-student", private=True)

Where the licence comes from: the teacher folder's README.md metadata (`license`, and
`license_name` / `license_link` for `other`), as a hub snapshot or `save_pretrained` folder has it;
the embedded digits teachers are fewstep's own (Apache-2.0, the project's LICENSE). A teacher
whose licence cannot be read gets none, and the card says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ._common import ExportError

__all__ = [
    "teacher_license",
    "base_model_id",
    "card_metadata",
    "model_card",
    "check_metadata",
    "check_repo_id",
    "push_to_hub",
    "HUB_LICENSES",
]

# the licence identifiers the Hub knows (https://huggingface.co/docs/hub/repositories-licenses);
# any other licence is written as `license: other` with its `license_name` (and `license_link`)
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda
    cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0
    cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0
    etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research
    intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql
    ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3
    llama4 gemma unknown other""".split()
)
_PIPELINE_TAG = {"labels": "unconditional-image-generation", "text": "text-to-image"}
_EMBEDDED = ("digits-vp", "digits-flow")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
_METRIC_NAMES = {"fid": "FID", "kid": "KID", "class_acc": "class accuracy", "clip": "CLIP score", "prc": "precision"}


def _is_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/", "~")) and not Path(s).exists()


def base_model_id(source: str, folder: str | Path | None = None) -> str | None:
    """The teacher's hub id: the source itself when it is one, else a hub cache snapshot's
    (`.../models--owner--name/snapshots/<rev>`); None for a local teacher."""
    if _is_hub_id(str(source)):
        return str(source)
    for cand in (source, folder):
        m = _SNAPSHOT.search(str(Path(cand).resolve()) if cand else "")
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def teacher_license(source: str, folder: str | Path | None) -> dict[str, Any]:
    """{"license": id | None, "license_name"?, "license_link"?, "from": where it was read}."""
    if source in _EMBEDDED:
        return {"license": "apache-2.0", "from": "fewstep's embedded teacher, under the project's LICENSE"}
    readme = Path(folder) / "README.md" if folder else None
    if readme is not None and readme.is_file():
        from huggingface_hub import metadata_load

        try:
            meta = metadata_load(readme) or {}
        except Exception as e:  # noqa: BLE001 - a teacher README with broken YAML: no licence, say why
            return {"license": None, "from": f"{readme}: unreadable metadata ({e})"}
        lic = meta.get("license")
        if isinstance(lic, list):  # the Hub allows one licence; a list takes its first
            lic = lic[0] if lic else None
        if lic:
            out = {"license": str(lic), "from": str(readme)}
            for k in ("license_name", "license_link"):
                if meta.get(k):
                    out[k] = str(meta[k])
            return out
        return {"license": None, "from": f"{readme} names no licence"}
    return {"license": None, "from": "the teacher folder has no README.md with metadata"}


def _licence_fields(lic: dict[str, Any]) -> dict[str, Any]:
    name = lic.get("license")
    if not name:
        return {}
    if name in HUB_LICENSES:
        return {k: lic[k] for k in ("license", "license_name", "license_link") if lic.get(k)}
    return {
        "license": "other",
        "license_name": name,
        **({"license_link": lic["license_link"]} if "license_link" in lic else {}),
    }


def _eval_results(card: dict[str, Any], task: str):
    """One EvalResult per numeric metric of each `fewstep eval` results file: the protocol is the
    dataset, the step count / guidance / sample count are the metric's arguments."""
    from huggingface_hub import EvalResult

    out = []
    for m in card.get("metrics") or []:
        proto = str(m.get("protocol") or "custom")
        for r in m.get("rows") or []:
            for metric, value in (r.get("metrics") or {}).items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                args = {k: r.get(k) for k in ("steps", "guidance", "num_samples", "sampler") if r.get(k) is not None}
                hy = r.get("hybrid")
                if isinstance(hy, dict) and hy.get("teacher_steps"):
                    args["hybrid_teacher_steps"] = hy["teacher_steps"]
                where = ", ".join(f"{k} {v}" for k, v in args.items())
                out.append(
                    EvalResult(
                        task_type=task,
                        dataset_type=proto,
                        dataset_name=f"fewstep protocol {proto!r}",
                        metric_type=metric,
                        metric_value=float(value),
                        metric_name=f"{_METRIC_NAMES.get(metric, metric)} ({where})",
                        metric_args=args,
                    )
                )
    return out


def card_metadata(card: dict[str, Any]):
    """The README's YAML header as a `huggingface_hub.ModelCardData`."""
    from huggingface_hub import ModelCardData

    t = card.get("teacher") or {}
    source = str(t.get("source"))
    lic = t.get("license") or teacher_license(source, t.get("folder"))
    base = t.get("base_model") if "base_model" in t else base_model_id(source, t.get("folder"))
    task = _PIPELINE_TAG.get(card.get("conditioning"), "text-to-image")
    lora = bool((card.get("weights") or {}).get("lora")) or bool((card.get("lora_adapter") or {}).get("written"))
    tags = ["fewstep", "distillation", str(card.get("objective")), f"{card.get('trained_steps')}-step"]
    if lora:
        tags.append("lora")
    results = _eval_results(card, task)
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag=task,
        tags=tags,
        base_model=base,
        **_licence_fields(lic),
        model_name=(card.get("name") or "fewstep-student") if results else None,
        eval_results=results or None,
    )


def model_card(card: dict[str, Any], body: str):
    """The README as a `huggingface_hub.ModelCard`: the metadata of `card_metadata` over `body`."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_metadata(card).to_yaml()}\n---\n\n{body.lstrip()}")


def check_metadata(mc) -> list[str]:
    """What the Hub would refuse in a loaded ModelCard's metadata, checked offline ([] = valid):
    the licence is a Hub identifier (`other` with a `license_name`), `base_model` a hub id,
    the tags strings, and the model-index parses back into eval results."""
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    d = mc.data.to_dict()
    bad = []
    lic = d.get("license")
    if lic is not None and lic not in HUB_LICENSES:
        bad.append(f"license {lic!r} is not a Hub licence identifier (use 'other' with license_name)")
    if lic == "other" and not d.get("license_name"):
        bad.append("license 'other' needs license_name")
    bases = d.get("base_model")
    for b in [bases] if isinstance(bases, str) else bases or []:
        if not _HUB_ID.match(str(b)):
            bad.append(f"base_model {b!r} is not a hub id (owner/name)")
    if not all(isinstance(t, str) for t in d.get("tags") or []):
        bad.append(f"tags must be strings: {d.get('tags')}")
    if d.get("pipeline_tag") not in (None, *_PIPELINE_TAG.values()):
        bad.append(f"pipeline_tag {d.get('pipeline_tag')!r} is not an image generation task")
    if "model-index" in d:
        try:
            name, results = model_index_to_eval_results(d["model-index"])
            again = eval_results_to_model_index(name, results)
            ModelCardData(**{k: v for k, v in d.items()})  # the whole header, as the Hub's client reads it
        except (KeyError, TypeError, ValueError) as e:
            bad.append(f"model-index does not parse: {e}")
        else:
            if again != d["model-index"]:
                bad.append("model-index does not round-trip through huggingface_hub's eval results")
    return bad


def check_repo_id(repo_id: str) -> str:
    """`--push-to-hub REPO`: a valid hub model id (owner/name) or an ExportError naming the flag."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"--push-to-hub {repo_id!r}: not a valid repo id ({str(e).splitlines()[0]})") from None
    if "/" not in repo_id:
        raise ExportError(f"--push-to-hub {repo_id!r}: give owner/name (your user or organisation, then the model)")
    return repo_id


def push_to_hub(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, commit_message: str | None = None
) -> str:
    """Create the model repo (kept if it exists) and upload the export folder to it. Returns the
    commit URL. The folder's README.md must parse (`ModelCard.load`) with valid metadata."""
    from huggingface_hub import HfApi, ModelCard

    folder = Path(folder)
    check_repo_id(repo_id)
    readme = folder / "README.md"
    if not readme.is_file():
        raise ExportError(f"{folder} has no README.md: not a fewstep export")
    problems = check_metadata(ModelCard.load(readme))
    if problems:
        raise ExportError(f"{readme}: the model card's metadata is not valid: {'; '.join(problems)}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or f"fewstep export of {folder.name}",
        )
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: one line, the export stays on disk
        raise ExportError(
            f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
            f"the export is complete at {folder}: upload it with `hf upload {repo_id} {folder}` when the Hub is reachable"
        ) from None
    return str(getattr(info, "commit_url", info))
