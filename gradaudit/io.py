"""Private, atomic file output: reports and snapshots hold training text."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

# What to do when a write fails, by errno (the rest: check the disk and the directory).
_FULL = "free space on that disk, or set output_dir to a disk with room"
_DENIED = "choose an output_dir you can write to"
_FIXES = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: _FULL,
    errno.EACCES: _DENIED,
    errno.EPERM: _DENIED,
    errno.EROFS: _DENIED,
}


def private_dir(path: str | os.PathLike[str], *, tighten: bool = False) -> Path:
    """Create `path` and each missing parent with mode 0700; return it.

    With `tighten`, an existing `path` that group or others may read is made 0700 too (for
    the folders gradaudit owns: an output directory and its snapshots).
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    if tighten and path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def describe_os_error(error: OSError, path: str | os.PathLike[str]) -> str:
    """`error` met writing to `path`, in one line naming the path and the fix."""
    what = error.strerror or str(error)
    fix = _FIXES.get(error.errno, "check that disk and that directory")
    return f"{what} (errno {error.errno}) writing to {path}: {fix}"


def _write_file(path: Path, fd: int, data: bytes) -> None:
    """Write `data` to the open file `fd` (the temp file of `path`) and flush it to disk."""
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to a temp file beside `path` (mode 0600), then rename it into place."""
    path = Path(path)
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        _write_file(path, fd, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )
