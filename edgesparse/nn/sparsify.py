"""``sparsify(model, config)``: swap a model's layers for block-sparse ones, by name.

The config follows torchao's FqnToConfig: a module's qualified name is looked up as an
exact key first, then against the ``"re:<pattern>"`` keys (``re.fullmatch``, the first
match in the config's insertion order), then under ``"default"``. The value is a
:class:`SparseScheme` (or a dict with the same fields), or None to keep the layer dense —
the way to exclude, say, the first layer or the classifier from a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

from ..formats import _check_block, _check_density
from .modules import SparseLinear

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
        if value is None or isinstance(value, cls):
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


SchemeLike = Union[SparseScheme, Mapping, None]


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


def sparsify(model: nn.Module, config: Mapping[str, SchemeLike]) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` of ``model`` that ``config`` gives a scheme with
    ``SparseLinear.from_dense(linear, scheme.block, scheme.density)``; returns ``model``.

    ``re:`` patterns and the default apply to the module types sparsify supports and pass
    over the others (containers, norms, ...); a module named exactly must be supported.
    A module reachable under several names is replaced by one SparseLinear everywhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rules = _Rules(config)
    # remove_duplicate=False: a shared layer is swapped under every name it has.
    named = list(model.named_modules(remove_duplicate=False))
    unknown = sorted(set(rules.exact) - {name for name, _ in named})
    if unknown:
        raise ValueError(f"config names modules that are not in the model: {unknown}")

    # Build every replacement before swapping any, so that an error (in the config, or a
    # block that does not fit a layer) leaves the model untouched.
    swaps: List[Tuple[str, SparseLinear]] = []
    built: Dict[int, Tuple[str, SparseScheme, SparseLinear]] = {}
    for name, module in named:
        scheme, explicit = rules.lookup(name)
        if scheme is None:
            continue
        if not isinstance(module, nn.Linear):
            if explicit:
                raise NotImplementedError(
                    f"sparsify supports nn.Linear; config[{name!r}] names a {type(module).__name__}"
                    + (" (conv support comes with SparseConv2d)" if isinstance(module, nn.modules.conv._ConvNd) else "")
                )
            continue
        if not name:
            raise ValueError(
                "the model itself is an nn.Linear and cannot be replaced in place; "
                "use SparseLinear.from_dense(linear, block, density)"
            )
        if id(module) not in built:
            try:
                built[id(module)] = (name, scheme, SparseLinear.from_dense(module, scheme.block, scheme.density))
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
