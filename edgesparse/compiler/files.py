"""Where edgesparse keeps what it learns about a machine, and how it writes it safely.

One per-user directory holds the tuning database and the compiled-kernel cache:
``$EDGESPARSE_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/edgesparse``, else
``~/.cache/edgesparse``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

CACHE_DIR_ENV = "EDGESPARSE_CACHE_DIR"


def cache_dir() -> Path:
    """The per-user cache directory. Not created here: whoever writes into it does
    (``atomic_write_bytes``, ``locked``), so the kernels' per-call look-up of the tuning
    database costs no system call beyond one stat."""
    return _cache_dir(os.environ.get(CACHE_DIR_ENV), os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _cache_dir(root, xdg_cache_home, home) -> Path:
    # Keyed by the variables it reads, so a changed environment gives a new directory.
    if root:
        return Path(root).expanduser()
    return Path(xdg_cache_home or Path.home() / ".cache") / "edgesparse"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` + '.lock' (fcntl.flock, released when the
    process dies, so a crashed writer never leaves the lock behind)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: object) -> None:
    # Key order is kept: a pruning map's "re:" entries apply in file order.
    atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
