"""What a training run can switch on around its optimizer steps: SparCL's TDM, DDR and
DGM, SpFDE's freezing and sieving, RigL. Each is a :class:`Mechanism` whose hooks the
trainer calls at fixed points; every schedule is given in ``progress``, the fraction of
the current task's epochs done (0 at its first step, 1 after its last), so that it
scales with the number of epochs a task is trained for.

The trainer calls, per task: ``start_task``; per epoch: ``start_epoch``, ``end_epoch``;
per step, with the progress ``p0`` before and ``p1`` after it: ``before_step`` (before
forward), ``after_backward`` (gradients present, before the optimizer step) and
``after_step`` (with the batch's example positions, whether each was classified
correctly, and its loss). A schedule point q fires on the step with p0 <= q < p1; an
epoch-end point (data selection, which takes effect from the next epoch) fires at the
end of the epoch with p0 < q <= p1.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from .masks import grow_blocks, keep_top_blocks, n_blocks_for

__all__ = [
    "DataRemoval",
    "DataSieving",
    "GradientMasking",
    "Mechanism",
    "ProgressiveFreezing",
    "RigL",
    "TaskAwareMasking",
]


def _fired(points: Sequence[float], p0: float, p1: float) -> List[float]:
    return [q for q in points if p0 <= q < p1]


def _fired_by_end(points: Sequence[float], p0: float, p1: float) -> List[float]:
    # The tolerance absorbs rounding in p1 = (epoch + 1) / epochs, e.g. 3/10 against 0.3.
    return [q for q in points if p0 < q <= p1 + 1e-9]


def _block_scores(layer, per_block: torch.Tensor) -> torch.Tensor:
    """A per-stored-block score [nnz_blocks] laid on the block grid (0 elsewhere)."""
    grid = torch.zeros(layer.block_grid)
    grid[layer.row_indices.long(), layer.col_indices.long()] = per_block.detach().float()
    return grid


class Mechanism:
    """No-op hooks; ``trainer`` gives ``model``, ``optimizer``, ``gen`` (the run's random
    generator) and ``sparse`` (the list of (name, sparse layer))."""

    def start_task(self, trainer, n_examples: int) -> None:
        pass

    def start_epoch(self, trainer) -> None:
        pass

    def before_step(self, trainer, p0: float, p1: float) -> None:
        pass

    def after_backward(self, trainer, p0: float, p1: float) -> None:
        pass

    def after_step(self, trainer, p0: float, p1: float, positions, correct, loss) -> None:
        pass

    def end_epoch(self, trainer, p0: float, p1: float) -> None:
        pass

    def active(self):
        """bool [n_examples] of the task's examples this mechanism still trains on, or None."""
        return None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        pass


class TaskAwareMasking(Mechanism):
    """SparCL's TDM at block granularity. Importance of a block = sum over its entries of
    |w| + λ|g| (g: the gradient of this step's full loss, current + buffer batch). Each
    task is cut into ``phases`` (SparCL: 50 epochs, 10 phases of 5); at its first step the
    mask is pruned to the target sparsity s and regrown to s - δ, at the start of the next
    phases but the last it is pruned to s + δ and regrown to s, and the last phase keeps it.
    So every task starts with δ extra density and swaps δ of the blocks per phase (SparCL:
    δ = 1%; ours 0.2%, see RunConfig.tdm_delta). Regrown blocks are drawn uniformly at
    random from those outside the mask and start at zero."""

    def __init__(self, densities: Dict[str, float], delta: float = 0.002, lam: float = 0.5, phases: int = 10):
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"delta must lie in [0, 1), got {delta}")
        if phases < 2:
            raise ValueError(f"phases must be at least 2, got {phases}")
        self.densities, self.delta, self.lam = dict(densities), delta, lam
        self.points = [k / phases for k in range(phases - 1)]

    def after_backward(self, trainer, p0, p1):
        for q in _fired(self.points, p0, p1):
            self.update(trainer, first=q == 0)

    @torch.no_grad()
    def update(self, trainer, first: bool) -> None:
        for name, layer in trainer.sparse:
            if layer.values.grad is None:  # frozen: no gradient, no importance
                continue
            density = self.densities[name]
            total = layer.block_grid[0] * layer.block_grid[1]
            importance = (layer.values.abs() + self.lam * layer.values.grad.abs()).sum((1, 2))
            mask = layer.block_mask()
            prune_to, grow_to = (density, density + self.delta) if first else (density - self.delta, density)
            kept = keep_top_blocks(mask, _block_scores(layer, importance), n_blocks_for(prune_to, total))
            target = n_blocks_for(grow_to, total)
            new = grow_blocks(kept, mask & ~kept, target - int(kept.sum()), gen=trainer.gen)
            layer.set_pattern(new, trainer.optimizer)


