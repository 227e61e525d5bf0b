"""Kernel backends. ``reference`` is pure torch; ``tvm`` and ``triton`` are imported
only when :mod:`edgesparse.kernels.dispatch` picks them."""
