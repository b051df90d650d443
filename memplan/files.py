"""Output files: refused before any work when they cannot be written, then written atomically.

Every command that writes a file (`sweep --out`, `report --out`, `profile --out`,
`calibrate --terms`) checks the path with `check_writable` before it runs anything, and
writes whole files through `atomic_write` (a temporary file beside the target,
fsync, rename), so a full disk or a crash leaves the previous file as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from memplan.errors import MemplanError
from memplan.paths import is_checkout, package_dir

__all__ = ["check_writable", "atomic_write", "atomic_write_bytes", "new_file_mode"]


def _is_inside_package(path: Path) -> bool:
    try:
        path.resolve().relative_to(package_dir())
    except ValueError:
        return False
    return True


def check_writable(path: str | Path, *, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a missing
    or read-only folder, a path inside the installed package. Creates and removes a probe
    file beside it (what a later write needs); an existing file is left untouched."""
    import tempfile

    p = Path(path).expanduser()
    if p.is_dir():
        raise MemplanError(f"{flag} {path} is a folder; give a file name")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise MemplanError(f"{flag} {path}: folder {parent} does not exist")
    if _is_inside_package(p) and not is_checkout():
        raise MemplanError(f"{flag} {path} is inside the installed memplan package; write somewhere else")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
        if p.exists():
            with open(p, "ab"):
                pass
    except OSError as exc:
        raise MemplanError(f"{flag} {path} cannot be written ({exc.strerror or exc}); pick another path") from None
    return p


def new_file_mode(path: Path) -> int:
    """The permissions a plain `open(path, "w")` would give: the existing file's, else
    0o666 minus the umask (mkstemp's 0o600 would hide a shared report from its readers)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path` (same extension, so writers that
    pick a format by suffix still do), then rename it over `path`: readers see the old file
    or the new one, never half of one, and a failed write leaves the old file as it was."""
    import tempfile

    p = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=p.resolve().parent, prefix=f".{p.stem}.", suffix=p.suffix or ".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, new_file_mode(p))
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write` of `data`, fsynced before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)
