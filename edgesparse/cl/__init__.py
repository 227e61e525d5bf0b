"""Continual learning on the block-sparse layers: data streams, replay strategies,
SparCL (TDM, DDR, DGM), SpFDE (freezing, sieving), RigL, metrics and the trainer
behind ``edgesparse train``."""

from .train import RunConfig, run

__all__ = ["RunConfig", "run"]
