"""Choosing each layer's pruning scheme from measured latency and an accuracy proxy.

Per prunable layer the candidates are dense, block shapes from 1x4 to 64x64 (square
and rectangular, those that fit the weight), for a conv block-punched blocks (``f``
filters x ``c`` channels over every kernel position: block (f, c·kh·kw)), and
power-of-two weights (SmartDeal's W = C·B, :class:`~edgesparse.nn.Pow2Scheme`, whose
kept rows of C form (32 x 3) blocks), each at the densities of ``DENSITIES`` (as the
whole blocks they keep: the density stored is kept blocks / blocks, and an option
keeping none is left out; power-of-two's sparsity is 1 - density).

- Latency of a candidate: the layer's forward, backward and SGD update on the input it
  sees in the model, its weights cold (``LayerTimer``: measured, every layer's
  candidates interleaved, medians),
  or any ``latency(layer, candidate, density) -> seconds`` given instead (tests
  inject one). The model's step latency is taken as the sum over its prunable layers
  plus a part no map changes.
- Accuracy proxy: the weight energy a scheme keeps, ||W||² - ||W - Ŵ||², as a fraction
  of the prunable layers' total energy. For block pruning that is the energy of the
  blocks ``BSR.from_dense`` keeps (the ``round(d·blocks)`` of largest L2 norm); for
  power-of-two it is that of plain power-of-two rounding
  (``pow2.decompose.rounding_kept_energy``), a lower bound on what the decomposition
  ``sparsify`` then runs keeps, so a map's budget holds for it too. Optionally
  gradient-weighted: with a calibration batch every square is weighted by the weight's
  empirical Fisher (``fisher_importance``).
- Search (``search``): minimise the summed latency subject to retained energy >= E, a
  multiple-choice knapsack solved exactly by dynamic programming over the energy each
  option loses (against its layer's most), in steps of 1/4096 of the largest keepable
  energy, rounded up. Guarantee: the map keeps at least E (never infeasible), and no
  map keeping at least E + L·step (L layers) is faster; so it is the exact optimum up to
  L/4096 of the energy. (A Lagrangian relaxation was tried first: when a layer's
  (energy, latency) points are not convex, as measured latencies often are not, it
  missed the optimum by a whole option; see tests/pruning_maps.)
- Rules (``derive_rules`` / ``apply_rules``): each searched layer's choice, keyed by
  layer type, kernel size, dimensions (N, K, output positions per sample), whether
  its input needs a gradient (a first layer skips grad-input) and depth; a layer
  of another model takes the rule nearest in log-dimensions among those of its type and
  kernel whose block fits it. No measuring: milliseconds.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..bench_training import layer_step_fn
from ..nn.pow2 import Pow2Scheme
from ..nn.sparsify import SparseScheme
from ..pow2.decompose import rounding_kept_energy
from ..pow2.format import DEFAULT_GROUP
from .pmap import PruningMap

BLOCKS: Tuple[Tuple[int, int], ...] = (
    (1, 4), (4, 4), (4, 8), (8, 4), (8, 8), (8, 16), (16, 8), (16, 16),
    (16, 32), (32, 16), (32, 32), (32, 64), (64, 32), (64, 64),
)
PUNCHED: Tuple[Tuple[int, int], ...] = ((4, 2), (8, 4), (16, 4))  # (filters, channels)
# Fine enough that the search can meet its energy budget closely (each point costs no
# measuring, see _TIMED_DENSITIES): with the first grid (0.02, 0.05, 0.1, 0.15, 0.2,
# 0.3, ...) the MLP's searched map kept 0.128 of the energy for a budget of 0.110; with
# steps of 0.1-0.15 above 0.3, the reduced ResNet-18's kept 0.132 for 0.116 (one conv at
# 0.85, the rest at their least), so the grid steps by 0.05 up there.
DENSITIES: Tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
                                0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# LayerTimer measures each block candidate at these two densities and interpolates
# linearly in between (block-sparse kernel time is an affine function of the kept
# blocks to within the timing noise here), which halves the measuring against three points.
_TIMED_DENSITIES = (0.1, 0.4)


@dataclass(frozen=True)
class Layer:
    """A prunable layer as the mapper sees it: its weight matrix N x K (a conv's is
    [out, in·kh·kw]), kernel size, and the input it gets in the model."""

    name: str
    kind: str  # "linear" or "conv"
    n: int
    k: int
    kernel: Tuple[int, int]
    in_shape: Tuple[int, ...]
    out_positions: int  # output rows per sample: 1 for a linear, H_out·W_out for a conv
    needs_input_grad: bool
    module: nn.Module = field(compare=False, repr=False, hash=False)

    def signature(self) -> tuple:
        """What decides the layer's latency: two layers with equal signatures time alike."""
        m = self.module
        conv = (m.stride, m.padding, m.dilation) if self.kind == "conv" else ()
        return (self.kind, self.n, self.k, self.kernel, self.in_shape, self.needs_input_grad, m.bias is not None, conv)

    def weight2d(self) -> torch.Tensor:
        return self.module.weight.detach().reshape(self.n, self.k)


