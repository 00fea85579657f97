"""A two-group objective for testing the entry point's machinery (not a distillation method):
phase order, zeroing of every gradient, after_step, objective state, non-finite skipping and
global-RNG draws that a resume must reproduce. Registered by the tests as "toy"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ToyConfig:
    nan_steps: list[int] = field(default_factory=list)  # steps whose `nan_phase` loss is NaN
    nan_phase: str = "generator"
    generator_every: int = 2  # generator update every k steps (guidance every step)


class Toy:
    def __init__(self, teacher, student, fake, p: ToyConfig):
        self.p = p
        self.nets = {"teacher": teacher, "student": student, "fake": fake}
        self.groups = {"generator": ["student"], "guidance": ["fake"]}
        self.sampling = {"times": [1.0, 0.5, 0.0], "renoise": "fresh"}
        self.records: list[dict[str, Any]] = []
        self.after_calls = torch.zeros((), dtype=torch.long)

    def phases(self, step: int) -> list[str]:
        return ["guidance", "generator"] if step % self.p.generator_every == 0 else ["guidance"]

    def _sum(self, role: str) -> float:
        return float(sum(p.detach().double().sum() for p in self.nets[role].parameters()))

    def loss(self, phase, batch, step):
        grads_none = all(p.grad is None for m in self.nets.values() for p in m.parameters())
        self.records.append(
            {
                "step": step,
                "phase": phase,
                "student": self._sum("student"),
                "fake": self._sum("fake"),
                "grads_none": grads_none,
            }
        )
        shape = batch["shape"]
        noise = torch.randn(shape)  # the global RNG: a resume must restore it
        t = torch.rand(shape[0]) * 0.9 + 0.05
        cond = batch["cond"]
        student, fake, teacher = self.nets["student"], self.nets["fake"], self.nets["teacher"]
        if phase == "guidance":
            with torch.no_grad():
                x = student(noise, 1.0, cond)
            x_t = student.path.add_noise(x, torch.randn(shape), t)
            loss = ((fake(x_t, t, cond) - x) ** 2).mean()
        else:
            x = student(noise, 1.0, cond)
            x_t = student.path.add_noise(x, torch.randn(shape), t)
            with torch.no_grad():
                real = teacher(x_t, t, cond)
            # the fake score is called with grad flowing through x, so its weights get gradients
            # here too: the entry point must zero them before the next guidance update
            loss = ((x - real) ** 2).mean() + 0.1 * ((fake(x_t, t, cond) - real) ** 2).mean()
        if step in self.p.nan_steps and phase == self.p.nan_phase:
            loss = loss * float("nan")
        return loss, {"x_std": float(x.detach().std())}

    def after_step(self, phase, step):
        self.after_calls += 1

    def state_dict(self):
        return {"after_calls": self.after_calls.clone()}

    def load_state_dict(self, d):
        self.after_calls = d["after_calls"].clone()


LAST: list[Toy] = []  # the objectives built in this process (tests read their records)


def build(params: ToyConfig, teacher, ctx) -> Toy:
    obj = Toy(teacher, ctx.make_student(teacher), ctx.make_copy(teacher), params)
    LAST.append(obj)
    return obj
