"""The mapper on toy models whose right answer is known: injected latencies, retained
energy against an independent oracle, rules reproduced and transferred."""

import copy
import itertools
import time

import pytest
import torch
from torch import nn

from edgesparse.models import MLP
from edgesparse.nn import Pow2Linear, Pow2Scheme, SparseLinear, SparseScheme, sparsify
from edgesparse.pruning_maps import (
    Candidate, EnergyTable, apply_rules, candidates, derive_rules, fisher_importance, prunable_layers, rule_map, search,
    search_map,
)
from edgesparse.pruning_maps.mapper import DENSE, POW2, options
from tests._oracle import masked_dense, top_blocks_mask
from tests.pow2._pow2_oracle import expected_keep, plain_pow2

FP = "x86_64-test-2c"


def _equal_energy_mlp(widths):
    """An MLP whose weights all have magnitude 1: every block of every shape holds the
    same energy per weight, so the energy a choice keeps is its kept fraction."""
    model = MLP(widths)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(torch.randint(0, 2, layer.weight.shape, generator=g) * 2.0 - 1.0)
    return model


def test_energy_table_matches_the_masked_dense_oracle():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(37, 29))  # no block divides 29 x 37
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(29, 37, generator=g))
    layers = prunable_layers(model, torch.randn(4, 37))
    table = EnergyTable(layers)
    w = model[0].weight.detach()
    assert table.total == pytest.approx(float(w.double().pow(2).sum()))
    for block, density in [((8, 8), 0.3), ((4, 16), 0.5), ((1, 4), 0.1), ((16, 8), 0.0), ((8, 4), 1.0)]:
        expected = float(masked_dense(w, top_blocks_mask(w, block, density), block).pow(2).sum())
        assert table.kept("0", Candidate("block", block), density) == pytest.approx(expected, rel=1e-12)
    assert table.kept("0", DENSE, 1.0) == pytest.approx(table.total)


def test_pow2_energy_is_plain_roundings_by_definition():
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(37, 40))  # 2 groups of 32 rows (the second ragged), 13 rows of 3
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 37, generator=g))
    table = EnergyTable(prunable_layers(model, torch.randn(4, 37)))
    w = model[0].weight.detach()
    assert table.blocks("0", POW2.block) == 2 * 13
    for density in (1 / 26, 0.5, 1.0):
        approx = plain_pow2(w, expected_keep(w, 32, 1.0 - density), 32, 192)
        expected = table.total - float((w.double() - approx).pow(2).sum())
        assert table.kept("0", POW2, density) == pytest.approx(expected, rel=1e-12)
    assert table.kept("0", POW2, 0.0) == 0.0


def test_candidates_fit_the_layer_and_punch_convs():
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.Flatten(), nn.Linear(12 * 4 * 4, 20))
    layers = prunable_layers(model, torch.randn(2, 6, 4, 4))
    conv, linear = layers
    assert (conv.kind, conv.n, conv.k, conv.out_positions, conv.needs_input_grad) == ("conv", 12, 54, 16, False)
    assert (linear.kind, linear.n, linear.k, linear.needs_input_grad) == ("linear", 20, 192, True)
    for layer in layers:
        cands = candidates(layer)
        assert cands[0] == DENSE
        assert all(c.block[0] <= layer.n and c.block[1] <= layer.k for c in cands[1:])
    punched = [c.block for c in candidates(conv) if c.kind == "punched"]
    assert punched == [(4, 18), (8, 36)]  # 16 filters do not fit 12 output channels
    assert not any(c.kind == "punched" for c in candidates(linear))
    assert POW2 not in candidates(conv) + candidates(linear)  # a group of C's rows is 32 outputs
    wide = prunable_layers(nn.Sequential(nn.Linear(3, 32)), torch.randn(2, 3))[0]
    assert POW2 in candidates(wide) and POW2 not in candidates(wide, pow2=False)


def _injected(fast):
    """Latency: the block named for the layer in ``fast`` costs 1 + 10 d, any other block
    5 + 10 d, dense 100."""
    def latency(layer, candidate, density):
        if candidate.block is None:
            return 100.0
        return (1.0 if candidate.block == fast[layer.name] else 5.0) + 10.0 * density
    return latency


