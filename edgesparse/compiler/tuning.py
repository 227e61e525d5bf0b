"""The tuning database: the schedule the tuner measured fastest for each kernel, layer
shape and target, kept as JSON in the cache directory (``files.cache_dir()``), or at
``$EDGESPARSE_TUNING_DB``.

Format::

    {"schema_version": 1,
     "records": {"<key>": {"op": "forward", "block": [32, 32], "dtype": "float32",
                           "shape": {"batch": 256, "n": 2048, "k": 2048, "density": 0.1},
                           "target": "<Target fingerprint>", "versions": {...},
                           "schedule": {"rows": 4, "cols": 16, "unroll": 4, "parallel": "blocks"},
                           "time_s": ..., "heuristic_time_s": ..., "measured_at": "<UTC ISO>", ...}}}

A record applies only to its own target fingerprint and package/TVM versions (both are
in the key): a schedule tuned with another TVM may not even compile the same.

Writers hold ``<db>.lock`` (flock), re-read the file, merge their records into it (the
later measurement of a key wins) and replace it atomically, so two tuners running at
once both keep their results. A file of an unknown schema version is refused, never
overwritten (it may be a newer edgesparse's). A file that does not parse is, for a
writer, moved aside to ``<db>.corrupt-<time>`` and rebuilt, since it only holds
measurements that can be redone; for the kernels' lookup it is ignored with one
warning, and the heuristic schedules are used.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from ..kernels.tvm.schedule import Schedule
from .files import atomic_write_json, cache_dir, locked

SCHEMA_VERSION = 1
DB_ENV = "EDGESPARSE_TUNING_DB"
OPS = ("forward", "grad_input", "grad_weight")

# Densities are bucketed so that a pattern re-pruned to a slightly different density
# during training still finds its record; kernel time is near linear in the nonzeros,
# and the knobs that win change slowly with them.
DENSITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
_MAX_BATCH_BUCKET = 4096


class TuningDatabaseError(ValueError):
    """The tuning database file cannot be used (unknown schema version, corrupt, invalid)."""


class SchemaVersionError(TuningDatabaseError):
    """The file is of a schema version this edgesparse does not read."""


@dataclass(frozen=True)
class ShapeClass:
    """The layer shapes one tuned record serves: the batch rounded up to a power of two,
    the weight's exact N x K, and its density's bucket."""

    batch: int
    n: int
    k: int
    density: float

    @classmethod
    def of(cls, m: int, n: int, k: int, density: float) -> "ShapeClass":
        for name, value in (("m", m), ("n", n), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        batch = min(1 << (m - 1).bit_length(), _MAX_BATCH_BUCKET)
        bucket = min(DENSITY_BUCKETS, key=lambda d: abs(math.log(d / density)))
        return cls(batch, n, k, bucket)


def record_key(op: str, block: Tuple[int, int], dtype: str, shape: ShapeClass, target: str, versions: Mapping) -> str:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    ver = ",".join(f"{name}={versions[name]}" for name in sorted(versions))
    return (f"{op}|{block[0]}x{block[1]}|{dtype}|b{shape.batch}-n{shape.n}-k{shape.k}-d{shape.density:g}"
            f"|{target}|{ver}")


def default_path() -> Path:
    return _database_path(os.environ.get(DB_ENV), cache_dir())


@functools.lru_cache(maxsize=8)
def _database_path(env: Optional[str], directory: Path) -> Path:
    return Path(env).expanduser() if env else directory / "tuning.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _schedule_from(record: Mapping, key: str) -> Schedule:
    try:
        return Schedule(**record["schedule"])
    except (KeyError, TypeError, ValueError) as err:
        raise TuningDatabaseError(f"record {key!r} has no valid 'schedule' ({err})") from err


def parse(text: str, where: str) -> Dict[str, dict]:
    """The records of a database file's text; TuningDatabaseError says what is wrong."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise TuningDatabaseError(f"{where} is not valid JSON ({err}): the file is corrupt") from err
    if not isinstance(payload, dict) or "schema_version" not in payload:
        raise TuningDatabaseError(f"{where} is not an edgesparse tuning database (no 'schema_version')")
    version = payload["schema_version"]
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has schema_version {version!r}; this edgesparse reads only version {SCHEMA_VERSION}. "
            f"It was written by another edgesparse version: use that version, or point {DB_ENV} elsewhere"
        )
    records = payload.get("records")
    if not isinstance(records, dict):
        raise TuningDatabaseError(f"{where}: 'records' must be an object of key -> record")
    for key, record in records.items():
        if not isinstance(record, dict):
            raise TuningDatabaseError(f"{where}: record {key!r} must be an object")
        _schedule_from(record, key)
    return records


