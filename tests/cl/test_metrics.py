"""CL metrics against hand-computed matrices, and class-IL / task-IL evaluation by hand."""

import pytest
import torch
from torch import nn

from edgesparse.cl.metrics import average_accuracy, backward_transfer, evaluate, forgetting
from edgesparse.cl.streams import Stream, Task

ACC = [
    [90.0, 5.0, 0.0],
    [70.0, 80.0, 0.0],
    [60.0, 50.0, 90.0],
]


def test_metrics_by_hand():
    assert average_accuracy(ACC) == pytest.approx((60 + 50 + 90) / 3)
    # Forgetting: task 0 best 90 -> 60 (30); task 1 best 80 -> 50 (30).
    assert forgetting(ACC) == pytest.approx(30.0)
    # BWT: (60 - 90 + 50 - 80) / 2.
    assert backward_transfer(ACC) == pytest.approx(-30.0)
    # After two tasks only (rows may be shorter than the stream).
    assert average_accuracy(ACC[:2]) == pytest.approx(75.0)
    assert forgetting(ACC[:1]) == 0.0 and backward_transfer(ACC[:1]) == 0.0


def test_metrics_reject_a_ragged_matrix():
    with pytest.raises(ValueError, match="acc"):
        average_accuracy([[1.0], [2.0]])


def test_evaluate_class_il_and_task_il():
    # The model outputs x itself as logits: predictions are chosen by hand.
    x = torch.tensor([[0.0, 1.0, 9.0, 0.0], [5.0, 1.0, 0.0, 0.0],   # task 0 (classes 0, 1), labels 1, 0
                      [0.0, 0.0, 1.0, 2.0], [9.0, 0.0, 3.0, 2.0]])  # task 1 (classes 2, 3), labels 3, 2
    y = torch.tensor([1, 0, 3, 2])
    tasks = [Task(x[:2], y[:2], x[:2], y[:2], (0, 1)), Task(x[2:], y[2:], x[2:], y[2:], (2, 3))]
    acc = evaluate(nn.Identity(), Stream("hand", tasks, 4))
    # Class-IL: row 0 predicts 2 (wrong), row 1 predicts 0 (right); row 2 -> 3 (right), row 3 -> 0 (wrong).
    assert acc["class_il"] == [50.0, 50.0]
    # Task-IL: row 0 among {0,1} -> 1 (right); row 3 among {2,3} -> 2 (right).
    assert acc["task_il"] == [100.0, 100.0]
