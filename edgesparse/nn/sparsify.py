"""``sparsify(model, config)``: swap a model's layers for block-sparse ones, by name.

The config follows torchao's FqnToConfig: a module's qualified name is looked up as an
exact key first, then against the ``"re:<pattern>"`` keys (``re.fullmatch``, the first
match in the config's insertion order), then under ``"default"``. The value is a
:class:`SparseScheme` (or a dict with the same fields), or None to keep the layer dense —
the way to exclude, say, the first layer or the classifier from a default. A
:class:`~edgesparse.nn.pow2.Pow2Scheme` value makes the layer a Pow2Linear / Pow2Conv2d.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

from ..formats import _check_block, _check_density
from .modules import SparseConv2d, SparseLinear, _conv_unsupported
from .pow2 import Pow2Scheme

__all__ = ["SparseScheme", "sparsify"]

_DEFAULT = "default"
_REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class SparseScheme:
    """Keep ``density`` of the weight's (bn, bk) blocks, those of largest L2 norm."""

    block: Tuple[int, int]
    density: float

    def __post_init__(self):
        object.__setattr__(self, "block", _check_block(self.block))
        object.__setattr__(self, "density", _check_density(self.density))

    @classmethod
    def coerce(cls, value, where: str) -> Optional["SparseScheme"]:
        """A scheme from a config value: a SparseScheme, a dict of its fields, or None."""
        if value is None or isinstance(value, (cls, Pow2Scheme)):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where} must be a SparseScheme, a dict with keys 'block' and 'density', or None, "
                f"got {type(value).__name__}"
            )
        names = [f.name for f in fields(cls)]
        problems = []
        unknown = sorted(map(repr, set(value) - set(names)))
        if unknown:
            problems.append(f"unknown {', '.join(unknown)}")
        missing = [name for name in names if name not in value]
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if problems:
            raise ValueError(f"{where} must have exactly the keys {names}; {'; '.join(problems)}")
        try:
            return cls(**value)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err


SchemeLike = Union[SparseScheme, Pow2Scheme, Mapping, None]


class _Rules:
    """A parsed, validated config: exact names, compiled ``re:`` patterns, default."""

    def __init__(self, config: Mapping[str, SchemeLike]):
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping of module names to schemes, got {type(config).__name__}")
        self.exact: Dict[str, Optional[SparseScheme]] = {}
        self.patterns: List[Tuple[re.Pattern, Optional[SparseScheme]]] = []
        self.default: Optional[SparseScheme] = None
        for key, value in config.items():
            if not isinstance(key, str):
                raise TypeError(f"config keys must be module names, 're:<pattern>' or 'default', got {key!r}")
            scheme = SparseScheme.coerce(value, f"config[{key!r}]")
            if key == _DEFAULT:
                self.default = scheme
            elif key.startswith(_REGEX_PREFIX):
                try:
                    self.patterns.append((re.compile(key[len(_REGEX_PREFIX):]), scheme))
                except re.error as err:
                    raise ValueError(f"config key {key!r} is not a valid regular expression: {err}") from err
            else:
                self.exact[key] = scheme

    def lookup(self, name: str) -> Tuple[Optional[SparseScheme], bool]:
        """(scheme for module ``name``, whether the config names it exactly)."""
        if name in self.exact:
            return self.exact[name], True
        for pattern, scheme in self.patterns:
            if pattern.fullmatch(name):
                return scheme, False
        return self.default, False


# The dense types sparsify swaps, and their sparse counterparts.
_SPARSE_OF = ((nn.Linear, SparseLinear), (nn.Conv2d, SparseConv2d))
_SUPPORTED = "nn.Linear and nn.Conv2d (groups=1, zero padding)"


def _sparse_class(module: nn.Module) -> Tuple[Optional[type], Optional[str]]:
    """(the sparse layer class that can replace ``module``, or None; why not, if not)."""
    for dense, sparse in _SPARSE_OF:
        if isinstance(module, dense):
            reason = _conv_unsupported(module) if sparse is SparseConv2d else None
            return (None, reason) if reason else (sparse, None)
    return None, f"sparsify supports {_SUPPORTED}"


def sparsify(model: nn.Module, config: Mapping[str, SchemeLike]) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` and ``nn.Conv2d`` of ``model`` that ``config``
    gives a scheme with ``SparseLinear.from_dense(layer, scheme.block, scheme.density)``
    (``SparseConv2d.from_dense`` for a conv, whose weight is blocked as the matrix
    [out_channels, in_channels·kh·kw]); returns ``model``. ``config`` may also be an
    :class:`edgesparse.pruning_maps.PruningMap`.

    ``re:`` patterns and the default apply to the layers sparsify supports and pass over
    the others (containers, norms, grouped convs, ...); a module named exactly must be
    supported. A module reachable under several names is replaced by one sparse layer
    everywhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from ..pruning_maps.pmap import PruningMap  # here: pruning_maps imports this module

    if isinstance(config, PruningMap):  # a map from ``edgesparse map``: its per-layer config
        config = config.to_config()
    rules = _Rules(config)
    # remove_duplicate=False: a shared layer is swapped under every name it has.
    named = list(model.named_modules(remove_duplicate=False))
    unknown = sorted(set(rules.exact) - {name for name, _ in named})
    if unknown:
        raise ValueError(f"config names modules that are not in the model: {unknown}")

    # Build every replacement before swapping any, so that an error (in the config, or a
    # block that does not fit a layer) leaves the model untouched.
    swaps: List[Tuple[str, nn.Module]] = []
    built: Dict[int, Tuple[str, SparseScheme, nn.Module]] = {}
    for name, module in named:
        scheme, explicit = rules.lookup(name)
        if scheme is None:
            continue
        sparse_class, reason = _sparse_class(module)
        if sparse_class is None:
            if explicit:
                raise NotImplementedError(f"{reason}; config[{name!r}] names a {type(module).__name__}")
            continue
        if not name:
            raise ValueError(
                f"the model itself is an nn.{type(module).__name__} and cannot be replaced in place; "
                f"use {sparse_class.__name__}.from_dense(layer, block, density)"
            )
        if id(module) not in built:
            try:
                layer = (scheme.build(module) if isinstance(scheme, Pow2Scheme)
                         else sparse_class.from_dense(module, scheme.block, scheme.density))
                built[id(module)] = (name, scheme, layer)
            except ValueError as err:
                raise ValueError(f"cannot sparsify {name!r}: {err}") from err
        first_name, first_scheme, sparse = built[id(module)]
        if scheme != first_scheme:
            raise ValueError(
                f"modules {first_name!r} and {name!r} are the same layer but the config gives them "
                f"different schemes ({first_scheme} and {scheme})"
            )
        swaps.append((name, sparse))

    for name, sparse in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, sparse)
    return model
