"""Atomic file writing: a file either exists complete or not at all.

Every output of histodistill (coords, features, JSON, checkpoints we write ourselves, figures)
goes through `atomic_path`, so a run killed half-way never leaves a half file that a later run
would take as finished work. `unwritable_reason` checks an output path before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    Its name keeps the real suffix (``.h5``, ``.png``) because some writers pick a format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Names no finished output has: hidden files (our own `atomic_path` temporaries ``.<stem>.<random>.tmp<suffix>``,
# macOS ``._<name>`` resource forks), editor backups, and other tools' partial or lock files.
_TEMPORARY_ENDINGS = ("~", ".tmp", ".part", ".partial", ".lock", ".crdownload")


def unwritable_reason(value: str | os.PathLike, kind: str) -> str | None:
    """Why no ``kind`` ("folder" or "file") can be written at ``value``, or None when one can. Refused:
    an empty path (it would silently mean the current folder), a path under a file (the first ``mkdir``
    would fail with a traceback), a path that exists as the other kind, and a place that is not writable
    (a read-only mount or a folder without write permission: every later write would fail)."""
    if not str(value).strip():
        return f"an empty path was given: pass a {kind} to write into"
    path = Path(value)
    above = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if above is not None:
        return f"{value} lies under {above}, which is a file: pass a {kind} whose parents are folders"
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{value} is a file, not a folder: pass a folder to write into"
    if kind == "file" and path.is_dir():
        return f"{value} is a folder: pass a file name to write, e.g. {path / 'report.html'}"
    # The place where the first file or folder would be made: the folder itself for an existing output
    # folder, else the nearest existing parent (missing parents are made there).
    place = path if kind == "folder" and path.is_dir() else next(
        (parent for parent in (path.parent, *path.parent.parents) if parent.exists()), Path("."))
    if not os.access(place, os.W_OK | os.X_OK):  # EROFS and permissions alike, also for root on a read-only mount
        return (f"{value}: {place.resolve()} is not writable (read-only or no permission): pass a {kind} "
                "on a writable disk")
    return None


def is_hidden_or_temporary(path: str | os.PathLike) -> bool:
    """True for a file that a killed run or another program left behind, never a finished output."""
    name = Path(path).name
    return name.startswith((".", "~$")) or name.lower().endswith(_TEMPORARY_ENDINGS) or ".tmp." in name.lower()


def visible_files(directory: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Sorted regular files directly in ``directory`` whose suffix (case-insensitive) is one of
    ``suffixes`` (any when None), leaving out hidden and temporary files (`is_hidden_or_temporary`).
    A missing directory has no files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not is_hidden_or_temporary(p) and (wanted is None or p.suffix.lower() in wanted)
    )


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_json_if_absent(path: str | os.PathLike, obj: Any) -> bool:
    """Write ``obj`` as JSON only where ``path`` does not exist; True when this call created it.

    Atomic and exclusive at once: a complete temporary file is hard-linked onto ``path``, which fails
    when another process got there first, so of many processes writing the same record exactly one
    writes it and none can read it half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.link(tmp_name, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_name)
    return True


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large slides do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