class DataRemoval(Mechanism):
    """SparCL's DDR. For each current-task example, counts forgetting events (classified
    correctly at one presentation, wrongly at its next); an example never classified
    correctly counts as the most forgotten. At the end of the epoch reaching each of
    ``stages`` (SparCL: after epochs 5, 10, 15, 20 of 50) the ``fraction / len(stages)`` of the task's examples with the fewest
    events (the easiest) leave the task's training set, and the counts restart. It acts
    on the current task's examples only: the replay buffer is never touched.

    A forgetting event needs two presentations, so a removal waits until the counts
    span ``min_epochs`` epochs, and stages reached meanwhile are removed together. With
    5 epochs a task, stages 0.1-0.4 fall on the first two epoch ends: removing on one
    epoch's counts (every example at 0 events) took the first correct examples by
    position, not the easiest. (Fixing it did not change the default run's class-IL
    beyond its noise: 57.8% before, 57.4% after; the removal itself costs accuracy.)"""

    def __init__(self, fraction: float = 0.3, stages: Sequence[float] = (0.1, 0.2, 0.3, 0.4), min_epochs: int = 2):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
        self.fraction, self.stages, self.min_epochs = fraction, tuple(stages), min_epochs

    def start_task(self, trainer, n_examples):
        self.n = n_examples
        self.alive = torch.ones(n_examples, dtype=torch.bool)
        self.pending = torch.tensor(0)  # stages reached, not yet removed
        self._reset()

    def _reset(self):
        self.events = torch.zeros(self.n, dtype=torch.int64)
        self.last_correct = torch.zeros(self.n, dtype=torch.bool)
        self.ever_correct = torch.zeros(self.n, dtype=torch.bool)
        self.epochs_counted = torch.tensor(0)

    def after_step(self, trainer, p0, p1, positions, correct, loss):
        self.events[positions] += (self.last_correct[positions] & ~correct).long()
        self.last_correct[positions] = correct
        self.ever_correct[positions] |= correct

    def end_epoch(self, trainer, p0, p1):
        self.pending += len(_fired_by_end(self.stages, p0, p1))
        self.epochs_counted += 1
        if int(self.pending) and int(self.epochs_counted) >= self.min_epochs:
            self.remove(round(self.fraction / len(self.stages) * self.n * int(self.pending)))
            self.pending.zero_()

    def remove(self, count: int) -> None:
        score = self.events.float().masked_fill(~self.ever_correct, float("inf"))
        candidates = self.alive.nonzero()[:, 0]
        easiest = torch.sort(score[candidates], stable=True).indices[: min(count, candidates.numel() - 1)]
        self.alive[candidates[easiest]] = False
        self._reset()

    def active(self):
        return self.alive

    def state_dict(self):
        return {"alive": self.alive, "events": self.events, "last_correct": self.last_correct, "ever_correct": self.ever_correct,
                "pending": self.pending, "epochs_counted": self.epochs_counted}

    def load_state_dict(self, state):
        self.n = len(state["alive"])
        for key, value in state.items():
            setattr(self, key, value.clone())


class GradientMasking(Mechanism):
    """SparCL's DGM through :meth:`mask_gradients` of every sparse layer: the gradient
    blocks with the largest norm are computed, the mask re-chosen every ``refresh_every``
    steps. It is re-chosen at every epoch start too, so that a run resumed from an
    (epoch-end) checkpoint masks exactly as before.

    ``fraction`` is of the layer's whole weight matrix, as in SparCL's code, which zeroes
    the entries of the masked gradient (pruned weights included, at zero) below the
    80th percentile: a layer keeping ``density`` of its blocks computes ``fraction /
    density`` of them, and none is skipped once ``fraction >= density`` (at 90% weight
    sparsity SparCL's 20% removes nothing beyond the weight mask). Read as a share of
    the kept blocks instead, 20% cost 13 points of class-IL on Split-Digits at 90%."""

    def __init__(self, fraction: float = 0.2, refresh_every: int = 30):
        self.fraction, self.refresh_every = fraction, refresh_every

    def start_epoch(self, trainer):
        for _, layer in trainer.sparse:
            kept_share = self.fraction / layer.density if layer.density > 0 else 1.0
            layer.mask_gradients(kept_share if kept_share < 1.0 else None, self.refresh_every, "block")


