"""Atomic file writing: a file either exists complete or not at all.

Every output of histodistill (coords, features, JSON, checkpoints we write ourselves, figures)
goes through `atomic_path`, so a run killed half-way never leaves a half file that a later run
would take as finished work. `unwritable_reason` checks an output path before any work starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from histodistill.errors import UserError

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(UserError):
    """No space (or quota) left to write ``path``; `reporting_full_disk` turns it into the user's one line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(f"no space left on the disk to write {self.path}")

    def __reduce__(self):  # rebuilt from the path when it comes back from a worker process
        return DiskFullError, (str(self.path),)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for want of space: ENOSPC/EDQUOT, or the same said in the
    text of a library's error (HDF5 and torch.save report it as RuntimeError ``file write failed``)."""
    if isinstance(error, DiskFullError) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return isinstance(error, (OSError, RuntimeError)) and (
        "No space left on device" in text or "Disk quota exceeded" in text or "file write failed" in text
    )


@contextlib.contextmanager
def _quiet_hdf5_cleanup() -> Iterator[None]:
    """Silence what HDF5 objects print when freed after a failed write: h5py prints each one's traceback and
    then reports it as "Exception ignored" (sys.unraisablehook). On a full disk every object of the file cut
    short does so, a screen of paragraphs repeating the one error the user gets (`DiskFullError`). Only h5py
    calls run inside; the error itself still propagates."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.unraisablehook = hook


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    Its name keeps the real suffix (``.h5``, ``.png``) because some writers pick a format by it.
    A write that fails for want of space (`is_disk_full`) is raised as `DiskFullError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as error:
        if is_disk_full(error):
            raise DiskFullError(path) from None
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    full = False
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error) or isinstance(error, DiskFullError):
            raise
        full = True  # raised below, outside this handler: the error's context would only repeat it
    finally:
        if tmp.exists():
            tmp.unlink()
    if full:
        raise DiskFullError(path)


# Names no finished output has: hidden files (our own `atomic_path` temporaries
# ``.<stem>.<random>.tmp<suffix>``, macOS ``._<name>`` resource forks), editor backups, and other tools'
# partial or lock files.
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
    place = (
        path
        if kind == "folder" and path.is_dir()
        else next((parent for parent in (path.parent, *path.parent.parents) if parent.exists()), Path("."))
    )
    if not os.access(
        place, os.W_OK | os.X_OK
    ):  # EROFS and permissions alike, also for root on a read-only mount
        return (
            f"{value}: {place.resolve()} is not writable (read-only or no permission): pass a {kind} "
            "on a writable disk"
        )
    return None


def _size(path: Path) -> int:
    """Bytes of the files under ``path`` (a file's own size); 0 when it does not exist."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # unreachable: GB is the last unit


RESUMES = "run the same command again: it resumes, keeping every finished file"


def full_disk_message(path: Path, out: Path, needed: int | None, rerun: str = RESUMES) -> str:
    """One line: the file that could not be written, the free space, the run's estimated need, and the
    rerun."""
    place = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(place).free
    need = (
        f"this run needs about {_human(needed)} in {out} ({_human(_size(out))} written so far)"
        if needed
        else f"{_human(_size(out))} were written to {out} so far"
    )
    return (
        f"no space left on the disk to write {path} ({_human(free)} free): {need}; free space there or pass "
        f"another output folder, then {rerun}"
    )


@contextlib.contextmanager
def reporting_full_disk(
    out: str | os.PathLike, needed: Callable[[], int | None] = lambda: None, rerun: str = RESUMES
) -> Iterator[None]:
    """Turn a write that fails for want of space anywhere in the block into a `UserError`
    (`full_disk_message`): the file, the space ``needed()`` by the run in ``out`` (bytes, an estimate; None
    when unknown), and how a rerun resumes (``rerun``). Every command that writes runs inside one
    (`histodistill.cli`), estimating commands in their own."""
    try:
        yield
    except (OSError, RuntimeError, DiskFullError) as error:
        if not is_disk_full(error):
            raise
        path = (
            error.path if isinstance(error, DiskFullError) else Path(getattr(error, "filename", None) or out)
        )
        raise UserError(full_disk_message(path, Path(out), needed(), rerun)) from None


@contextlib.contextmanager
def atomic_hdf5(path: str | os.PathLike) -> Iterator[Any]:
    """A new HDF5 file (an open ``h5py.File``, closed at the end) written under `atomic_path`, with what HDF5
    prints about its objects after a failed write silenced (`_quiet_hdf5_cleanup`): a full disk is then one
    `DiskFullError`, not a screen of "Can't decrement id ref count" paragraphs."""
    import h5py

    with atomic_path(path) as tmp, _quiet_hdf5_cleanup():
        handle = h5py.File(tmp, "w")
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                handle.close()  # the block's own error is the one to raise
            raise
        handle.close()  # the final flush: where a full disk often shows; it raises like any write


def is_hidden_or_temporary(path: str | os.PathLike) -> bool:
    """True for a file that a killed run or another program left behind, never a finished output."""
    name = Path(path).name
    return (
        name.startswith((".", "~$")) or name.lower().endswith(_TEMPORARY_ENDINGS) or ".tmp." in name.lower()
    )


def visible_files(directory: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Sorted regular files directly in ``directory`` whose suffix (case-insensitive) is one of
    ``suffixes`` (any when None), leaving out hidden and temporary files (`is_hidden_or_temporary`).
    A missing directory has no files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    return sorted(
        p
        for p in directory.iterdir()
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