def test_search_picks_each_layers_fast_block():
    model = _equal_energy_mlp([64, 64, 64])
    layers = prunable_layers(model, torch.randn(3, 64))
    table = EnergyTable(layers)
    latency = _injected({"layers.0": (8, 8), "layers.1": (32, 16)})
    opts = options(layers, table, latency, densities=(0.25, 0.5))
    choice = search(opts, 0.5 * table.total)
    assert {n: (c.candidate.block, c.density) for n, c in choice.items()} == {
        "layers.0": ((8, 8), 0.5), "layers.1": ((32, 16), 0.5)}
    # 64x64 on a 64 x 64 weight is one block: "0.25" keeps none (left out), "0.5" all of it.
    assert {c.density for c in opts["layers.0"] if c.candidate.block == (64, 64)} == {1.0}

    # With every density on offer, several density splits tie; the blocks do not.
    result = search_map(model, torch.randn(3, 64), 0.5, FP, latency=latency, reference_block=(16, 16))
    assert result.pmap.layers["layers.0"].block == (8, 8) and result.pmap.layers["layers.1"].block == (32, 16)
    assert result.pmap.info["retained_energy"] >= result.energy_target - 1e-12
    best_uniform = min(sum(c.seconds for c in u.values()) for u in result.uniforms.values())
    assert sum(c.seconds for c in result.choice.values()) < best_uniform


def test_layer_floor_keeps_every_layer_above_its_share():
    # layers.1 is 100x dearer to keep: the global budget alone empties it to the lowest
    # density on offer; with a floor of 0.8 x the budget's 0.5, each layer keeps >= 40%.
    model = _equal_energy_mlp([64, 64, 64])
    fast = {"layers.0": (8, 8), "layers.1": (8, 8)}

    def latency(layer, candidate, density):
        return _injected(fast)(layer, candidate, density) * (100.0 if layer.name == "layers.1" else 1.0)

    table = EnergyTable(prunable_layers(model, torch.randn(3, 64)))
    free = search_map(model, torch.randn(3, 64), 0.5, FP, latency=latency, reference_block=(16, 16))
    assert free.choice["layers.1"].energy < 0.1 * table.totals["layers.1"]
    floored = search_map(model, torch.randn(3, 64), 0.5, FP, latency=latency, reference_block=(16, 16), layer_floor=0.8)
    for name, c in floored.choice.items():
        assert c.energy >= 0.4 * table.totals[name] * (1 - 1e-9), name
    assert floored.pmap.info["retained_energy"] >= floored.energy_target - 1e-12
    assert floored.pmap.info["layer_floor"] == 0.8
    with pytest.raises(ValueError, match="layer_floor"):
        search_map(model, torch.randn(3, 64), 0.5, FP, latency=latency, layer_floor=3.0)
    with pytest.raises(ValueError, match="layer_floor"):
        search_map(model, torch.randn(3, 64), 0.5, FP, latency=latency, layer_floor=-1)


def test_search_trades_density_between_layers_as_brute_force_does():
    model = _equal_energy_mlp([64, 64, 64])
    layers = prunable_layers(model, torch.randn(3, 64))
    table = EnergyTable(layers)

    def latency(layer, candidate, density):  # raising layers.1's density costs 10x more
        scale = 10.0 if layer.name == "layers.0" else 100.0
        if candidate.block is None:
            return 2 * scale
        return (0.0 if candidate.block == (8, 8) else 50.0) + scale * density

    opts = options(layers, table, latency, densities=(0.25, 0.5, 0.75))
    target = 0.6 * table.total
    choice = search(opts, target)
    # Brute force over every pair of options (the oracle): layers.0 dense, layers.1 at 8x8 @ 0.25.
    feasible = [(a.seconds + b.seconds, a, b) for a, b in itertools.product(*opts.values())
                if a.energy + b.energy >= target]
    best = min(feasible, key=lambda f: f[0])
    assert (choice["layers.0"].candidate, choice["layers.1"].candidate, choice["layers.1"].density) == (
        DENSE, Candidate("block", (8, 8)), 0.25)
    assert sum(c.seconds for c in choice.values()) == pytest.approx(best[0])


