"""Continual-learning evaluation: accuracy matrices and the figures drawn from them.

``acc[i][j]`` is the accuracy (%) on task j's test set after training on task i (rows
only up to the task trained so far; columns over all tasks, later ones included).
Class-IL predicts among every class of the stream; task-IL among the classes of the
task the example belongs to (its task identity is given).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from .streams import Stream

__all__ = ["average_accuracy", "backward_transfer", "evaluate", "forgetting"]


@torch.no_grad()
def evaluate(model: nn.Module, stream: Stream, batch_size: int = 1024) -> Dict[str, List[float]]:
    """Accuracy (%) on every task's test set: {"class_il": [...], "task_il": [...]}."""
    was_training = model.training
    model.eval()
    out = {"class_il": [], "task_il": []}
    for task in stream.tasks:
        correct_cil = correct_til = 0
        others = torch.ones(stream.n_classes, dtype=torch.bool)
        others[list(task.classes)] = False
        for start in range(0, len(task.y_test), batch_size):
            logits = model(task.x_test[start:start + batch_size])
            y = task.y_test[start:start + batch_size]
            correct_cil += int((logits.argmax(1) == y).sum())
            correct_til += int((logits.masked_fill(others, float("-inf")).argmax(1) == y).sum())
        n = max(len(task.y_test), 1)
        out["class_il"].append(100.0 * correct_cil / n)
        out["task_il"].append(100.0 * correct_til / n)
    model.train(was_training)
    return out


def _check(acc: Sequence[Sequence[float]]) -> int:
    if len(acc) == 0 or any(len(row) < len(acc) for row in acc):
        raise ValueError("acc must be a non-empty matrix with rows (after task i) at least as long as the number of rows")
    return len(acc)


def average_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over the tasks seen so far, after the last one trained."""
    t = _check(acc)
    return sum(acc[t - 1][:t]) / t


def forgetting(acc: Sequence[Sequence[float]]) -> float:
    """Mean over the old tasks j < T-1 of (best accuracy on j after any earlier task -
    final accuracy on j); 0 with a single task."""
    t = _check(acc)
    if t == 1:
        return 0.0
    return sum(max(acc[i][j] for i in range(j, t - 1)) - acc[t - 1][j] for j in range(t - 1)) / (t - 1)


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """Mean over the old tasks j < T-1 of (final accuracy on j - accuracy on j right
    after training on it); negative means forgetting. 0 with a single task."""
    t = _check(acc)
    if t == 1:
        return 0.0
    return sum(acc[t - 1][j] - acc[j][j] for j in range(t - 1)) / (t - 1)
