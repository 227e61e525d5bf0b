"""Continual-learning streams built from data that needs no download.

A :class:`Stream` is a list of :class:`Task` s, each with its own train and test split
and the classes it holds. Three streams:

- ``split_digits``: scikit-learn's 8x8 digits (1,797 images, flattened to 64 features),
  5 tasks of 2 classes ({0,1}, {2,3}, ...).
- ``split_mnist1d``: the mnist1d package's generator (``make_dataset`` with its default
  arguments, ``num_samples`` raised so that 80% of it, the package's train split, is at
  least ``n_train``), 40 features, 5 tasks x 2 classes.
- ``permuted_mnist1d``: every task holds all 10 classes of MNIST-1D under its own fixed
  permutation of the 40 features (task 0 unpermuted); labels are shared across tasks,
  so "class-IL" there is the domain-incremental setting and task-IL equals it.

Everything is seeded: the same arguments give the same tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

__all__ = ["STREAMS", "Stream", "Task", "make_stream", "permuted_mnist1d", "split_digits", "split_mnist1d"]


@dataclass(frozen=True)
class Task:
    x_train: torch.Tensor  # [n, features] float32
    y_train: torch.Tensor  # [n] int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: Tuple[int, ...]


@dataclass(frozen=True)
class Stream:
    name: str
    tasks: List[Task]
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.tasks[0].x_train.shape[1]

    @property
    def n_train(self) -> int:
        return sum(len(t.y_train) for t in self.tasks)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def _split_by_classes(name, x_train, y_train, x_test, y_test, classes_per_task: int) -> Stream:
    x_train, x_test = (torch.as_tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    y_train, y_test = (torch.as_tensor(a, dtype=torch.int64) for a in (y_train, y_test))
    n_classes = int(y_train.max()) + 1
    tasks = []
    for first in range(0, n_classes, classes_per_task):
        classes = tuple(range(first, min(first + classes_per_task, n_classes)))
        tr, te = torch.isin(y_train, torch.tensor(classes)), torch.isin(y_test, torch.tensor(classes))
        tasks.append(Task(x_train[tr], y_train[tr], x_test[te], y_test[te], classes))
    return Stream(name, tasks, n_classes)


def split_digits(seed: int = 0, classes_per_task: int = 2) -> Stream:
    """scikit-learn's digits, standardised, a stratified 75/25 train/test split drawn with
    ``seed``, cut into tasks of ``classes_per_task`` consecutive classes."""
    from sklearn.datasets import load_digits

    seed = _check_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = x / 16.0  # pixel intensities are 0..16
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test[rng.choice(members, size=len(members) // 4, replace=False)] = True
    return _split_by_classes("split-digits", x[~test], y[~test], x[test], y[test], classes_per_task)


@functools.lru_cache(maxsize=4)
def _mnist1d(n_train: int, seed: int):
    """MNIST-1D from the package's own generator, offline (``make_dataset``, never the
    download in ``get_dataset``). It seeds numpy's global generator itself, so ours is
    saved and restored around it. About 6 s for 12,500 samples; cached per process."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(np.ceil(n_train / args.train_split / 10)) * 10  # whole samples per class
    args.seed = seed
    state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def split_mnist1d(seed: int = 0, n_train: int = 10_000, classes_per_task: int = 2) -> Stream:
    """MNIST-1D (40 features) with at least ``n_train`` training samples, in tasks of
    ``classes_per_task`` consecutive classes."""
    seed = _check_seed(seed)
    if not isinstance(n_train, int) or n_train < 10:
        raise ValueError(f"n_train must be an int >= 10, got {n_train!r}")
    return _split_by_classes("split-mnist1d", *_mnist1d(n_train, seed), classes_per_task)


def permuted_mnist1d(seed: int = 0, n_train: int = 10_000, n_tasks: int = 5) -> Stream:
    """MNIST-1D, ``n_tasks`` tasks of all 10 classes, task t seeing the features through
    its own random permutation (task 0: the identity). Each task gets a disjoint share of
    the training set (``n_train / n_tasks`` samples) and the whole permuted test set."""
    seed = _check_seed(seed)
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
    x_train, y_train, x_test, y_test = (torch.as_tensor(a) for a in _mnist1d(n_train, seed))
    x_train, x_test = x_train.float(), x_test.float()
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t, share in enumerate(torch.arange(len(y_train)).chunk(n_tasks)):
        perm = torch.arange(x_train.shape[1]) if t == 0 else torch.randperm(x_train.shape[1], generator=gen)
        tasks.append(Task(x_train[share][:, perm], y_train[share].long(), x_test[:, perm], y_test.long(), tuple(range(10))))
    return Stream("permuted-mnist1d", tasks, 10)


STREAMS = {"split-mnist1d": split_mnist1d, "split-digits": split_digits, "permuted-mnist1d": permuted_mnist1d}


def make_stream(name: str, seed: int = 0, **kwargs) -> Stream:
    """The stream called ``name`` (one of :data:`STREAMS`)."""
    if name not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {name!r}")
    return STREAMS[name](seed=seed, **kwargs)

