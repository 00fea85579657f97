"""Batches for the objectives: {"cond", "x0"?, "shape", "index", "global_batch_size"}.

The global batch of step s is a function of (seed, s) alone, drawn the same way on every process,
and each process takes its own slice. So N processes see exactly the samples one process would
see, and a resumed run needs no data state.

- class-conditional teachers: balanced random labels (every class equally often up to the
  remainder, in random order);
- with real data (the embedded digits through the teacher's VAE, encoded once and kept in
  memory): class-balanced draws of real latents with their labels in batch["x0"];
- text teachers: a prompt file (one prompt a line), encoded once with the teacher's encoders;
  with real latents (a safetensors file), latent i goes with prompt i;
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


def _read_latents(path: str | Path, latent_shape) -> tuple[Tensor, Tensor | None]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.real_latents: {str(p)!r} does not exist")
    d = load_file(str(p))
    if "latents" not in d:
        raise ValueError(f"data.real_latents: {str(p)!r} has no 'latents' tensor (keys: {sorted(d)})")
    x0 = d["latents"].float()
    if x0.ndim != 4 or tuple(x0.shape[1:]) != tuple(latent_shape):
        raise ValueError(
            f"data.real_latents: 'latents' has shape {tuple(x0.shape)}, expected (N, "
            f"{', '.join(map(str, latent_shape))}) for this teacher"
        )
    labels = d.get("class_labels")
    return x0, None if labels is None else labels.long()


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
        self.real: tuple[Tensor, Tensor | None] | None = None
        self.pair_cond = getattr(bundle, "pair_cond", None)  # restoration: condition of each real sample
        self.by_class: list[Tensor] | None = None

        if bundle.text:
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
        elif prompts is not None:
            raise ValueError(f"data.prompts: the teacher {bundle.source!r} is not text-conditioned")

        if real_latents is not None:
            self.real = _read_latents(real_latents, bundle.latent_shape)
        elif real_data:
            if bundle.real_data is None:
                raise ValueError(
                    f"data.real_data=true: no real data for teacher {bundle.source!r} (real latents "
                    "come with the embedded digits teachers)"
                )
            with torch.no_grad():
                x0, labels = bundle.real_data()
            x0 = x0.detach().float().cpu()
            if tuple(x0.shape[1:]) != tuple(bundle.latent_shape):
                raise ValueError(
                    f"data.real_data: real latents have shape {tuple(x0.shape[1:])}, the teacher's "
                    f"latents {tuple(bundle.latent_shape)}"
                )
            self.real = (x0, None if labels is None else labels.long().cpu())
        self.conditions: Tensor | None = None
        if conditions is not None:
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
            self.conditions = torch.tensor([int(c) for c in conditions], dtype=torch.long)
        if self.real is not None:
            x0, labels = self.real
            if self.text_cond is not None and x0.shape[0] != self.num_prompts:
                raise ValueError(
                    f"data.real_latents: {x0.shape[0]} latents but {self.num_prompts} prompts in "
                    "data.prompts; with text, line i of the prompt file is the caption of latent i"
                )
            if self.num_classes and labels is not None:
                self.by_class = [torch.nonzero(labels == c).flatten() for c in range(self.num_classes)]
                empty = [c for c, ix in enumerate(self.by_class) if ix.numel() == 0]
                if empty:
                    raise ValueError(f"data.real_data: no real samples of classes {empty}")

    @property
    def has_real_data(self) -> bool:
        return self.real is not None

    def global_batch_at(self, step: int) -> dict[str, Any]:
        """The whole global batch of `step` on the CPU (every process computes the same)."""
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
                out["x0"] = self.real[0][idx]
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
                    pick = torch.randint(0, self.real[0].shape[0], (n,), generator=g)
                out["x0"] = self.real[0][pick]
        if self.real is not None and "x0" not in out:
            pick = torch.randint(0, self.real[0].shape[0], (n,), generator=g)
            out["x0"] = self.real[0][pick]
            if self.pair_cond is not None:
                out["cond"] = self.pair_cond(pick, g)
            if self.real[1] is not None and out["cond"] is None and self.num_classes:
                out["cond"] = {"class_labels": self.real[1][pick]}
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
        if "x0" in full:
            batch["x0"] = full["x0"][lo:hi].to(self.device)
        if "prompts" in full:
            batch["prompts"] = full["prompts"][lo:hi]
        return batch

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
            cond = self.pair_cond(torch.arange(n) % self.real[0].shape[0], torch.Generator().manual_seed(0))
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in cond.items()}
        if self.num_classes:
            labels = (
                torch.arange(n) % self.num_classes
                if self.conditions is None
                else self.conditions[torch.arange(n) % len(self.conditions)]
            )
            return {"class_labels": labels.to(self.device)}
        return None
