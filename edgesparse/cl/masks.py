"""Block-mask edits shared by SparCL's task-aware masking and RigL: keep the top blocks
by a score, grow new blocks, and per-layer density budgets (uniform or ERK)."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

__all__ = ["erk_densities", "grow_blocks", "keep_top_blocks", "layer_densities", "n_blocks_for"]


def n_blocks_for(density: float, total: int) -> int:
    """Blocks to keep for ``density`` of ``total`` (at least one, at most all)."""
    return max(1, min(total, round(density * total)))


def keep_top_blocks(mask: torch.Tensor, score: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` blocks of ``mask`` (bool [NB, KB]) with the highest ``score`` (same
    shape; blocks outside ``mask`` never chosen); ties go to the lower flat position."""
    kept = mask.flatten().nonzero()[:, 0]
    keep = min(keep, kept.numel())
    # A stable descending sort makes the choice deterministic under ties.
    order = torch.sort(score.flatten()[kept], descending=True, stable=True).indices[:keep]
    out = torch.zeros_like(mask).flatten()
    out[kept[order]] = True
    return out.view_as(mask)


def grow_blocks(mask: torch.Tensor, exclude: torch.Tensor, count: int, score=None, gen=None) -> torch.Tensor:
    """``mask`` plus ``count`` blocks from outside ``mask | exclude``: those of highest
    ``score`` (RigL's dense-gradient norms), or uniformly at random with ``gen`` (SparCL's
    regrowth) when ``score`` is None. Fewer when there are not enough candidates."""
    candidates = (~(mask | exclude)).flatten().nonzero()[:, 0]
    count = min(max(count, 0), candidates.numel())
    if score is None:
        chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:count]]
    else:
        chosen = candidates[torch.sort(score.flatten()[candidates], descending=True, stable=True).indices[:count]]
    out = mask.clone().flatten()
    out[chosen] = True
    return out.view_as(mask)


def erk_densities(shapes: Sequence[Tuple[int, ...]], density: float) -> List[float]:
    """Erdős–Rényi-kernel densities (RigL): layer l gets ε·sum(shape_l)/prod(shape_l), ε
    chosen so that the layers together keep ``density`` of their weights; a layer that
    would exceed 1 is made dense and ε solved again over the others."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        free = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        eps = budget / free if free > 0 else 0.0
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def layer_densities(method: str, shapes: Sequence[Tuple[int, ...]], density: float) -> List[float]:
    """Per-layer densities with ``density`` overall: "uniform" or "erk"."""
    if method == "uniform":
        return [density] * len(shapes)
    if method == "erk":
        return erk_densities(shapes, density)
    raise ValueError(f"method must be 'uniform' or 'erk', got {method!r}")
