"""Which conditions each of the K students owns.

    part = partition_labels(10, 2)                        # classes split evenly: [0..4], [5..9]
    part = partition_prompts(prompts, 4, "hash")          # sha256 of the prompt text, mod K
    part = partition_prompts(prompts, 4, "kmeans", embeddings=e)   # k-means on prompt embeddings
    part = partition_labels(10, 3, "mapping", "split.json")        # an explicit file
    part.student_of(7)                                    # -> 1

Rules (`objective.partition`):
    even     class labels: K contiguous blocks whose sizes differ by at most one (the default)
    hash     text: student = sha256(prompt) mod K; also routes prompts never seen in training
    kmeans   text: k-means (scikit-learn, seeded) on one vector per prompt (the encoder outputs,
             averaged over tokens, concatenated); routes training prompts by table
    mapping  an explicit JSON file (`objective.partition_file`): {"0": [conditions], "1": [...], ...},
             conditions being class labels, or for text prompt strings or 0-based prompt line
             numbers; every condition must belong to exactly one student
A partition that leaves a student without conditions, overlapping subsets, or more students than
classes is refused with an error naming the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError

__all__ = ["RULES", "Partition", "hash_student", "partition_labels", "partition_prompts", "prompt_vectors"]

RULES = {"labels": ("even", "mapping"), "prompts": ("hash", "kmeans", "mapping")}


class PartitionError(ConfigError):
    """A partition that cannot train K students; the message names the key."""


@dataclass
class Partition:
    kind: str  # "labels" or "prompts"
    rule: str  # even | hash | kmeans | mapping
    subsets: list[list[int]]  # per student: class labels / prompt line numbers
    prompts: list[str] | None = None  # text: the prompt lines the numbers refer to
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_students(self) -> int:
        return len(self.subsets)

    def table(self) -> dict[int, int]:
        """condition (label / prompt line) -> student."""
        return {c: k for k, sub in enumerate(self.subsets) for c in sub}

    def student_of(self, condition: int | str) -> int:
        """The student of a class label, or of a prompt (text)."""
        if self.kind == "labels":
            tab = self.table()
            if int(condition) not in tab:
                raise KeyError(f"class label {condition} belongs to no student (labels {sorted(tab)})")
            return tab[int(condition)]
        prompt = str(condition)
        if self.rule == "hash":
            return hash_student(prompt, self.num_students)
        by_prompt = {self.prompts[i]: k for i, k in self.table().items()}
        if prompt not in by_prompt:
            raise KeyError(
                f"prompt {prompt!r} is not in the routing table (partition {self.rule!r} routes the "
                "training prompts only; hash routes any prompt)"
            )
        return by_prompt[prompt]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rule": self.rule,
            "subsets": self.subsets,
            "prompts": self.prompts,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Partition:
        return cls(
            str(d["kind"]),
            str(d["rule"]),
            [[int(c) for c in s] for s in d["subsets"]],
            d.get("prompts"),
            dict(d.get("info") or {}),
        )


def hash_student(prompt: str, k: int) -> int:
    """sha256 of the prompt's UTF-8 text mod K (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % int(k)


def _check_k(k: int, n: int, what: str) -> None:
    if int(k) < 1:
        raise PartitionError(f"objective.num_students={k} must be >= 1")
    if int(k) > n:
        raise PartitionError(
            f"objective.num_students={k} is larger than the number of {what} ({n}): every student "
            "needs at least one condition"
        )


def _check_nonempty(subsets: list[list[int]], rule: str, n: int, what: str) -> None:
    empty = [i for i, s in enumerate(subsets) if not s]
    if empty:
        raise PartitionError(
            f"objective.partition={rule!r} leaves student(s) {empty} with no conditions (of {n} {what}); "
            "use fewer objective.num_students or another objective.partition"
        )