@pytest.mark.parametrize("seed", range(3))
def test_search_is_optimal_up_to_its_quantisation(seed):
    g = torch.Generator().manual_seed(seed)
    model = MLP([40, 24, 32])
    layers = prunable_layers(model, torch.randn(2, 40))
    table = EnergyTable(layers)
    draws = {}

    def latency(layer, candidate, density):  # arbitrary, not convex in density
        key = (layer.name, candidate, density)
        if key not in draws:
            draws[key] = float(torch.rand(1, generator=g))
        return draws[key]

    opts = options(layers, table, latency, densities=(0.1, 0.3, 0.6))
    most = sum(max(c.energy for c in cs) for cs in opts.values())
    slack = len(opts) * most / 4096  # the guarantee: no slower than the optimum at E + L steps
    pairs = list(itertools.product(*opts.values()))
    for fraction in (0.2, 0.5, 0.8):
        target = fraction * table.total
        got = search(opts, target)
        seconds = sum(c.seconds for c in got.values())
        assert sum(c.energy for c in got.values()) >= target
        brute = min(a.seconds + b.seconds for a, b in pairs if a.energy + b.energy >= target)
        brute_tight = min(a.seconds + b.seconds for a, b in pairs if a.energy + b.energy >= target + slack)
        assert brute - 1e-12 <= seconds <= brute_tight + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_search_is_always_feasible(seed):
    g = torch.Generator().manual_seed(seed)
    model = MLP([48, 40, 32, 24])
    layers = prunable_layers(model, torch.randn(2, 48))
    table = EnergyTable(layers)
    noise = {}

    def latency(layer, candidate, density):
        key = (layer.name, candidate)
        if key not in noise:
            noise[key] = float(torch.rand(2, generator=g).sum())
        return noise[key] * (1.0 if candidate.block is None else density + 0.1)

    opts = options(layers, table, latency)
    for fraction in (0.1, 0.5, 0.9, 1.0):
        choice = search(opts, fraction * table.total)
        assert sum(c.energy for c in choice.values()) >= fraction * table.total * (1 - 1e-12)
    with pytest.raises(ValueError, match="no map keeps"):
        search(opts, 1.01 * table.total)


def test_rules_reproduce_the_search_and_transfer_fast():
    model = _equal_energy_mlp([64, 64, 64, 64])
    example = torch.randn(3, 64)
    layers = prunable_layers(model, example)
    fast = {"layers.0": (8, 8), "layers.1": (32, 16), "layers.2": (32, 16)}
    result = search_map(model, example, 0.5, FP, latency=_injected(fast))
    rules = derive_rules(layers, result.choice)
    assert [r["depth"] for r in rules] == [0.0, 0.5, 1.0]
    assert apply_rules(layers, rules) == dict(result.pmap.layers)
    # Equal layers the search treated differently keep their own choices (by depth).
    split = {**result.choice, "layers.2": result.choice["layers.0"]}
    mapped = apply_rules(layers, derive_rules(layers, split))
    assert mapped["layers.1"] == result.pmap.layers["layers.1"] and mapped["layers.2"] == result.pmap.layers["layers.0"]

    # A new, wider model: no measuring, nearest rule by type and dimensions.
    new = MLP([128, 128, 128, 10])
    start = time.perf_counter()
    pmap = rule_map(new, torch.randn(2, 128), rules, FP)
    assert time.perf_counter() - start < 1.0
    assert pmap.layers["layers.0"].block == (8, 8) and pmap.layers["layers.1"].block == (32, 16)
    assert pmap.layers["layers.2"].block in ((8, 8), (32, 16))
    sparse = sparsify(new, pmap)
    assert isinstance(sparse.layers[1], SparseLinear) and sparse.layers[1].block == (32, 16)


