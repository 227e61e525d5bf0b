"""Training FLOPs counted from what actually runs.

A :class:`FlopCounter` hooks every weight layer of a model (``nn.Linear``, ``nn.Conv2d``
and the sparse layers) and, while it is ``enabled``, adds up the multiply-adds (2 FLOPs
each) of the weight products, with ``rows`` the number of rows a product multiplies
(batch for a linear layer, batch x output pixels for a conv):

- forward: 2 · entries · rows, where ``entries`` is what the kernel multiplies: every
  weight of a dense layer, the stored blocks (nnz_blocks · bn · bk) of a sparse one;
- grad-input: 2 · entries · rows, only when backward reaches the layer's output and its
  input asks for a gradient (not for the first layer, nor inside a frozen prefix);
- grad-weight: 2 · entries · rows when the weight is trained, with ``entries`` the blocks
  the gradient mask lets through under gradient masking (SparCL's DGM) — the blocks the
  grad-weight kernel actually computes.

A forward that backward never reaches (evaluation, a frozen prefix run without autograd)
counts its forward only: the backward share is added by a hook on the layer's output,
which fires only when its gradient is computed. Elementwise work (bias, activations,
loss, optimizer) is left out: it is under 1% of the products in the models here.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..nn.modules import _BlockSparseLayer

__all__ = ["FlopCounter", "weight_entries"]


def weight_entries(layer: nn.Module) -> int:
    """Weight entries the layer's products multiply: stored blocks for a sparse layer."""
    if isinstance(layer, _BlockSparseLayer):
        return layer.values.numel()
    return layer.weight.numel()


def _output_width(layer: nn.Module) -> int:
    if isinstance(layer, _BlockSparseLayer):
        return layer.shape[0]
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _grad_weight_entries(layer: nn.Module) -> int:
    """Entries the next grad-weight product computes: the gradient mask's blocks when one
    is cached (it was read by this forward), every stored block otherwise (a refresh)."""
    if isinstance(layer, _BlockSparseLayer):
        mask = layer.gradient_mask if layer._grad_masking is not None else None
        if mask is not None:
            return int(mask.blocks.numel()) * layer.block[0] * layer.block[1]
    return weight_entries(layer)


class FlopCounter:
    """Counts the weight products of ``model`` while ``enabled`` (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.enabled = False
        self.forward = 0
        self.backward = 0
        self._handles = [
            module.register_forward_hook(self._on_forward)
            for module in model.modules()
            if isinstance(module, (nn.Linear, nn.Conv2d, _BlockSparseLayer))
        ]

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def _on_forward(self, layer: nn.Module, inputs, output: torch.Tensor) -> None:
        if not self.enabled:
            return
        rows = output.numel() // _output_width(layer)
        entries = weight_entries(layer)
        self.forward += 2 * entries * rows
        if not output.requires_grad:
            return
        weight = layer.values if isinstance(layer, _BlockSparseLayer) else layer.weight
        grad_input = 2 * entries * rows if inputs[0].requires_grad else 0
        grad_weight = 2 * _grad_weight_entries(layer) * rows if weight.requires_grad else 0

        def on_backward(grad):
            self.backward += grad_input + grad_weight

        output.register_hook(on_backward)

    def state_dict(self) -> Dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.forward, self.backward = int(state["forward"]), int(state["backward"])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