class ProgressiveFreezing(Mechanism):
    """SpFDE's progressive freezing from the front: after progress ``freeze_at[i]`` of each
    task the first i+1 layers are frozen (no weight gradient, no backward through them);
    a new task starts with every layer trainable again, since it must adapt the features.
    Defaults (ours; the paper's schedule is not public): first layer at 50%, first two at 75%."""

    def __init__(self, freeze_at: Sequence[float] = (0.5, 0.75)):
        if list(freeze_at) != sorted(freeze_at) or not all(0.0 < q < 1.0 for q in freeze_at):
            raise ValueError(f"freeze_at must be increasing fractions in (0, 1), got {list(freeze_at)}")
        self.freeze_at = tuple(freeze_at)

    def start_task(self, trainer, n_examples):
        trainer.model.freeze_prefix(0)

    def before_step(self, trainer, p0, p1):
        n = sum(q <= p0 for q in self.freeze_at)
        if n != trainer.model.frozen:
            trainer.model.freeze_prefix(n)


class DataSieving(Mechanism):
    """SpFDE's circular data sieving. A task starts on a random ``keep`` share of its
    examples (the partial set); the rest wait in a queue. After every epoch the ``swap``
    share of the task's examples with the lowest last-seen loss (the easiest) leave the
    partial set for the back of the queue and as many from the front of the queue come
    in, so every example is revisited. Defaults (ours): keep 80%, swap 10% per epoch."""

    def __init__(self, keep: float = 0.8, swap: float = 0.1):
        if not 0.0 < keep <= 1.0 or not 0.0 <= swap <= 1.0:
            raise ValueError(f"keep must lie in (0, 1] and swap in [0, 1], got keep={keep}, swap={swap}")
        self.keep, self.swap = keep, swap

    def start_task(self, trainer, n_examples):
        order = torch.randperm(n_examples, generator=trainer.gen)
        n_keep = max(1, round(self.keep * n_examples))
        self.partial = torch.zeros(n_examples, dtype=torch.bool)
        self.partial[order[:n_keep]] = True
        self.queue = order[n_keep:].clone()
        self.loss = torch.full((n_examples,), float("inf"))

    def after_step(self, trainer, p0, p1, positions, correct, loss):
        self.loss[positions] = loss.detach().float()

    def end_epoch(self, trainer, p0, p1):
        count = min(round(self.swap * len(self.partial)), self.queue.numel())
        if count == 0:
            return
        members = self.partial.nonzero()[:, 0]
        easiest = members[torch.sort(self.loss[members], stable=True).indices[:count]]
        incoming, self.queue = self.queue[:count], torch.cat([self.queue[count:], easiest])
        self.partial[easiest] = False
        self.partial[incoming] = True

    def active(self):
        return self.partial

    def state_dict(self):
        return {"partial": self.partial, "queue": self.queue, "loss": self.loss}

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value.clone())


class RigL(Mechanism):
    """RigL at block granularity. Every ``every`` of a task until ``end`` (defaults: 5% and
    75%), per sparse layer, k = f·nnz_blocks blocks are dropped — those of smallest L2 norm
    — and k grown — the outside blocks whose dense weight gradient (this step's) has the
    largest norm — with f = α/2·(1 + cos(π·q/end)) at schedule point q, α = 0.3. Grown
    blocks start at zero with zeroed optimizer state. Each task runs its own schedule."""

    def __init__(self, alpha: float = 0.3, every: float = 0.05, end: float = 0.75):
        if not 0.0 < every < end <= 1.0:
            raise ValueError(f"need 0 < every < end <= 1, got every={every}, end={end}")
        self.alpha, self.end = alpha, end
        self.points = [k * every for k in range(1, math.ceil(end / every)) if k * every < end]
        self.pending = None

    def drop_fraction(self, q: float) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * q / self.end))

    def before_step(self, trainer, p0, p1):
        fired = _fired(self.points, p0, p1)
        if fired:
            self.pending = self.drop_fraction(fired[-1])
            for _, layer in trainer.sparse:
                layer.request_dense_grad_scores()

    @torch.no_grad()
    def after_backward(self, trainer, p0, p1):
        if self.pending is None:
            return
        fraction, self.pending = self.pending, None
        for _, layer in trainer.sparse:
            scores = layer.dense_grad_scores
            if scores is None:  # frozen: backward never reached it
                continue
            mask = layer.block_mask()
            k = int(fraction * layer.nnz_blocks)
            kept = keep_top_blocks(mask, _block_scores(layer, layer.values.flatten(1).norm(dim=1)), layer.nnz_blocks - k)
            layer.set_pattern(grow_blocks(kept, mask & ~kept, k, score=scores.float()), trainer.optimizer)
