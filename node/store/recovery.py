"""Start-up recovery of the spool: files a power cut left without a state record."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from node.store.header import read_header
from node.store.spool import Spool
from node.store.state import StateStore

LOG = logging.getLogger(__name__)


def adopt_unrecorded(spool: Spool, state: StateStore, quarantine: Path | None = None) -> int:
    """Record spooled files that have no row; move aside those that are incomplete.

    A file without a row is either one whose row a power cut took away after
    its fsyncs (complete; its sender may hold a success status: it must not
    be forgotten), or one that was renamed into place but not yet flushed
    when the power went (never acknowledged; possibly incomplete). Each is
    read in full and its pixel data decoded: complete ones are recorded,
    others go to ``quarantine`` (never deleted) with a log line. Returns how
    many were recorded.
    """
    import pydicom

    known = state.known_paths()
    adopted = 0
    for path in spool.files():
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path)
            header = read_header(ds)
            ds.pixel_array  # noqa: B018 - decoding everything is the completeness check
        except Exception as exc:  # whatever the reader or decoder raises, the file is not complete
            if quarantine is None:
                LOG.error("spooled file %s is incomplete or unreadable (%s); left in place", path, exc)
                continue
            target = quarantine / path.relative_to(spool.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            LOG.error("spooled file %s is incomplete or unreadable (%s); moved to %s", path, exc, target)
            continue
        state.record_instance(header, path=str(path), size=path.stat().st_size, calling_ae="(recovered)")
        adopted += 1
    return adopted


__all__ = ["adopt_unrecorded"]
