"""Continual-learning strategies: the loss of one training step.

Each strategy trains on the current batch with cross-entropy over the classes that
``logit_mask`` allows — "seen" (default): the classes of every task so far (future
classes masked); "task": the current task's only, the SparCL paper's choice; "none" —
and adds its replay terms from a reservoir buffer of past examples. "seen" is ours:
with "task" no loss term lifts a new class's logit above the old classes', and on
Split-MNIST1D (DER++, 256-wide MLP, 3 epochs, lr 0.1) tasks 2-5 scored 4%, 2%, 37% and
1% class-IL right after being trained (average class-IL at the end: 39%; "seen": 44%).

- ``finetune``: nothing (the lower bound);
- ``joint``: nothing either, but the trainer feeds it every task seen so far (the upper bound);
- ``er``: + CE on a buffer batch;
- ``derpp``: + α·MSE(logits, stored logits) on one buffer batch + β·CE on another
  (here α = 0.1, β = 0.5, SparCL's defaults; ``RunConfig`` sets its own, see there).

Current and buffer batches go through the model as one concatenated batch: the model
has no batch statistics, so this is the same math as separate passes, and one larger
product runs faster than three small ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from .buffer import ReservoirBuffer

__all__ = ["STRATEGIES", "Strategy", "StepOutput"]

STRATEGIES = ("finetune", "joint", "er", "derpp")
LOGIT_MASKS = ("seen", "task", "none")


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    logits: torch.Tensor  # [batch, classes] of the current batch (all classes, detached)
    example_loss: torch.Tensor  # [batch] cross-entropy of each current example (detached)
    samples: int  # examples that went through the model (current + replay)


class Strategy:
    def __init__(self, name: str, buffer: Optional[ReservoirBuffer], buffer_batch: int = 32,
                 alpha: float = 0.1, beta: float = 0.5, logit_mask: str = "seen"):
        if name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
        if logit_mask not in LOGIT_MASKS:
            raise ValueError(f"logit_mask must be one of {LOGIT_MASKS}, got {logit_mask!r}")
        self.logit_mask = logit_mask
        if name in ("er", "derpp") and (buffer is None or buffer.capacity == 0):
            raise ValueError(f"strategy {name!r} replays from a buffer: buffer_size must be positive")
        self.name, self.buffer, self.buffer_batch, self.alpha, self.beta = name, buffer, buffer_batch, alpha, beta

    @property
    def replays(self) -> bool:
        return self.name in ("er", "derpp")

    def step(self, model, x, y, classes: Sequence[int], seen: Sequence[int], gen: torch.Generator) -> StepOutput:
        """One step's loss on the current batch (x, y) of a task holding ``classes``, after
        tasks holding ``seen`` classes (the current ones included)."""
        parts = [x]
        replay: Tuple = ()
        if self.replays:
            draws = 2 if self.name == "derpp" else 1
            replay = tuple(self.buffer.sample(self.buffer_batch, gen) for _ in range(draws))
            parts += [r[0] for r in replay if r is not None]
        logits = model(torch.cat(parts) if len(parts) > 1 else x)
        current = logits[: len(x)]
        if self.logit_mask != "none":
            others = torch.ones(logits.shape[1], dtype=torch.bool)
            others[list(classes if self.logit_mask == "task" else seen)] = False
            current = current.masked_fill(others, float("-inf"))
        example_loss = F.cross_entropy(current, y, reduction="none")
        loss = example_loss.mean()
        start = len(x)
        if self.name == "er" and replay[0] is not None:
            loss = loss + F.cross_entropy(logits[start:], replay[0][1])
        elif self.name == "derpp" and replay[0] is not None:
            (bx1, _, bz1, _), (bx2, by2, _, _) = replay
            loss = loss + self.alpha * F.mse_loss(logits[start:start + len(bx1)], bz1)
            loss = loss + self.beta * F.cross_entropy(logits[start + len(bx1):], by2)
        return StepOutput(loss, logits[: len(x)].detach(), example_loss.detach(), len(logits))

    def remember(self, x, y, logits, task: int, gen: torch.Generator) -> None:
        if self.replays:
            self.buffer.add(x, y, logits, task, gen)
