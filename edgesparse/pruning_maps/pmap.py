"""``PruningMap``: which scheme each layer of a model gets, as a JSON file.

    {"schema_version": 2,
     "target": "<Target fingerprint the latencies were measured on>",
     "layers": {"layers.0": {"block": [32, 16], "density": 0.1},
                "layers.1": {"pow2": {"sparsity": 0.9, "exp_range": [-7, 5], "group": 32,
                                      "chunk_rows": 192, "iterations": 50}},
                "re:layer\\\\d\\\\.\\\\d\\\\.conv[12]": {"block": [8, 36], "density": 0.2},
                "linear": null},
     "default": null,
     "rules": [...],           # rule-based mapping, see mapper.derive_rules
     "info": {...}}            # free-form: method, budget, predicted latency, energy

A layer entry is ``{"block": [bn, bk], "density": d}`` (a :class:`SparseScheme`),
``{"pow2": {...}}`` (the fields of a :class:`~edgesparse.nn.Pow2Scheme`) or null for a
dense layer; the keys of ``NOTE_KEYS`` may sit beside either, as notes. Version 2
added the pow2 entries; version 1 files (block entries only) read as they are. Names
resolve as in :func:`edgesparse.nn.sparsify`: exact names, then ``re:`` patterns in
file order, then ``default``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from ..compiler.files import atomic_write_json
from ..nn.pow2 import Pow2Scheme
from ..nn.sparsify import SparseScheme

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
_POW2_FIELDS = tuple(f.name for f in fields(Pow2Scheme))
NOTE_KEYS = ("kind", "predicted_ms", "retained_energy")  # informative, not part of the scheme
_TOP_KEYS = {"schema_version", "target", "layers", "default", "rules", "info"}


class PruningMapError(ValueError):
    """A pruning map that cannot be used; the message names the field at fault."""


def _pow2_scheme(value, where: str) -> Pow2Scheme:
    if not isinstance(value, Mapping):
        raise PruningMapError(f"{where} must be an object with keys {list(_POW2_FIELDS)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_POW2_FIELDS))
    if unknown:
        raise PruningMapError(f"{where} has unknown keys {unknown}; allowed: {', '.join(_POW2_FIELDS)}")
    args = {k: tuple(v) if k == "exp_range" and isinstance(v, list) else v for k, v in value.items()}
    try:
        return Pow2Scheme(**args)
    except (TypeError, ValueError) as err:
        raise PruningMapError(f"{where}: {err}") from err


def _scheme(value, where: str) -> Union[SparseScheme, Pow2Scheme, None]:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise PruningMapError(f"{where} must be null (dense), an object with 'block' and 'density', or an object "
                              f"with 'pow2', got {type(value).__name__}")
    if "pow2" in value:
        unknown = sorted(set(value) - {"pow2", *NOTE_KEYS})
        if unknown:
            raise PruningMapError(f"{where} has unknown keys {unknown} beside 'pow2'; allowed: {', '.join(NOTE_KEYS)}")
        return _pow2_scheme(value["pow2"], f"{where}.pow2")
    unknown = sorted(set(value) - {"block", "density", *NOTE_KEYS})
    if unknown:
        raise PruningMapError(f"{where} has unknown keys {unknown}; allowed: block, density, {', '.join(NOTE_KEYS)}")
    missing = [k for k in ("block", "density") if k not in value]
    if missing:
        raise PruningMapError(f"{where} is missing {missing}")
    block = value["block"]
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        raise PruningMapError(f"{where}.block must be [rows, cols], got {block!r}")
    try:
        return SparseScheme(tuple(block), value["density"])
    except (TypeError, ValueError) as err:
        raise PruningMapError(f"{where}: {err}") from err


@dataclass
class PruningMap:
    """Per-layer schemes (None: dense), a default, the rules they came from, and notes."""

    target: str
    layers: Dict[str, Union[SparseScheme, Pow2Scheme, None]] = field(default_factory=dict)
    default: Union[SparseScheme, Pow2Scheme, None] = None
    rules: List[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    notes: Dict[str, dict] = field(default_factory=dict)  # per-layer NOTE_KEYS values

    def __post_init__(self):
        if not isinstance(self.target, str) or not self.target:
            raise PruningMapError(f"target must be a non-empty fingerprint string, got {self.target!r}")
        for key, scheme in self.layers.items():
            if not isinstance(key, str) or not key:
                raise PruningMapError(f"layer keys must be module names or 're:<pattern>', got {key!r}")
            if key == "default":
                raise PruningMapError("'default' goes in the map's 'default' field, not among 'layers'")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as err:
                    raise PruningMapError(f"layers[{key!r}] is not a valid regular expression: {err}") from err
            if scheme is not None and not isinstance(scheme, (SparseScheme, Pow2Scheme)):
                raise PruningMapError(f"layers[{key!r}] must be a SparseScheme, a Pow2Scheme or None, "
                                      f"got {type(scheme).__name__}")
        if self.default is not None and not isinstance(self.default, (SparseScheme, Pow2Scheme)):
            raise PruningMapError(f"default must be a SparseScheme, a Pow2Scheme or None, "
                                  f"got {type(self.default).__name__}")
        if not isinstance(self.rules, list) or not all(isinstance(r, dict) for r in self.rules):
            raise PruningMapError("rules must be a list of objects")

    def to_config(self) -> Dict[str, Union[SparseScheme, Pow2Scheme, None]]:
        """The :func:`~edgesparse.nn.sparsify` config this map stands for."""
        return {**self.layers, "default": self.default}

    def to_json(self) -> dict:
        def entry(name, scheme):
            if scheme is None:
                return None
            if isinstance(scheme, Pow2Scheme):
                return {"pow2": {**asdict(scheme), "exp_range": list(scheme.exp_range)}, **self.notes.get(name, {})}
            return {"block": list(scheme.block), "density": scheme.density, **self.notes.get(name, {})}

        return {
            "schema_version": SCHEMA_VERSION, "target": self.target,
            "layers": {name: entry(name, s) for name, s in self.layers.items()},
            "default": entry("default", self.default), "rules": self.rules, "info": self.info,
        }

    def save(self, path: os.PathLike) -> Path:
        """Write the map as JSON (temp file, then rename)."""
        path = Path(path)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, payload, where: str = "pruning map") -> "PruningMap":
        if not isinstance(payload, dict):
            raise PruningMapError(f"{where} must be a JSON object, got {type(payload).__name__}")
        if "schema_version" not in payload:
            raise PruningMapError(f"{where} has no 'schema_version': not an edgesparse pruning map")
        version = payload["schema_version"]
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise PruningMapError(f"{where} has schema_version {version!r}; this edgesparse reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))} (write the map again with this version)")
        unknown = sorted(set(payload) - _TOP_KEYS)
        if unknown:
            raise PruningMapError(f"{where} has unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
        for name in ("target", "layers"):
            if name not in payload:
                raise PruningMapError(f"{where} is missing {name!r}")
        if not isinstance(payload["layers"], dict):
            raise PruningMapError(f"{where}: 'layers' must be an object of module name -> scheme")
        layers, notes = {}, {}
        for key, value in payload["layers"].items():
            layers[key] = _scheme(value, f"layers[{key!r}]")
            if isinstance(value, dict) and set(value) & set(NOTE_KEYS):
                notes[key] = {k: value[k] for k in NOTE_KEYS if k in value}
        default = _scheme(payload.get("default"), "default")
        info = payload.get("info", {})
        if not isinstance(info, dict):
            raise PruningMapError(f"{where}: 'info' must be an object")
        return cls(payload["target"], layers, default, payload.get("rules", []), info, notes)

    @classmethod
    def load(cls, path: os.PathLike, expect_target: Optional[str] = None) -> "PruningMap":
        """Read and validate a map; warn when it was measured on another target."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PruningMapError(f"{path} is not valid JSON: {err}") from err
        pmap = cls.from_json(payload, str(path))
        if expect_target is not None and pmap.target != expect_target:
            warnings.warn(f"{path} was made for target {pmap.target!r}, this is {expect_target!r}: "
                          "its latencies (and so its choices) may not hold here", stacklevel=2)
        return pmap

    def validate(self, model) -> None:
        """Raise PruningMapError if an exact layer name is not a module of ``model`` (a
        block that does not fit its layer is reported by ``sparsify``)."""
        modules = dict(model.named_modules())
        missing = sorted(k for k in self.layers if not k.startswith("re:") and k not in modules)
        if missing:
            raise PruningMapError(f"the map names modules that are not in the model: {missing}")