def _read_mapping(path: str | None, k: int, n: int, names: Sequence[str] | None, what: str) -> list[list[int]]:
    """An explicit mapping file -> subsets of condition numbers 0..n-1 (errors name the key)."""
    key = "objective.partition_file"
    if not path:
        raise PartitionError(f"objective.partition='mapping' needs {key} (a JSON file: {{\"0\": [conditions], ...}})")
    p = Path(path)
    if not p.is_file():
        raise PartitionError(f"{key}: {str(p)!r} does not exist")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PartitionError(f"{key}: cannot read {str(p)!r} as JSON: {e}") from None
    if isinstance(raw, list):
        raw = {str(i): v for i, v in enumerate(raw)}
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise PartitionError(
            f'{key}: {str(p)!r} must map student numbers to lists of conditions, e.g. {{"0": [0, 1, 2], "1": [3, 4]}}'
        )
    want = {str(i) for i in range(k)}
    if set(raw) != want:
        raise PartitionError(
            f"{key}: {str(p)!r} names students {sorted(raw)}; objective.num_students={k} needs "
            f"exactly {sorted(want, key=int)}"
        )
    index = {s: i for i, s in enumerate(names)} if names is not None else {}
    owner: dict[int, int] = {}
    subsets: list[list[int]] = [[] for _ in range(k)]
    for s in range(k):
        for c in raw[str(s)]:
            if isinstance(c, str) and names is not None:
                if c not in index:
                    raise PartitionError(f"{key}: student {s}: prompt {c!r} is not a line of data.prompts")
                i = index[c]
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n:
                i = c
            else:
                raise PartitionError(f"{key}: student {s}: {c!r} is not one of the {n} {what} (0..{n - 1})")
            if i in owner and owner[i] != s:
                raise PartitionError(
                    f"{key}: condition {c!r} is given to students {owner[i]} and {s}; the subsets must not overlap"
                )
            if i not in owner:
                owner[i] = s
                subsets[s].append(i)
    missing = [i for i in range(n) if i not in owner]
    if missing:
        shown = [names[i] for i in missing[:5]] if names is not None else missing[:10]
        raise PartitionError(
            f"{key}: {len(missing)} of the {n} {what} belong to no student (e.g. {shown}); "
            "each condition needs exactly one"
        )
    _check_nonempty(subsets, "mapping", n, what)
    return [sorted(s) for s in subsets]


def partition_labels(num_classes: int, k: int, rule: str = "even", mapping_file: str | None = None) -> Partition:
    """Split class labels 0..num_classes-1 over K students."""
    rule = "even" if rule == "auto" else rule
    if rule not in RULES["labels"]:
        raise PartitionError(
            f"objective.partition={rule!r}: a class-conditional teacher takes one of "
            f"{RULES['labels']} (hash and kmeans are for text teachers)"
        )
    n = int(num_classes)
    _check_k(k, n, "classes")
    if rule == "mapping":
        return Partition(
            "labels", rule, _read_mapping(mapping_file, int(k), n, None, "classes"), info={"file": str(mapping_file)}
        )
    bounds = [round(i * n / k) for i in range(int(k) + 1)]
    return Partition("labels", rule, [list(range(bounds[i], bounds[i + 1])) for i in range(int(k))])


def prompt_vectors(cond: dict[str, Any]) -> torch.Tensor:
    """One vector per prompt from encoded prompts: every floating tensor of the condition, averaged
    over its token axis when it has one, flattened and concatenated -> (N, D) float32."""
    parts = []
    for key in sorted(cond):
        v = cond[key]
        if not torch.is_tensor(v) or not v.is_floating_point() or v.ndim < 2:
            continue
        v = v.detach().float().cpu()
        parts.append((v.mean(1) if v.ndim >= 3 else v).flatten(1))
    if not parts:
        raise PartitionError("objective.partition='kmeans': the encoded prompts hold no embedding tensors")
    return torch.cat(parts, 1)


def partition_prompts(
    prompts: Sequence[str],
    k: int,
    rule: str = "hash",
    mapping_file: str | None = None,
    embeddings: torch.Tensor | None = None,
    seed: int = 0,
) -> Partition:
    """Split the prompt lines over K students by `rule` (see the module docstring)."""
    rule = "hash" if rule == "auto" else rule
    if rule not in RULES["prompts"]:
        raise PartitionError(
            f"objective.partition={rule!r}: a text teacher takes one of {RULES['prompts']} (even is for class labels)"
        )
    prompts = list(prompts)
    n = len(prompts)
    _check_k(k, n, "prompts in data.prompts")
    if rule == "mapping":
        return Partition(
            "prompts",
            rule,
            _read_mapping(mapping_file, int(k), n, prompts, "prompts"),
            prompts,
            {"file": str(mapping_file)},
        )
    if rule == "hash":
        subsets: list[list[int]] = [[] for _ in range(int(k))]
        for i, p in enumerate(prompts):
            subsets[hash_student(p, k)].append(i)
        _check_nonempty(subsets, rule, n, "prompts")
        return Partition("prompts", rule, subsets, prompts)
    if embeddings is None or embeddings.shape[0] != n:
        raise PartitionError("objective.partition='kmeans' needs one embedding per prompt")
    from sklearn.cluster import KMeans

    x = embeddings.detach().double().cpu().numpy()
    km = KMeans(n_clusters=int(k), n_init=10, random_state=int(seed)).fit(x)
    subsets = [[] for _ in range(int(k))]
    for i, c in enumerate(km.labels_.tolist()):
        subsets[int(c)].append(i)
    _check_nonempty(subsets, rule, n, "prompts")
    return Partition("prompts", rule, subsets, prompts, {"seed": int(seed)})
