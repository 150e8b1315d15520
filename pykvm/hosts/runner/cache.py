"""The runners' cache: where it is, how files land in it, and how old versions leave it.

Why this exists: each host does its slow work (a kernel download, an initramfs,
a Bochs build, a disk image) once and keeps the result in
``$XDG_CACHE_HOME/pykvm/<host>``, under a name that holds the key of what it
was built from. A file appears there complete or not at all (written beside
and renamed), and when a key changes the files of older keys are removed, so
the cache does not grow with every change of layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def cache_root(host: str) -> Path:
    """``$XDG_CACHE_HOME/pykvm/<host>``, else ``~/.cache/pykvm/<host>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pykvm" / host


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that it exists complete or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def stale(candidates: Iterable[Path], keep: Iterable[Path]) -> list[Path]:
    """The ``candidates`` that are not in ``keep``: older keys of a cached file."""
    kept = {Path(path) for path in keep}
    return sorted(path for path in candidates if Path(path) not in kept)


def prune(directory: Path, pattern: str, keep: Iterable[Path]) -> list[Path]:
    """Remove the files matching ``pattern`` in ``directory`` except ``keep``; return them."""
    removed = stale(directory.glob(pattern), keep)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
