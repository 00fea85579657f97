"""Batches for the objectives: {"cond", "x0"?, "shape", "index", "global_batch_size"}.

The global batch of step s is a function of (seed, s) alone, drawn the same way on every process,
and each process takes its own slice. So N processes see exactly the samples one process would
see, and a resumed run needs no data state.

- class-conditional teachers: balanced random labels (every class equally often up to the
  remainder, in random order);
- with real data (fewstep/data/real.py: the user's images encoded on the fly or from a latent
  cache, a latents file, or the embedded digits): class-balanced draws of real latents with their
  labels in batch["x0"]; the global batch holds their indices ("x0_index") and each process reads
  (or encodes) only its own slice;
- text teachers: prompts (a file, a `datasets` column, or the real data's captions), encoded once
  with the teacher's encoders; with real latents, latent i goes with prompt i;
- unconditional teachers: cond None;
- `conditions` (data.conditions) restricts every draw to some class labels (balanced over them) or
  some prompt lines, e.g. one student's subset in multi-student distillation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..conditioning import Cond, cat_cond, index_cond
from ..data.real import RealData, prompts_for, real_data_for
from .bundle import TeacherBundle

__all__ = ["BatchSource", "read_prompts", "data_generator"]


def data_generator(seed: int, step: int) -> torch.Generator:
    # its own stream, apart from base.step_generator's (which objectives use)
    return torch.Generator().manual_seed((int(seed) * 7_919_993 + int(step) * 104_729 + 17) % (2**63 - 1))


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.prompts: prompt file {str(p)!r} does not exist")
    prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"data.prompts: {str(p)!r} holds no prompts (one prompt a line)")
    return prompts


def _balanced_labels(n: int, k: int, g: torch.Generator) -> Tensor:
    offset = int(torch.randint(0, k, (1,), generator=g))
    labels = (torch.arange(n) + offset) % k
    return labels[torch.randperm(n, generator=g)]


class BatchSource:
    """Deterministic batches for (step, process).

    Args:
        bundle:        the teacher (conditioning kind, encoders, real data).
        batch_size:    the global batch size (all processes).
        seed:          the run's seed.
        process_index, num_processes: this process's slice of the global batch.
        device:        where the batch tensors go.
        real_data:     put real latents in batch["x0"].
        prompts:       text teachers: the prompts (or a path to a prompt file).
        num_classes:   class-conditional teachers: override the teacher's class count.
        conditions:    draw only these class labels (balanced over them) / prompt line numbers.
        real:          the real latents (fewstep.data.real), instead of real_data / real_latents.

    `BatchSource.from_config(bundle, cfg.data, ...)` builds one from a `data:` section.
    """

    def __init__(
        self,
        bundle: TeacherBundle,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        device: torch.device | str = "cpu",
        real_data: bool = False,
        prompts: list[str] | str | Path | None = None,
        num_classes: int | None = None,
        real_latents: str | Path | None = None,
        encode_chunk: int = 64,
        conditions: list[int] | None = None,
        real: RealData | None = None,
    ):
        if batch_size % num_processes:
            raise ValueError(
                f"data.batch_size={batch_size} is not divisible by the number of processes "
                f"({num_processes}); each process takes an equal slice of the global batch"
            )
        self.global_batch = int(batch_size)
        self.local_batch = self.global_batch // num_processes
        self.rank = int(process_index)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.shape = (self.local_batch, *bundle.latent_shape)
        self.num_classes = num_classes or bundle.num_classes
        self.text_cond: Cond | None = None
        self.num_prompts = 0
        self.prompts: list[str] | None = None  # caption strings (text teachers), carried as batch["prompts"]
        self.real: RealData | None = None
        self.pair_cond = getattr(bundle, "pair_cond", None)  # restoration: condition of each real sample
        self.by_class: list[Tensor] | None = None
        if bundle.text:
            self._encode_prompts(bundle, prompts, encode_chunk)
        elif prompts is not None:
            raise ValueError(f"data.prompts: the teacher {bundle.source!r} is not text-conditioned")

        if real is None and (real_latents is not None or real_data):
            from types import SimpleNamespace

            spec = SimpleNamespace(source=None, real_latents=real_latents, real_data=real_data)
            real = real_data_for(spec, bundle, device)
        self.real = real
        self.conditions: Tensor | None = None
        if conditions is not None:
            self.conditions = self._checked_conditions(conditions)
        if self.real is not None:
            self._index_real()

    def _encode_prompts(self, bundle: TeacherBundle, prompts, encode_chunk: int) -> None:
        """Text teachers: the prompts (a list or a prompt file) encoded once, kept on the CPU."""
        if prompts is None:
            raise ValueError(
                f"data.prompts: the teacher {bundle.source!r} is text-conditioned; give a prompt "
                "file (one prompt a line)"
            )
        plist = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if bundle.encode_prompts is None:
            raise ValueError(f"teacher {bundle.source!r} has no encode_prompts(); cannot use data.prompts")
        with torch.no_grad():
            parts = [bundle.encode_prompts(plist[i : i + encode_chunk]) for i in range(0, len(plist), encode_chunk)]
        self.text_cond = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in cat_cond(*parts).items()}
        self.num_prompts = len(plist)
        self.prompts = plist

    def _checked_conditions(self, conditions: list[int]) -> Tensor:
        """data.conditions as a tensor, each a prompt line or class label the teacher has."""
        limit, what = (
            (self.num_prompts, "prompt lines of data.prompts")
            if self.text_cond is not None
            else (self.num_classes, "classes")
            if self.num_classes
            else (0, "conditions")
        )
        bad = [int(c) for c in conditions if not 0 <= int(c) < limit]
        if not limit or bad:
            raise ValueError(
                f"data.conditions: {bad or list(conditions)[:3]} out of range: the teacher has {limit} {what}"
            )
        return torch.tensor([int(c) for c in conditions], dtype=torch.long)

    def _index_real(self) -> None:
        """Check the real data against the prompts and classes, and index it by class for balanced draws."""
        labels = self.real.labels
        if self.text_cond is not None and len(self.real) != self.num_prompts:
            raise ValueError(
                f"data.prompts: {len(self.real)} real latents but {self.num_prompts} prompts; with "
                "text, prompt i is the caption of latent i (leave data.prompts out to use the data's captions)"
            )
        if self.num_classes and labels is not None and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"data.labels: the real data has label {int(labels.max())}, the teacher has "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        if self.num_classes and labels is not None:
            self.by_class = [torch.nonzero(labels == c).flatten() for c in range(self.num_classes)]
            empty = [c for c, ix in enumerate(self.by_class) if ix.numel() == 0]
            if empty:
                raise ValueError(f"data.real_data: no real samples of classes {empty}")

    @classmethod
    def from_config(cls, bundle: TeacherBundle, data: Any, *placement: Any, **named: Any) -> BatchSource:
        """The batches a `data:` section (fewstep.config.DataConfig) asks for; `placement` / `named`
        are seed, process_index, num_processes, device as the constructor takes them."""
        if data.source is not None and getattr(bundle, "pair_cond", None) is not None:
            raise ValueError(
                f"data.source: teacher {bundle.source!r} trains on its own (degraded, clean) pairs; a restoration "
                "teacher does not take data.source yet"
            )
        device = named.get("device", placement[3] if len(placement) > 3 else "cpu")
        real = real_data_for(data, bundle, device)
        return cls(
            bundle,
            data.batch_size,
            *placement,
            **named,
            prompts=prompts_for(data, real) if bundle.text else data.prompts,
            num_classes=data.num_classes,
            conditions=data.conditions,
            real=real,
        )

    @property
    def has_real_data(self) -> bool:
        return self.real is not None

    def global_batch_at(self, step: int) -> dict[str, Any]:
        """The whole global batch of `step` on the CPU (every process computes the same); real
        latents as their indices, "x0_index" (`real_latents(index)` reads them)."""
        g = data_generator(self.seed, step)
        n = self.global_batch
        out: dict[str, Any] = {"cond": None}
        if self.text_cond is not None:
            if self.conditions is None:
                idx = torch.randint(0, self.num_prompts, (n,), generator=g)
            else:
                idx = self.conditions[torch.randint(0, len(self.conditions), (n,), generator=g)]
            out["cond"] = index_cond(self.text_cond, idx)
            out["prompts"] = [self.prompts[int(i)] for i in idx]
            if self.real is not None:
                out["x0_index"] = idx
        elif self.num_classes:
            if self.conditions is None:
                labels = _balanced_labels(n, self.num_classes, g)
            else:
                labels = self.conditions[_balanced_labels(n, len(self.conditions), g)]
            out["cond"] = {"class_labels": labels}
            if self.real is not None:
                if self.by_class is not None:
                    pick = torch.stack(
                        [
                            self.by_class[int(c)][
                                int(torch.randint(0, self.by_class[int(c)].numel(), (1,), generator=g))
                            ]
                            for c in labels
                        ]
                    )
                else:
                    pick = torch.randint(0, len(self.real), (n,), generator=g)
                out["x0_index"] = pick
        if self.real is not None and "x0_index" not in out:
            pick = torch.randint(0, len(self.real), (n,), generator=g)
            out["x0_index"] = pick
            if self.pair_cond is not None:
                out["cond"] = self.pair_cond(pick, g)
            if self.real.labels is not None and out["cond"] is None and self.num_classes:
                out["cond"] = {"class_labels": self.real.labels[pick]}
        return out

    def __call__(self, step: int) -> dict[str, Any]:
        full = self.global_batch_at(step)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        sl = torch.arange(lo, hi)
        batch: dict[str, Any] = {
            "cond": None,
            "shape": self.shape,
            "index": sl.to(self.device),
            "global_batch_size": self.global_batch,
        }
        if full["cond"] is not None:
            batch["cond"] = {
                k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in index_cond(full["cond"], sl).items()
            }
        if "x0_index" in full:
            batch["x0"] = self.real_latents(full["x0_index"][lo:hi]).to(self.device)
        if "prompts" in full:
            batch["prompts"] = full["prompts"][lo:hi]
        return batch

    def real_latents(self, index: Tensor) -> Tensor:
        """The real latents of rows `index` of the real data (read, or encoded, now)."""
        return self.real.latents(index)

    def grid_cond(self, n: int) -> Cond | None:
        """Fixed conditions for sample grids: labels 0..K-1 cycled, or the first prompts cycled."""
        if self.text_cond is not None:
            idx = (
                torch.arange(n) % self.num_prompts
                if self.conditions is None
                else self.conditions[torch.arange(n) % len(self.conditions)]
            )
            return {
                k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in index_cond(self.text_cond, idx).items()
            }
        if self.pair_cond is not None and self.real is not None:  # the first n pairs, fixed degradations
            cond = self.pair_cond(torch.arange(n) % len(self.real), torch.Generator().manual_seed(0))
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        if self.num_classes:
            labels = (
                torch.arange(n) % self.num_classes
                if self.conditions is None
                else self.conditions[torch.arange(n) % len(self.conditions)]
            )
            return {"class_labels": labels.to(self.device)}
        return None