class TuningDatabase:
    """The database file at ``path`` (default: ``default_path()``)."""

    def __init__(self, path: Optional[os.PathLike] = None):
        self.path = Path(path) if path is not None else default_path()

    def load(self) -> Dict[str, dict]:
        """All records; {} when the file does not exist yet. Raises TuningDatabaseError."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        return parse(text, str(self.path))

    def lookup(self, key: str) -> Optional[Schedule]:
        record = self.load().get(key)
        return _schedule_from(record, key) if record is not None else None

    def merge(self, records: Mapping[str, dict]) -> Dict[str, dict]:
        """Add ``records`` (key -> record with 'schedule' and 'measured_at') to the file
        under its lock, keeping whatever other writers stored meanwhile; returns the
        merged records."""
        for key, record in records.items():
            _schedule_from(record, key)
        with locked(self.path):
            try:
                current = self.load()
            except SchemaVersionError:
                raise  # perhaps a newer edgesparse's file: never overwrite it
            except TuningDatabaseError as err:
                aside = self.path.with_name(f"{self.path.name}.corrupt-{datetime.datetime.now():%Y%m%d-%H%M%S}")
                os.replace(self.path, aside)
                warnings.warn(f"{err}; moved it to {aside} and started a new tuning database", stacklevel=2)
                current = {}
            for key, record in records.items():
                old = current.get(key)
                if old is None or str(old.get("measured_at", "")) <= str(record.get("measured_at", "")):
                    current[key] = dict(record)
            atomic_write_json(self.path, {"schema_version": SCHEMA_VERSION, "records": current})
        return current


def make_record(op: str, block: Tuple[int, int], dtype: str, shape: ShapeClass, target: str, versions: Mapping,
                schedule: Schedule, **measurements) -> Tuple[str, dict]:
    """(key, record) for one tuned kernel; ``measurements`` are stored as given."""
    key = record_key(op, block, dtype, shape, target, versions)
    record = {
        "op": op, "block": list(block), "dtype": dtype, "shape": asdict(shape), "target": target,
        "versions": dict(versions), "schedule": asdict(schedule), "measured_at": _now(), **measurements,
    }
    return key, record


# ------------------------------------------------------------ the kernels' lookup
_loaded: Dict[str, object] = {"stamp": None, "records": {}}
_warned: set = set()


def _current_records() -> Dict[str, dict]:
    """The default database's records, re-read when the file changes; {} (with one
    warning per problem) when it cannot be used, so a bad file never stops a run."""
    path = default_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (str(path), st.st_mtime_ns, st.st_size)
    if _loaded["stamp"] != stamp:
        try:
            records = TuningDatabase(path).load()
        except (TuningDatabaseError, OSError) as err:
            if str(err) not in _warned:
                _warned.add(str(err))
                warnings.warn(f"ignoring the tuning database, using heuristic schedules: {err}", stacklevel=3)
            records = {}
        _loaded.update(stamp=stamp, records=records)
    return _loaded["records"]  # type: ignore[return-value]


def tuned_schedule(op: str, block: Tuple[int, int], m: int, n: int, k: int, density: float,
                   dtype: str = "float32") -> Optional[Schedule]:
    """The tuned schedule for this kernel call on this machine, or None (use the heuristic)."""
    records = _current_records()
    if not records or m < 1 or density <= 0:
        return None
    from .target import Target, versions

    key = record_key(op, tuple(block), dtype, ShapeClass.of(m, n, k, min(density, 1.0)), Target.detect().fingerprint,
                     versions())
    record = records.get(key)
    return _schedule_from(record, key) if record is not None else None