@dataclass(frozen=True)
class Candidate:
    kind: str  # "dense", "block", "punched" or "pow2"
    block: Optional[Tuple[int, int]] = None  # for pow2: C's kept-row blocks, (group, 3)

    def label(self) -> str:
        return "dense" if self.block is None else f"{self.kind} {self.block[0]}x{self.block[1]}"

    def scheme(self, density: float) -> Union[SparseScheme, Pow2Scheme, None]:
        """What ``sparsify`` builds for this candidate at ``density`` (None: dense)."""
        if self.block is None:
            return None
        if self.kind == "pow2":
            return Pow2Scheme(sparsity=1.0 - density, group=self.block[0])
        return SparseScheme(self.block, density)


DENSE = Candidate("dense")
POW2 = Candidate("pow2", (DEFAULT_GROUP, 3))


def candidate_of(scheme: Union[SparseScheme, Pow2Scheme, None]) -> Tuple[Candidate, float]:
    """(candidate, density) that ``scheme`` stands for; a block scheme counts as "block"."""
    if scheme is None:
        return DENSE, 1.0
    if isinstance(scheme, Pow2Scheme):
        return Candidate("pow2", (scheme.group, 3)), 1.0 - scheme.sparsity
    return Candidate("block", scheme.block), scheme.density


