"""Completion latency: from the sender's release to a processed series.

Sends the shipped abdomen series (112 slices) with DCMTK storescu over one
association to a node running its default configuration (quiet period 10 s,
completion on release on), and polls the node's state database to time, from
the moment storescu returned (the association was released):

- complete: the series left ``receiving`` (queued for processing);
- processed: the series reached ``done`` (inference, SEG and SR written).

The same run is repeated with completion on release turned off, i.e. the
quiet-timer fallback, as the reference. Prints the median of ``--repeats``.

    .venv/bin/python tests/benchmarks/completion_latency.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import pydicom
from common import REPO, free_port, median, start_node, stop, storescu, uid

ABDOMEN = REPO / "tests" / "data" / "abdomen-noncontrast-112"


def fresh_copy(folder: Path, tag: str) -> tuple[str, list[Path]]:
    """The abdomen series with new UIDs (each run is a new series)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = uid(tag, "series")
    out = []
    for i, src in enumerate(sorted(ABDOMEN.glob("*.dcm"))):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(tag, "sop", i)
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return series, out


def wait_state(db_path: Path, series: str, states: set[str], since: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
            row = db.execute("SELECT state FROM series WHERE series_uid = ?", (series,)).fetchone()
            db.close()
        except sqlite3.OperationalError:
            row = None
        if row and row[0] in states:
            return time.monotonic() - since
        time.sleep(0.01)
    raise TimeoutError(f"series not in {states} after {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pacs-ai-node-latency")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    rows = []
    for on_release in (True, False):
        data_dir = args.work / f"data-{on_release}"
        config = args.work / f"node-{on_release}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"[series]\ncomplete_on_release = {'true' if on_release else 'false'}\n")
        port = free_port()
        node = start_node(data_dir, port, config=config, log=args.work / f"node-{on_release}.log")
        complete, processed = [], []
        try:
            for k in range(args.repeats):
                series, files = fresh_copy(args.work / f"series-{on_release}-{k}", f"latency-{on_release}-{k}")
                storescu(port, files, "AINODE")
                released = time.monotonic()
                db = data_dir / "state.sqlite3"
                complete.append(wait_state(db, series, {"queued", "processing", "done", "rejected", "failed"},
                                           released, 120))
                processed.append(wait_state(db, series, {"done"}, released, 120))
        finally:
            stop(node)
        rows.append((on_release, complete, processed))
    print("112-slice series, storescu -> node (default quiet period 10 s); seconds after the release")
    print(f"{'completion rule':<34} {'complete (median)':>18} {'processed (median)':>19}  runs (processed)")
    for on_release, complete, processed in rows:
        name = "release + gap-free run" if on_release else "quiet timer only (fallback)"
        print(f"{name:<34} {median(complete):>18.3f} {median(processed):>19.3f}  "
              f"{', '.join(f'{v:.2f}' for v in processed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
