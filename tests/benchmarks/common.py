"""Shared pieces of the benchmark scripts: synthetic CT series and process helpers.

The benchmarks are scripts, not tests: they print figures and ratios measured
against a reference (DCMTK) in the same run. Run them from the repository root
after ``./tests/run.sh`` has installed everything, e.g.
``.venv/bin/python tests/benchmarks/intake_throughput.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

from pipelines.dicom_out.uids import derive_uid

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "tests" / "data" / "abdomen-noncontrast-112"
DCMTK = Path("/usr/bin")
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def uid(*parts: object) -> str:
    """A reproducible UID for benchmark data (the node's own derivation)."""
    return derive_uid("benchmark", *(str(p) for p in parts))


def make_series(folder: Path, count: int, size: int = 512, tag: str = "bench", spacing: float = 1.0) -> list[Path]:
    """Write ``count`` CT slices of ``size`` x ``size`` int16 (a body-like phantom) as one series.

    Headers come from the first slice of the shipped abdomen series; UIDs are
    derived from ``tag`` so that a rerun reuses the files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.dcm" for i in range(count)]
    if all(p.exists() for p in paths):
        return paths
    template = pydicom.dcmread(sorted(TEMPLATE.glob("*.dcm"))[0])
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot((yy - size / 2) / (size * 0.35), (xx - size / 2) / (size * 0.45))
    rng = np.random.default_rng(0)
    study, series = uid(tag, "study"), uid(tag, "series")
    for i, path in enumerate(paths):
        body = np.where(r < 1.0, 1040 + 40 * np.sin(i / 7.0), 24).astype(np.int16)
        pixels = (body + rng.normal(0, 12, body.shape)).astype(np.int16)
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(tag, "sop", i)
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180.0, -180.0, -i * spacing]
        ds.SliceLocation = -i * spacing
        ds.InstanceNumber = i + 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process this script started, by PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def start_node(data_dir: Path, port: int, *args: str, config: Path | None = None,
               log: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "node", "serve", "--data-dir", str(data_dir), "--port", str(port), *args]
    if config is not None:
        cmd[4:4] = ["--config", str(config)]
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port)
    return proc


def storescu(port: int, files: list[Path], called: str, extra: tuple[str, ...] = ()) -> float:
    """Send ``files`` over one association with DCMTK storescu; returns wall seconds."""
    cmd = [str(DCMTK / "storescu"), "-aet", "BENCH", "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return elapsed


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]
