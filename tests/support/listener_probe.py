"""A node started with short listener deadlines, and what a hostile-network test reads off it.

Shared by ``tests/integration/test_listener_fuzz.py`` and ``tests/soak_listener.py``:
the node's thread count and RSS (``/proc/PID/status``), the ``.part`` files left in
its spool, a timed C-ECHO (pynetdicom), the SOP Instance UIDs in its state store,
and small CT datasets encoded for a raw C-STORE.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode

from support.data import DATA
from support.node import NodeProcess
from support.processes import free_port

CT_SMALL = DATA / "single-slices" / "CT_small.dcm"

#: Short deadlines for the tests (keys helper-added for issue 16; dropped when this node does not know them).
LISTENER_KEYS: dict[str, str] = {
    "network_timeout_s": "2.0",
    "artim_timeout_s": "1.0",
}


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def thread_count(pid: int) -> int:
    """The ``Threads:`` of a running process."""
    return _proc_status(pid, "Threads")


def rss_mb(pid: int) -> float:
    """The resident set size (``VmRSS``) of a running process, in MB."""
    return _proc_status(pid, "VmRSS") / 1024


def part_files(data_dir: Path) -> list[Path]:
    """Temporary spool files (``.part``) under the node's data folder."""
    spool = data_dir / "spool"
    return sorted(spool.rglob("*.part")) if spool.exists() else []


def stored_uids(data_dir: Path) -> set[str]:
    """SOP Instance UIDs recorded in the node's state store."""
    path = data_dir / "state.sqlite3"
    if not path.exists():
        return set()
    db = sqlite3.connect(path, timeout=30)
    try:
        return {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()


def echo_seconds(port: int, timeout: float = 10.0) -> float | None:
    """Seconds a C-ECHO round trip (association, echo, release) took; None when it failed."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0
    finally:
        assoc.release()
    return time.monotonic() - started if ok else None


def start_listener_node(workdir: Path, extra: dict[str, str] | None = None, args: list[str] | None = None,
                        base: dict[str, str] | None = None) -> tuple[NodeProcess, dict[str, str]]:
    """Start a node with ``base`` (default :data:`LISTENER_KEYS`) and ``extra`` under ``[node]``;
    returns it and the keys it took.

    A key this node does not know yet makes it refuse the config, naming the key:
    that key is dropped and the node started again (the caller sees which keys held).
    """
    keys = {**(LISTENER_KEYS if base is None else base), **(extra or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(len(keys) + 1):
        config = workdir / "node.toml"
        config.write_text("[node]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
        node = NodeProcess(data_dir=workdir / "node-data", port=free_port(), args=["--config", str(config),
                           *(args or [])], log=workdir / f"node-{attempt}.log")
        try:
            node.start()
            return node, keys
        except RuntimeError as exc:
            refused = [k for k in keys if k in str(exc)]
            if not refused:
                raise
            for key in refused:
                del keys[key]
    raise RuntimeError(f"the node refused every listener key: {workdir}")


def ct_dataset(sop_instance_uid: str | None = None) -> Dataset:
    """The small CT slice with a new SOP Instance UID (file meta dropped: a DIMSE dataset)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    del ds.file_meta
    return ds


def ct_bytes(sop_instance_uid: str | None = None) -> tuple[str, bytes]:
    """(SOP Instance UID, the CT slice encoded in explicit VR little endian)."""
    ds = ct_dataset(sop_instance_uid)
    raw = encode(ds, False, True)
    assert raw is not None
    return str(ds.SOPInstanceUID), raw


def rle_ct_bytes(sop_instance_uid: str | None = None) -> tuple[str, bytes]:
    """(SOP Instance UID, the CT slice RLE-compressed: encapsulated pixel data, explicit VR little endian)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    del ds.file_meta
    raw = encode(ds, False, True)
    assert raw is not None
    return str(ds.SOPInstanceUID), raw
