"""Durable files: temp file, fsync, atomic rename, fsync of the folder.

The spool keeps received instances byte for byte (PS3.10 files) under
``spool/<study>/<series>/<sop>.dcm``; result objects go to ``results/`` the
same way. UIDs become path components only after they are checked to be UIDs.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from pipelines.errors import PacsAiError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolError(PacsAiError):
    """A file could not be stored durably (disk full, permissions, bad UID)."""


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a string if it is a syntactically valid UID (PS3.5 9.1)."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID_RE.match(text):
        raise SpoolError(f"{name} {text[:80]!r} is not a valid UID")
    return text


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, chunks: list[bytes] | bytes) -> int:
    """Write ``chunks`` to ``path`` so that it is complete on disk or absent.

    Returns the number of bytes written. A crash at any moment leaves either
    the old file, the new file, or a ``.part`` file that :func:`remove_partials`
    cleans up; never a truncated ``path``.
    """
    if isinstance(chunks, bytes):
        chunks = [chunks]
    make_dirs_durably(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.part"
    size = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpoolError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return size


def remove_partials(root: Path) -> int:
    """Delete ``.part`` files left by a crash; returns how many were removed."""
    count = 0
    if root.is_dir():
        for part in root.rglob(".*.part"):
            part.unlink(missing_ok=True)
            count += 1
    return count


def make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` (and missing parents) and fsync each parent of a created folder."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:  # another thread made it: it also fsyncs its parent
            continue
        fsync_dir(created.parent)


class Spool:
    """Where received instances are kept until their series is processed."""

    #: Instances being received live here until they are complete and checked.
    INCOMING = ".incoming"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming_dir = root / self.INCOMING
        self.incoming_dir.mkdir(exist_ok=True)

    def place(self, tmp: Path, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Rename a complete temporary file into place; returns its path.

        New folders are made durably; the caller fsyncs the file and then the
        folder before it reports the instance as stored.
        """
        path = self.instance_path(study_uid, series_uid, sop_instance_uid)
        make_dirs_durably(path.parent)
        os.replace(tmp, path)
        return path

    def files(self) -> list[Path]:
        """Every spooled instance file (not those being received)."""
        return [p for p in self.root.glob("*/*/*.dcm") if not p.name.startswith(".")]

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return (
            self.root
            / check_uid(study_uid, "Study Instance UID")
            / check_uid(series_uid, "Series Instance UID")
            / f"{check_uid(sop_instance_uid, 'SOP Instance UID')}.dcm"
        )