def test_search_maps_pow2_where_it_is_fastest_and_rules_carry_it():
    model = _equal_energy_mlp([64, 64, 64, 64])
    example = torch.randn(3, 64)
    layers = prunable_layers(model, example)
    fast = {"layers.0": (8, 8), "layers.1": POW2.block, "layers.2": (32, 16)}
    result = search_map(model, example, 0.5, FP, latency=_injected(fast))
    chosen = result.pmap.layers["layers.1"]
    assert isinstance(chosen, Pow2Scheme) and chosen.sparsity == pytest.approx(1.0 - result.choice["layers.1"].density)
    assert result.pmap.layers["layers.0"].block == (8, 8) and result.pmap.layers["layers.2"].block == (32, 16)
    assert result.pmap.info["retained_energy"] >= result.energy_target - 1e-12
    without = search_map(model, example, 0.5, FP, latency=_injected(fast), pow2=False)
    assert all(isinstance(s, SparseScheme) for s in without.pmap.layers.values())

    # Rules carry the choice to the same layers and to a new model's nearest layer.
    assert apply_rules(layers, result.pmap.rules) == dict(result.pmap.layers)
    new = MLP([128, 128, 128, 10])
    pmap = rule_map(new, torch.randn(2, 128), result.pmap.rules, FP)
    assert isinstance(pmap.layers["layers.1"], Pow2Scheme)
    w = new.layers[1].weight.detach().double()
    new_layers = prunable_layers(new, torch.randn(2, 128))
    rounded = EnergyTable(new_layers).kept("layers.1", POW2, 1.0 - pmap.layers["layers.1"].sparsity)
    sparse = sparsify(new, pmap)
    assert isinstance(sparse.layers[1], Pow2Linear)
    # The map counts the layer's energy as plain rounding keeps it: a lower bound on what
    # the decomposition sparsify ran keeps.
    built = float(w.pow(2).sum() - (w - sparse.layers[1].weight_pow2().to_dense().detach().double()).pow(2).sum())
    assert 0 < rounded <= built * (1 + 1e-6)


def test_rules_skip_blocks_that_do_not_fit():
    rules = [{"kind": "linear", "kernel": [1, 1], "n": 64, "k": 64, "positions": 1, "input_grad": True,
              "candidate": "block", "block": [32, 32], "density": 0.2}]
    layers = prunable_layers(MLP([16, 16, 4]), torch.randn(2, 16))
    assert apply_rules(layers, rules) == {"layers.0": None, "layers.1": None}


def test_layer_timer_measures_every_layer_in_one_interleaved_run(monkeypatch):
    """The search weighs one layer's time against another's, so all of them are timed
    under the same load: one interleaved run, each (signature, candidate, density) once."""
    import edgesparse.bench as bench
    from edgesparse.pruning_maps import LayerTimer
    from edgesparse.pruning_maps.mapper import _TIMED_DENSITIES

    runs = []
    real = bench._median_times

    def spy(fns, rounds, **kwargs):
        runs.append(set(fns))
        return real(fns, rounds, **kwargs)

    monkeypatch.setattr(bench, "_median_times", spy)
    model = MLP([32, 32, 32, 32, 10])
    before = copy.deepcopy(model.state_dict())
    layers = prunable_layers(model, torch.randn(4, 32))
    cands = [DENSE, Candidate("block", (8, 8))]
    timer = LayerTimer(rounds=1)
    timer.prepare([(layer, cands) for layer in layers])
    # Timing runs SGD updates, on copies: the model keeps its weights (dense included).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # layers.0 (input without gradient), layers.1 = layers.2, layers.3 (32 -> 10): 3 signatures
    signatures = {layer.signature() for layer in layers}
    assert len(signatures) == 3
    expected = {(s, c, d) for s in signatures for c in cands for d in ((1.0,) if c.block is None else _TIMED_DENSITIES)}
    assert runs == [expected]
    assert set(timer.table) == expected and all(t > 0 for t in timer.table.values())
    timer.prepare([(layers[1], cands)])  # measured already: no new run
    assert len(runs) == 1
    # Between the timed densities the latency is the straight line through them.
    lo, hi = (timer.table[(layers[1].signature(), cands[1], d)] for d in _TIMED_DENSITIES)
    middle = sum(_TIMED_DENSITIES) / 2
    assert timer(layers[2], cands[1], middle) == pytest.approx((min(lo, hi) + hi) / 2)

    # Power-of-two: the layer is timed as a Pow2Linear keeping that fraction of C's row blocks.
    from edgesparse.pruning_maps.mapper import _timed_module

    timed = _timed_module(layers[1], POW2, 0.4)
    assert isinstance(timed, Pow2Linear) and timed.sparsity == pytest.approx(0.6)
    timer.prepare([(layers[1], [POW2])])
    assert all(timer.table[(layers[1].signature(), POW2, d)] > 0 for d in _TIMED_DENSITIES)


