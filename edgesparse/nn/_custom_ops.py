"""Our products as torch custom ops, and the short way eager mode takes around them.

torch.compile must see each product as one opaque custom op with a fake implementation
to trace a training step without a graph break. Eager mode needs none of that, and the
custom-op layers (flattening list arguments, the dispatcher, the autograd wrapper)
cost time on every call: the CL default's MLP (2048-wide, two layers at 10% of 32 x 32
blocks) took 17.0 ms for a training step of 96 rows through the custom ops against
13.3 ms through a plain ``torch.autograd.Function`` running the same implementation
and formula (one 2048 x 2048 layer's forward: 1.58 against 1.08 ms, dev machine, median
of two runs). So a :class:`SparseOp` is the custom op while a graph is traced
(``torch.compile``, ``torch.export``), and that Function in eager mode.
"""

from __future__ import annotations

from typing import Callable

import torch


class SparseOp:
    """The custom op ``name`` made of ``impl`` (its schema read from the annotations) and
    the fake implementation ``fake``."""

    def __init__(self, name: str, impl: Callable, fake: Callable):
        self.name, self.impl = name, impl
        self.op = torch.library.custom_op(name, impl, mutates_args=())
        self.op.register_fake(fake)
        self._eager = None

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self._eager.apply(*args) if self._eager is not None else self.impl(*args)

    def run(self, eager: bool, *args):
        """For a backward formula: the implementation when its forward ran eagerly, the
        custom op when it is being traced."""
        return self.impl(*args) if eager else self.op(*args)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """``setup_context(ctx, inputs, output)`` as torch.library takes it;
        ``backward(ctx, dy, eager)`` returns one gradient per input, a list of Nones for
        a list input, and runs its products with :meth:`run`."""
        self.op.register_autograd(lambda ctx, dy: backward(ctx, dy, False), setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        def eager_backward(ctx, dy):
            # A plain Function takes one gradient per argument: None for a list.
            return tuple(None if isinstance(g, list) else g for g in backward(ctx, dy, True))

        self._eager = type(self.name.replace("::", "_"), (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(eager_backward),
        })
