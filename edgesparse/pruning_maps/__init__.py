"""Pruning-scheme mapping: choose each layer's block shape and density from latency
measured on the target and the weight energy each choice keeps (see ``mapper.py``)."""

from .mapper import (
    BLOCKS, DENSITIES, PUNCHED, Candidate, EnergyTable, LayerTimer, apply_rules, candidates, derive_rules,
    fisher_importance, prunable_layers, rule_map, search, search_map, uniform,
)
from .pmap import SCHEMA_VERSION, PruningMap, PruningMapError

__all__ = [
    "BLOCKS", "DENSITIES", "PUNCHED", "SCHEMA_VERSION", "Candidate", "EnergyTable", "LayerTimer", "PruningMap",
    "PruningMapError", "apply_rules", "candidates", "derive_rules", "fisher_importance", "prunable_layers",
    "rule_map", "search", "search_map", "uniform",
]
