"""Reservoir buffer: exact filling, uniform retention, sampling, state round trip."""

import pytest
import torch

from edgesparse.cl.buffer import ReservoirBuffer


def _offer(buf, values, gen, task=0):
    x = torch.tensor(values, dtype=torch.float32)[:, None]
    buf.add(x, torch.tensor(values), x.repeat(1, 3), task, gen)


def test_fills_in_order_until_full():
    buf = ReservoirBuffer(3, 1, 3)
    _offer(buf, [7, 8], torch.Generator().manual_seed(0))
    assert len(buf) == 2 and buf.y[:2].tolist() == [7, 8] and buf.logits[1].tolist() == [8.0, 8.0, 8.0]


def test_every_example_is_kept_with_equal_probability():
    # 40 examples into 10 slots: each should survive with probability 10/40 = 0.25.
    kept = torch.zeros(40)
    trials = 400
    for seed in range(trials):
        buf = ReservoirBuffer(10, 1, 3)
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, 40, 8):
            _offer(buf, list(range(start, start + 8)), gen)
        kept[buf.y] += 1
    freq = kept / trials
    # Binomial(400, 0.25): sd 0.022 per example; the mean over 20 is much tighter.
    assert abs(freq[:20].mean() - 0.25) < 0.03 and abs(freq[20:].mean() - 0.25) < 0.03
    assert freq.min() > 0.13 and freq.max() < 0.37


def test_batch_insertion_follows_the_reservoir_rule_example_by_example():
    """Oracle: the textbook rule applied to one example at a time, with the same draws
    (one uniform per offered example): the n-th goes to slot n - 1 while filling, else
    to slot floor(u * n) if that is below the capacity; a later example overwrites."""
    capacity, gen = 40, torch.Generator().manual_seed(3)
    buf = ReservoirBuffer(capacity, 1, 3)
    expected, seen = [None] * capacity, 0
    for start in range(0, 400, 8):
        values = list(range(start, start + 8))
        draws = torch.rand(8, generator=_copy(gen))  # the draws add() is about to make
        _offer(buf, values, gen)
        for value, u in zip(values, draws):
            seen += 1
            slot = seen - 1 if seen <= capacity else int(u * seen)
            if slot < capacity:
                expected[slot] = value
    assert buf.seen == 400 and buf.y.tolist() == expected


def _copy(gen):
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


def test_sample_draws_distinct_stored_examples():
    buf = ReservoirBuffer(5, 1, 3)
    gen = torch.Generator().manual_seed(1)
    assert buf.sample(2, gen) is None
    _offer(buf, [1, 2, 3, 4, 5, 6, 7], gen)
    x, y, logits, task = buf.sample(4, gen)
    assert len(set(y.tolist())) == 4 and set(y.tolist()) <= set(buf.y.tolist())
    assert torch.equal(x[:, 0], y.float())
    assert len(buf.sample(50, gen)[1]) == 5


def test_state_round_trip_and_errors():
    gen = torch.Generator().manual_seed(2)
    a = ReservoirBuffer(4, 1, 3)
    _offer(a, [1, 2, 3, 4, 5, 6], gen, task=2)
    b = ReservoirBuffer(4, 1, 3)
    b.load_state_dict(a.state_dict())
    assert b.seen == 6 and torch.equal(b.y, a.y) and torch.equal(b.task, a.task)
    with pytest.raises(ValueError, match="shapes"):
        ReservoirBuffer(5, 1, 3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(-1, 1, 3)


def test_add_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        ReservoirBuffer(4, 1, 3).add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, 5), 0,
                                     torch.Generator())
