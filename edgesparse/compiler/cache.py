"""The on-disk cache of compiled TVM kernels: ``<cache dir>/kernels/<key>.so``.

Building a kernel takes about a second on the 2-core dev machine (TVMScript parsing and
LLVM), loading a cached one a millisecond, and a training run or a map search builds
dozens. The key hashes the kernel builder's name and parameters (block shape, knobs,
flags), the target, the edgesparse and TVM versions and the source of the TVM kernel
package, so that editing a kernel can never load a stale build.

Each entry is ``<key>.so`` beside ``<key>.json`` (the key's fields and the .so's
SHA-256). A builder holds ``<key>.so.lock`` and looks again before building, so two
processes asking for the same kernel build it once; both files are written to temp
names and renamed. An entry whose .so is missing, truncated or altered (checksum) or
fails to load is rebuilt, with a warning; it never stops the run.

``EDGESPARSE_BUILD_CACHE=0`` turns the cache off (kernels are built in memory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Hashable, Optional

from .files import atomic_write_json, cache_dir, locked

BUILD_CACHE_ENV = "EDGESPARSE_BUILD_CACHE"


def enabled() -> bool:
    return os.environ.get(BUILD_CACHE_ENV, "1") not in ("0", "off", "false", "no")


@functools.lru_cache(maxsize=None)
def kernel_source_hash() -> str:
    """SHA-256 over the TVM kernel package's source files (builders and what they import)."""
    root = Path(__file__).resolve().parent.parent / "kernels" / "tvm"
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def entry_key(builder: str, params: Hashable, target_json: str) -> dict:
    from .target import versions

    return {"builder": builder, "params": repr(params), "target": target_json, "versions": versions(),
            "source": kernel_source_hash()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(so: Path, meta: Path, key: dict):
    """The cached kernel, or None when there is no usable entry (a bad one is removed)."""
    import tvm

    if not so.exists() or not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("key") != key or info.get("sha256") != _digest(so):
            raise ValueError("its checksum or key does not match")
        return tvm.runtime.load_module(str(so))["main"]
    except Exception as err:  # any failure of a cache entry means: build it again
        warnings.warn(f"compiled-kernel cache entry {so} is unusable ({err}); rebuilding it", stacklevel=3)
        for path in (so, meta):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return None


def load_or_build(builder: str, params: Hashable, target_json: str, build: Callable[[], object],
                  directory: Optional[Path] = None):
    """The ``main`` function of the kernel ``build()`` makes (a TVM executable), from
    the cache when it holds a sound copy, else built, stored and loaded."""
    if not enabled():
        return build()["main"]
    key = entry_key(builder, params, target_json)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    directory = Path(directory) if directory is not None else cache_dir() / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    so, meta = directory / f"{name}.so", directory / f"{name}.json"
    kernel = _load(so, meta, key)
    if kernel is not None:
        return kernel
    with locked(so):
        kernel = _load(so, meta, key)  # another process may have built it while we waited
        if kernel is not None:
            return kernel
        executable = build()
        tmp = directory / f"{name}.{os.getpid()}.tmp.so"
        try:
            executable.export_library(str(tmp))
            os.replace(tmp, so)
        finally:
            if tmp.exists():
                tmp.unlink()
        atomic_write_json(meta, {"key": key, "sha256": _digest(so)})
    import tvm

    return tvm.runtime.load_module(str(so))["main"]