def prunable_layers(model: nn.Module, example: torch.Tensor, include: Optional[Callable[[str], bool]] = None
                    ) -> List[Layer]:
    """The nn.Linear / nn.Conv2d layers of ``model`` (those ``include(name)`` accepts),
    with the shapes of their inputs on ``example``, in call order."""
    from ..nn.modules import _conv_unsupported

    names = {id(m): n for n, m in model.named_modules()}
    found: Dict[int, Layer] = {}

    def hook(module, inputs, output):
        name = names.get(id(module))
        if name is None or id(module) in found or (include is not None and not include(name)):
            return
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            if _conv_unsupported(module):
                return
            kh, kw = module.kernel_size
            found[id(module)] = Layer(name, "conv", module.out_channels, module.in_channels * kh * kw, (kh, kw),
                                      tuple(x.shape), output.shape[2] * output.shape[3], x.requires_grad, module)
        else:
            found[id(module)] = Layer(name, "linear", module.out_features, module.in_features, (1, 1),
                                      tuple(x.shape), 1, x.requires_grad, module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        model(example)  # autograd on: it tells which layer inputs carry a gradient
    finally:
        for h in handles:
            h.remove()
    return list(found.values())


def candidates(layer: Layer, blocks: Sequence[Tuple[int, int]] = BLOCKS,
               punched: Sequence[Tuple[int, int]] = PUNCHED, pow2: bool = True) -> List[Candidate]:
    """Dense, every block of ``blocks`` no larger than the weight, for a conv the
    block-punched shapes whose filters and channels fit, and (``pow2``) power-of-two
    weights when a group of C's rows fits."""
    out = [DENSE]
    if pow2 and POW2.block[0] <= layer.n and POW2.block[1] <= layer.k:
        out.append(POW2)
    out += [Candidate("block", b) for b in blocks if b[0] <= layer.n and b[1] <= layer.k]
    if layer.kind == "conv":
        kh, kw = layer.kernel
        in_channels = layer.k // (kh * kw)
        out += [Candidate("punched", (f, c * kh * kw)) for f, c in punched if f <= layer.n and c <= in_channels
                and Candidate("block", (f, c * kh * kw)) not in out]
    return out


class EnergyTable:
    """What each layer keeps of its weights under a candidate at a density:
    ||W||² - ||W - Ŵ||², for block pruning the sum of squares of the kept blocks.

    With ``importance`` (layer name -> a tensor of the weight's shape, >= 0, such as
    :func:`fisher_importance` gives) each square is weighted: sum(F·(W² - (W - Ŵ)²)),
    so a weight counts as much as the loss is expected to feel it. The weighting
    changes what a kept block is worth, not which blocks are kept: ``sparsify`` keeps
    the blocks of largest L2 norm (power-of-two: the rows of largest L1 norm) either way.
    """

    def __init__(self, layers: Sequence[Layer], importance: Optional[Dict[str, torch.Tensor]] = None):
        self.layers = {layer.name: layer for layer in layers}
        self.importance = {}
        for name, weights in (importance or {}).items():
            if name not in self.layers:
                raise ValueError(f"importance names {name!r}, which is not one of the prunable layers {sorted(self.layers)}")
            if tuple(weights.shape) != tuple(self.layers[name].module.weight.shape) or not bool((weights >= 0).all()):
                raise ValueError(f"importance[{name!r}] must be >= 0 with the weight's shape "
                                 f"{tuple(self.layers[name].module.weight.shape)}, got shape {tuple(weights.shape)}")
            self.importance[name] = weights.detach().reshape(self.layers[name].n, self.layers[name].k).double()
        # Squared weights in float64, made once per layer: the squaring and the cast were
        # most of a rule map's time (0.5 s of 0.7 s for a 2048-wide MLP).
        self._squares = {layer.name: layer.weight2d().double().square() for layer in layers}
        self._scores = {name: sq * self.importance[name] if name in self.importance else sq
                        for name, sq in self._squares.items()}
        self.totals = {name: float(score.sum()) for name, score in self._scores.items()}
        self._kept_by_count: Dict[Tuple[str, Candidate], torch.Tensor] = {}  # kept[j]: j blocks kept

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    def kept(self, name: str, candidate: Candidate, density: float) -> float:
        """What the layer as ``candidate`` builds it at ``density`` keeps (all for dense)."""
        if candidate.block is None:
            return self.totals[name]
        key = (name, candidate)
        if key not in self._kept_by_count and candidate.kind == "pow2":
            self._kept_by_count[key] = rounding_kept_energy(self.layers[name].weight2d(), group=candidate.block[0],
                                                            importance=self.importance.get(name))
        if key not in self._kept_by_count:
            # Blocks in the order BSR.from_dense keeps them (L2 norm, descending, ties in
            # row-major order), each worth its (weighted) sum of squares.
            sums = _block_sums(self._squares[name], candidate.block)
            scores = self._scores[name]
            worth = sums if scores is self._squares[name] else _block_sums(scores, candidate.block)
            worth = worth[torch.sort(sums, descending=True, stable=True).indices]
            self._kept_by_count[key] = torch.cat([torch.zeros(1, dtype=torch.float64), worth.cumsum(0)])
        cumulative = self._kept_by_count[key]
        return float(cumulative[self.keep(name, candidate.block, density)])

    def blocks(self, name: str, block: Tuple[int, int]) -> int:
        layer = self.layers[name]
        return -(-layer.n // block[0]) * -(-layer.k // block[1])

    def keep(self, name: str, block: Tuple[int, int], density: float) -> int:
        return math.floor(density * self.blocks(name, block) + 0.5)  # as BSR.from_dense counts


def fisher_importance(model: nn.Module, layers: Sequence[Layer], inputs: torch.Tensor, targets: torch.Tensor,
                      loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                      micro_batches: int = 8) -> Dict[str, torch.Tensor]:
    """The empirical Fisher diagonal of each layer's weight on a calibration batch: the
    sum over ``micro_batches`` parts of (inputs, targets) of the squared gradient of the
    part's summed loss (``loss_fn(outputs, targets)``, default cross-entropy summed over
    the part). To second order, zeroing a weight change Δw costs the loss about
    ½·Σ F·Δw², so F-weighted energy counts weights by how much the loss feels them.
    One sample per part gives the exact empirical Fisher; fewer parts cost fewer passes.

    Runs on a copy of ``model``, so BatchNorm's running statistics are not moved."""
    import copy

    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"calibration inputs and targets must be tensors, got {type(inputs).__name__} and "
                        f"{type(targets).__name__}")
    if inputs.shape[0] == 0 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"calibration targets must have one entry per input sample: {inputs.shape[0]} inputs, "
                         f"{targets.shape[0]} targets (and at least one sample)")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    loss_fn = loss_fn or (lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="sum"))
    calibrated = copy.deepcopy(model)
    modules = dict(calibrated.named_modules())
    weights = [modules[layer.name].weight.requires_grad_(True) for layer in layers]
    fisher = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    for xs, ys in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        grads = torch.autograd.grad(loss_fn(calibrated(xs), ys), weights, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.double().square()
    if not any(bool(f.any()) for f in fisher):
        raise ValueError("the calibration loss has a zero gradient for every prunable layer's weight: "
                         "nothing to weigh the energy by (check the targets and loss_fn)")
    return {layer.name: f for layer, f in zip(layers, fisher)}


def _block_sums(t: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """Sums over the (bn, bk) blocks of t [N, K] (zero-padded to whole blocks), row-major."""
    bn, bk = block
    n, k = t.shape
    if n % bn or k % bk:  # a copy, only when needed
        t = torch.nn.functional.pad(t, (0, -k % bk, 0, -n % bn))
    return t.reshape(t.shape[0] // bn, bn, -1, bk).sum(dim=(1, 3)).flatten()


Latency = Callable[[Layer, Candidate, float], float]


class LayerTimer:
    """Measured latency of what a layer adds to a training step under each candidate:
    forward, backward and the SGD update of its parameters (``layer_step_fn``), each
    timed call with the weights out of the caches and the layer's input and output
    gradient in them (``_ColdWeights``), as in a step, where every other layer runs
    between two calls of this one.

    Why the update and the cold weights: timed as forward + backward called over and
    over, a layer's weights stayed in the L3 and its values never changed, so the
    forward's transposed copy of W was never rebuilt. The MLP map's 30%-dense first
    layer (64x64 blocks, 2048², batch 256) was predicted at 3.65 ms and took 6.0 ms in
    the step (torch profiler: forward 2.78, backward 3.23), and the searched map's step
    less its predicted layers came to 5.2 ms against 3.8-4.1 ms for the uniform maps,
    although that rest (ReLUs, classifier, loss) is the same work in every map. Four
    `edgesparse map --model mlp --compare 3` runs each way: the searched map's rest
    exceeded the uniform maps' by 0.54-0.64 ms timed as now, 0.68-1.79 ms before, and
    the map's step beat the best uniform one by 1.029-1.107x (median 1.08), against
    1.010-1.053x (1.045). ResNet-18's convs (dense weights of 14-900 KiB) moved within
    the noise: 1.135-1.166x against 1.130-1.153x (three runs each).

    ``prepare([(layer, cands), ...])`` times every listed layer's candidates (dense, and
    each block at ``_TIMED_DENSITIES``) in one interleaved run (``bench._median_times``):
    each round runs every variant of every layer in turn. The search weighs one layer's
    milliseconds against another's, so they must be measured under the same load: timed
    layer by layer, a burst of load during one layer's turn once made the MLP's first
    layer look dearer than the others, and the map put its density in the wrong layer
    (predicted 36.8 ms against 24.5 in the runs before and after; the map measured
    0.92x the best uniform one instead of 1.16x). A call then reads the table,
    interpolating in density. Layers with equal signatures share measurements.
    """

    def __init__(self, rounds: int = 3, progress: Optional[Callable[[str], None]] = None, seed: int = 0):
        self.rounds, self.progress, self.seed = rounds, progress, seed
        self.table: Dict[tuple, float] = {}

    def prepare(self, work: Sequence[Tuple[Layer, Sequence[Candidate]]]) -> None:
        from ..bench import _median_times

        fns, before = {}, {}
        flush = _ColdWeights()
        for layer, cands in work:
            sig = layer.signature()
            todo = [(c, d) for c in cands for d in ((1.0,) if c.block is None else _TIMED_DENSITIES)
                    if (sig, c, d) not in self.table and (sig, c, d) not in fns]
            if not todo:
                continue
            g = torch.Generator().manual_seed(self.seed)
            x = torch.randn(layer.in_shape, generator=g).requires_grad_(layer.needs_input_grad)
            with torch.no_grad():
                dy = torch.randn(layer.module(x).shape, generator=g)
            for c, d in todo:
                fns[(sig, c, d)] = layer_step_fn(_timed_module(layer, c, d), x, dy)
                before[(sig, c, d)] = functools.partial(flush, x, dy)
        if not fns:
            return
        if self.progress:
            self.progress(f"timing {len(fns)} variants of {len({key[0] for key in fns})} distinct layers, "
                          f"{self.rounds} rounds, all interleaved")
        self.table.update(_median_times(fns, self.rounds, progress=self.progress, before=before))

    def __call__(self, layer: Layer, candidate: Candidate, density: float) -> float:
        sig = layer.signature()
        if candidate.block is None:
            return self.table[(sig, candidate, 1.0)]
        (d0, d1) = _TIMED_DENSITIES
        t0, t1 = self.table[(sig, candidate, d0)], self.table[(sig, candidate, d1)]
        # Fewer blocks never take longer: a lower reading at the higher density is noise,
        # and left in, the search would chase it.
        t0 = min(t0, t1)
        return max(t0 + (t1 - t0) * (density - d0) / (d1 - d0), 0.05 * t0)


class _ColdWeights:
    """``flush(x, dy)``: writes a buffer of twice the last-level cache, which evicts the
    weights, then reads x and dy back in (a layer's input and output gradient were made
    by its neighbours just before it runs in a step)."""

    def __init__(self):
        from ..compiler.target import last_level_cache_bytes

        self.buffer = torch.empty(2 * last_level_cache_bytes() // 4)

    def __call__(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.buffer.fill_(0.0)
        x.detach().sum()
        dy.sum()


def _timed_module(layer: Layer, candidate: Candidate, density: float) -> nn.Module:
    """The layer as ``candidate`` builds it, for timing: a copy (timing updates its
    parameters). A power-of-two layer is built by plain rounding (``iterations=0``): its
    kernels' time depends on the pattern, not on the values, and the decomposition would
    take 15-18 s per 2048 x 2048 weight."""
    from ..nn import SparseConv2d, SparseLinear

    scheme = candidate.scheme(density)
    if scheme is None:
        return copy.deepcopy(layer.module)
    if isinstance(scheme, Pow2Scheme):
        return replace(scheme, iterations=0).build(layer.module)
    cls = SparseConv2d if layer.kind == "conv" else SparseLinear
    return cls.from_dense(layer.module, scheme.block, scheme.density)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    density: float
    seconds: float
    energy: float  # kept sum of squares

    def scheme(self) -> Union[SparseScheme, Pow2Scheme, None]:
        return self.candidate.scheme(self.density)


def options(layers: Sequence[Layer], energy: EnergyTable, latency: Latency,
            densities: Sequence[float] = DENSITIES, pow2: bool = True) -> Dict[str, List[Choice]]:
    """Every (candidate, density) of every layer with its latency and kept energy."""
    cands = {layer.name: candidates(layer, pow2=pow2) for layer in layers}
    if hasattr(latency, "prepare"):
        latency.prepare([(layer, cands[layer.name]) for layer in layers])
    out = {}
    for layer in layers:
        choices = []
        for c in cands[layer.name]:
            for d in _effective(energy, layer.name, c, densities):
                choices.append(Choice(c, d, latency(layer, c, d), energy.kept(layer.name, c, d)))
        out[layer.name] = choices
    return out


def _effective(energy: EnergyTable, name: str, candidate: Candidate, densities: Sequence[float]) -> List[float]:
    """The densities a block can really have near ``densities``: kept blocks / blocks, at
    least one block kept, each once (a 64x64 block of a 64 x 64 weight has only 1.0)."""
    if candidate.block is None:
        return [1.0]
    total = energy.blocks(name, candidate.block)
    keeps = sorted({energy.keep(name, candidate.block, d) for d in densities} - {0})
    return [k / total for k in keeps]


def search(opts: Dict[str, List[Choice]], energy_target: float, bins: int = 4096) -> Dict[str, Choice]:
    """The map of least summed latency keeping at least ``energy_target`` (absolute sum
    of squares): a multiple-choice knapsack solved by dynamic programming over energy
    quantised to ``bins`` steps; see the module docstring for what it guarantees."""
    import numpy as np

    names = list(opts)
    most = sum(max(c.energy for c in opts[n]) for n in names)
    if energy_target > most * (1 + 1e-12):
        raise ValueError(f"no map keeps {energy_target:.6g} of the energy: at most {most:.6g} is possible")
    if energy_target <= 0:
        return {n: min(opts[n], key=lambda c: c.seconds) for n in names}
    # Knapsack over the energy *lost* (each layer's most minus what an option keeps),
    # rounded up to whole steps: a map within the lost-energy budget keeps >= E for
    # sure, and a layer left dense (or at full density) loses exactly nothing.
    unit = most / bins
    budget = int((most - energy_target) / unit * (1 + 1e-12))
    cost = np.full(budget + 1, np.inf)
    cost[0] = 0.0  # cost[j]: least latency of the layers so far losing exactly j steps
    trace = []  # per layer: the option chosen for each j, and its steps
    for name in names:
        top = max(c.energy for c in opts[name])
        new = np.full(budget + 1, np.inf)
        pick = np.zeros(budget + 1, dtype=np.int64)
        steps = [math.ceil((top - c.energy) / unit * (1 - 1e-12)) for c in opts[name]]
        for i, (c, step) in enumerate(zip(opts[name], steps)):
            if step > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[step:] = cost[:budget + 1 - step] + c.seconds
            better = cand < new
            new[better], pick[better] = cand[better], i
        cost = new
        trace.append((name, pick, steps))
    j = int(np.argmin(cost))
    choice = {}
    for name, pick, steps in reversed(trace):
        i = int(pick[j])
        choice[name] = opts[name][i]
        j -= steps[i]
    return {n: choice[n] for n in names}


def uniform(layers: Sequence[Layer], energy: EnergyTable, latency: Latency, block: Tuple[int, int],
            energy_target: float) -> Optional[Dict[str, Choice]]:
    """Every layer at ``block`` and one density, the least that keeps ``energy_target``
    (bisection on the density); None when the block does not fit every layer."""
    cand = Candidate("block", block)
    if any(block[0] > layer.n or block[1] > layer.k for layer in layers):
        return None

    def kept(d):
        return sum(energy.kept(layer.name, cand, d) for layer in layers)

    if kept(1.0) < energy_target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) >= energy_target else (mid, hi)
    if hasattr(latency, "prepare"):
        latency.prepare([(layer, [cand]) for layer in layers])
    return {layer.name: Choice(cand, hi, latency(layer, cand, hi), energy.kept(layer.name, cand, hi)) for layer in layers}


def derive_rules(layers: Sequence[Layer], choice: Dict[str, Choice]) -> List[dict]:
    """One rule per searched layer: its type, kernel, dimensions (N, K, output positions
    per sample), whether its input needs a gradient, its depth in the model (0 first,
    1 last prunable layer) and the choice the search made for it.

    Depth is in the rule because the search gives layers of equal shape different
    choices to meet a global budget (the MLP's two equal hidden layers: 8x16 @ 0.01 and
    16x8 @ 0.3); one rule per shape kept only one of them and its map fell to a tenth
    of the energy budget."""
    last = max(len(layers) - 1, 1)
    rules = []
    for i, layer in enumerate(layers):
        c = choice[layer.name]
        rules.append({"kind": layer.kind, "kernel": list(layer.kernel), "n": layer.n, "k": layer.k,
                      "positions": layer.out_positions, "input_grad": layer.needs_input_grad, "depth": i / last,
                      "candidate": c.candidate.kind, "block": list(c.candidate.block) if c.candidate.block else None,
                      "density": c.density})
    return rules


def apply_rules(layers: Sequence[Layer], rules: Sequence[dict]) -> Dict[str, Union[SparseScheme, Pow2Scheme, None]]:
    """Each layer's scheme from the nearest fitting rule of its type and kernel (None:
    dense, also when no rule fits): distance in log N, log K, log positions, input
    gradient and depth."""
    last = max(len(layers) - 1, 1)

    def distance(layer: Layer, depth: float, rule: dict) -> float:
        return (abs(math.log(layer.n / rule["n"])) + abs(math.log(layer.k / rule["k"]))
                + abs(math.log(layer.out_positions / rule["positions"])) + (layer.needs_input_grad != rule["input_grad"])
                + abs(depth - rule.get("depth", depth)))

    out: Dict[str, Union[SparseScheme, Pow2Scheme, None]] = {}
    for i, layer in enumerate(layers):
        fitting = [r for r in rules if r["kind"] == layer.kind and tuple(r["kernel"]) == layer.kernel
                   and (r["block"] is None or (r["block"][0] <= layer.n and r["block"][1] <= layer.k))]
        if not fitting:
            out[layer.name] = None
            continue
        rule = min(fitting, key=lambda r: distance(layer, i / last, r))
        block = tuple(rule["block"]) if rule["block"] else None
        out[layer.name] = Candidate(rule["candidate"], block).scheme(rule["density"])
    return out


@dataclass
class SearchResult:
    pmap: PruningMap
    choice: Dict[str, Choice]
    uniforms: Dict[Tuple[int, int], Dict[str, Choice]]  # block -> uniform map at the same energy
    energy_target: float  # fraction of the prunable layers' energy
    seconds: float  # time the search took, measuring included


def _fraction(choice: Dict[str, Choice], energy: EnergyTable) -> float:
    return sum(c.energy for c in choice.values()) / energy.total


def search_map(model: nn.Module, example: torch.Tensor, sparsity: float, target: str,
               include: Optional[Callable[[str], bool]] = None, latency: Optional[Latency] = None,
               reference_block: Tuple[int, int] = (16, 16), progress: Optional[Callable[[str], None]] = None,
               layer_floor: float = 0.0, pow2: bool = True,
               calibration: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> SearchResult:
    """Search the map of least latency that keeps as much weight energy as every prunable
    layer at ``reference_block`` and density ``1 - sparsity`` would (the budget), and the
    uniform maps (one block everywhere) at the same energy to compare with.

    ``pow2``: whether power-of-two weights are among the candidates.

    ``calibration``: (inputs, targets) of real data; then every energy, the budget's
    included, is weighted by the weights' empirical Fisher on it (:func:`fisher_importance`,
    ``loss_fn`` as there), so the search spends its budget where the loss feels it.

    ``layer_floor``: each layer must also keep at least ``layer_floor`` x the budget's
    fraction of its own energy. The global budget alone lets the search starve layers
    whose energy is cheap to give up (the reduced ResNet-18 at 90%: most convs at 0.7-2%
    density, one kept dense), which the energy proxy does not see as an accuracy risk.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not isinstance(layer_floor, (int, float)) or isinstance(layer_floor, bool) or not layer_floor >= 0.0:
        raise ValueError(f"layer_floor must be a number >= 0, got {layer_floor!r}")
    start = time.perf_counter()
    layers = prunable_layers(model, example, include)
    if not layers:
        raise ValueError("the model has no prunable layer (nn.Linear / nn.Conv2d) that include() accepts")
    importance = None if calibration is None else fisher_importance(model, layers, *calibration, loss_fn=loss_fn)
    energy = EnergyTable(layers, importance)
    latency = latency or LayerTimer(progress=progress)
    ref = Candidate("block", tuple(reference_block))
    target_abs = sum(energy.kept(layer.name, ref, 1.0 - sparsity) for layer in layers)
    floor = layer_floor * target_abs / energy.total if energy.total else 0.0
    if floor > 1.0:
        raise ValueError(f"layer_floor={layer_floor} asks every layer to keep {floor:.3g}x its energy; at most "
                         f"{energy.total / target_abs:.3g} is possible at sparsity {sparsity}")
    opts = {name: [c for c in cs if c.energy >= floor * energy.totals[name] * (1 - 1e-12)]
            for name, cs in options(layers, energy, latency, pow2=pow2).items()}
    choice = search(opts, target_abs)
    uniforms = {}
    for block in BLOCKS:
        u = uniform(layers, energy, latency, block, target_abs)
        if u is not None:
            uniforms[block] = u
    rules = derive_rules(layers, choice)
    pmap = PruningMap(
        target, {name: c.scheme() for name, c in choice.items()}, None, rules,
        info={"method": "search", "sparsity": sparsity, "reference_block": list(reference_block),
              "energy_target": target_abs / energy.total, "retained_energy": _fraction(choice, energy),
              "layer_floor": layer_floor, "pow2": pow2,
              "proxy": "energy" if calibration is None else "fisher-weighted energy",
              "predicted_ms": 1e3 * sum(c.seconds for c in choice.values())},
        notes={name: {"kind": c.candidate.kind, "predicted_ms": 1e3 * c.seconds,
                      # a layer the calibration loss does not reach keeps "all" of its nothing
                      "retained_energy": c.energy / energy.totals[name] if energy.totals[name] else 1.0}
               for name, c in choice.items()},
    )
    return SearchResult(pmap, choice, uniforms, target_abs / energy.total, time.perf_counter() - start)


def rule_map(model: nn.Module, example: torch.Tensor, rules: Sequence[dict], target: str,
             include: Optional[Callable[[str], bool]] = None) -> PruningMap:
    """The map the rules give ``model``'s prunable layers: no measuring. One sample of
    ``example`` is enough to see the layers' shapes."""
    layers = prunable_layers(model, example[:1], include)
    schemes = apply_rules(layers, rules)
    energy = EnergyTable(layers)
    kept = sum(energy.kept(layer.name, *candidate_of(schemes[layer.name])) for layer in layers)
    return PruningMap(target, schemes, None, list(rules),
                      info={"method": "rule", "retained_energy": kept / energy.total if energy.total else 1.0})


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
