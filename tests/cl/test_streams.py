"""Streams: class splits, sizes, reproducibility, offline generation, permutations."""

import socket

import numpy as np
import pytest
import torch

from edgesparse.cl import streams
from edgesparse.cl.streams import make_stream, permuted_mnist1d, split_digits, split_mnist1d


def test_split_digits_has_five_two_class_tasks_covering_the_data():
    s = split_digits(seed=0)
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert s.n_features == 64 and s.n_classes == 10
    assert sum(len(t.y_train) + len(t.y_test) for t in s.tasks) == 1797  # scikit-learn's digits
    for t in s.tasks:
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
        assert t.x_train.dtype == torch.float32 and 0 <= t.x_train.min() and t.x_train.max() <= 1


def test_streams_are_reproducible_and_seed_dependent():
    a, b, c = split_digits(seed=3), split_digits(seed=3), split_digits(seed=4)
    assert torch.equal(a.tasks[2].x_test, b.tasks[2].x_test)
    assert not torch.equal(a.tasks[2].x_test, c.tasks[2].x_test)


def test_split_mnist1d_generates_offline_with_enough_samples(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the MNIST-1D stream must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    streams._mnist1d.cache_clear()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    s = split_mnist1d(seed=0, n_train=10_000)
    assert np.array_equal(np.random.get_state()[1], before)  # the generator's global seeding is undone
    assert s.n_train >= 10_000 and s.n_features == 40 and len(s.tasks) == 5
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert all(len(t.y_test) > 0 for t in s.tasks)


def test_permuted_mnist1d_permutes_features_per_task():
    base = split_mnist1d(seed=0, n_train=1000)
    s = permuted_mnist1d(seed=0, n_train=1000, n_tasks=3)
    x_all = torch.cat([t.x_test for t in base.tasks])
    assert len(s.tasks) == 3 and all(t.classes == tuple(range(10)) for t in s.tasks)
    # Each task's test set is the same examples with its columns reordered: sorted rows match.
    first = s.tasks[0].x_test
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, x_all.tolist()))
    for t in s.tasks[1:]:
        assert not torch.equal(t.x_test, first)
        assert torch.equal(t.x_test.sort(1).values, first.sort(1).values)
    assert sum(len(t.y_train) for t in s.tasks) == base.n_train  # disjoint shares of the training set


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stream must be one of"):
        make_stream("cifar")
    with pytest.raises(TypeError, match="seed"):
        split_digits(seed=1.5)
    with pytest.raises(ValueError, match="n_tasks"):
        permuted_mnist1d(n_tasks=0)
