"""Which backend runs an op.

Automatic choice: CPU tensors go to ``tvm``, CUDA tensors to ``triton``, anything
else to ``reference``. An automatically chosen backend that cannot run here (not
installed, unsupported dtype) falls back to ``reference``. A backend asked for
explicitly — ``EDGESPARSE_BACKEND=name`` or ``with edgesparse.use_backend(name):``,
the context manager winning over the variable — raises instead, so a user who asked
for speed is never silently handed the slow path.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

BACKENDS = ("tvm", "triton", "reference")
ENV_VAR = "EDGESPARSE_BACKEND"

_requested: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("edgesparse_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these tensors."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block on backend ``name`` ('tvm', 'triton' or 'reference')."""
    token = _requested.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend() -> Optional[str]:
    """The explicitly requested backend, if any (context manager first, then the environment)."""
    name = _requested.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"the environment variable {ENV_VAR}") if env else None


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"edgesparse.kernels.{name}")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot run tensors of this device and dtype, or None if it can."""
    if name == "reference":
        return None
    try:
        module = _module(name)
    except ImportError as err:  # the backend's package (tvm / triton) is not installed
        return f"it could not be imported ({err})"
    return module.unavailable_reason(device, dtype)


def select(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module that will run an op on tensors of this device and dtype."""
    name = requested_backend()
    if name is not None:
        reason = unavailable_reason(name, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} was requested but cannot run {dtype} tensors on {device}: {reason}. "
                f"Unset {ENV_VAR} / leave use_backend() to let edgesparse choose."
            )
        return _module(name)
    auto = {"cpu": "tvm", "cuda": "triton"}.get(device.type, "reference")
    if unavailable_reason(auto, device, dtype) is None:
        return _module(auto)
    return _module("reference")