def test_fisher_importance_is_the_sum_of_per_sample_squared_gradients():
    """One sample per micro-batch: the exact empirical Fisher, here by hand for a
    linear classifier, whose per-sample gradient is (softmax(Wx + b) - onehot(y)) x^T."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4))
    x, y = torch.randn(5, 6, generator=g), torch.tensor([0, 3, 1, 1, 2])
    layers = prunable_layers(model, x)
    fisher = fisher_importance(model, layers, x, y, micro_batches=5)
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    per_sample = [torch.outer(torch.softmax(w @ xi + b, 0) - torch.nn.functional.one_hot(yi, 4).double(), xi)
                  for xi, yi in zip(x.double(), y)]
    assert torch.allclose(fisher["0"], sum(g.square() for g in per_sample), rtol=1e-5, atol=1e-9)
    # One micro-batch: the square of the summed gradient.
    whole = fisher_importance(model, layers, x, y, micro_batches=1)["0"]
    assert torch.allclose(whole, sum(per_sample).square(), rtol=1e-5, atol=1e-9)


def test_fisher_importance_leaves_batchnorm_alone_and_rejects_bad_calibration():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = torch.randn(10, 6), torch.randint(3, (10,))
    layers = prunable_layers(model, x)
    before = model[1].running_mean.clone()
    fisher_importance(model, layers, x, y)
    assert torch.equal(model[1].running_mean, before)
    with pytest.raises(ValueError, match="one entry per input sample: 10 inputs, 9 targets"):
        fisher_importance(model, layers, x, y[:9])
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        fisher_importance(model, layers, x, y, micro_batches=0)
    with pytest.raises(TypeError, match="must be tensors"):
        fisher_importance(model, layers, x, y.tolist())
    with pytest.raises(ValueError, match="zero gradient for every prunable layer"):
        fisher_importance(model, layers, x, y, loss_fn=lambda out, t: 0.0 * out.sum())


def test_weighted_energy_keeps_the_magnitude_pattern_and_weighs_it():
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(37, 40))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 37, generator=g))
    layers = prunable_layers(model, torch.randn(2, 37))
    importance = torch.rand(40, 37, generator=g, dtype=torch.float64)
    table = EnergyTable(layers, {"0": importance})
    w = model[0].weight.detach()
    assert table.total == pytest.approx(float((w.double().square() * importance).sum()))
    for block, density in [((8, 8), 0.3), ((4, 16), 0.5), ((1, 4), 0.1)]:
        kept = masked_dense(w, top_blocks_mask(w, block, density), block).double()
        assert table.kept("0", Candidate("block", block), density) == pytest.approx(
            float((kept.square() * importance).sum()), rel=1e-12)
    approx = plain_pow2(w, expected_keep(w, 32, 0.5), 32, 192)
    expected = float(((w.double().square() - (w.double() - approx).square()) * importance).sum())
    assert table.kept("0", POW2, 0.5) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="importance\\['0'\\] must be >= 0 with the weight's shape"):
        EnergyTable(layers, {"0": importance[:, :3]})
    with pytest.raises(ValueError, match="not one of the prunable layers"):
        EnergyTable(layers, {"1": importance})


class _TwoBranches(nn.Module):
    """head(relu(a(x)) + 0·b(x)): b's weights do not reach the loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) + 0.0 * self.b(x))


def test_calibrated_search_spends_the_budget_where_the_loss_feels_it():
    torch.manual_seed(5)
    model = _TwoBranches()
    x, y = torch.randn(32, 64), torch.randint(4, (32,))
    branches = lambda name: name in ("a", "b")  # noqa: E731
    latency = _injected({"a": (16, 16), "b": (16, 16)})
    plain = search_map(model, x, 0.5, FP, include=branches, latency=latency, pow2=False)
    weighted = search_map(model, x, 0.5, FP, include=branches, latency=latency, pow2=False, calibration=(x, y))
    # Plain energy: the equal branches share the budget. Weighted: b's weights are worth
    # nothing to the loss, so b drops to the least density on offer and a keeps the budget.
    assert plain.pmap.layers["b"].density > 0.3
    assert weighted.pmap.layers["b"].density == 1 / 16  # one of its 16 blocks, the least on offer
    assert weighted.pmap.layers["a"].density >= 0.45
    assert weighted.pmap.info["proxy"] == "fisher-weighted energy" and plain.pmap.info["proxy"] == "energy"
    assert weighted.pmap.info["retained_energy"] >= weighted.energy_target - 1e-12
