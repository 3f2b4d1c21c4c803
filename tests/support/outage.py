"""The PACS outage scenario: results queued while Orthanc is down, delivered once when it returns.

Shared by ``tests/system/test_outage.py`` (short outage, in CI) and
``tests/soak_outage.py`` (longer outage, more series). Black-box: what the node
did is read from ``series list``, its state database opened read-only and
``outbox list``; what arrived, from Orthanc's QIDO-RS.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from support.data import REPO
from support.dcmtk import storescu
from support.node import NodeProcess, StartNode
from support.orthanc import Orthanc
from support.processes import wait_for
from support.series import SourceSeries, copy_series

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
RESULT_CLASSES = {SEG_CLASS: "SEG", SR_CLASS: "SR"}
CI_OUTAGE_SECONDS = float(os.environ.get("PACS_AI_OUTAGE_SECONDS", "12"))


# -- the modality --------------------------------------------------------------------------------


def fresh_series(folder: Path, slices: int) -> SourceSeries:
    """The first ``slices`` abdomen slices as a new study and series with new SOP Instance UIDs."""
    return copy_series(folder, slices, new_study=True)


# -- the node, from outside ----------------------------------------------------------------------


def node_config(folder: Path, retry_initial_s: float, retry_max_s: float) -> Path:
    path = folder / "node.toml"
    path.write_text(f"[send]\nsend_retry_initial_s = {retry_initial_s}\nsend_retry_max_s = {retry_max_s}\n")
    return path


def series_states(data_dir: Path) -> dict[str, str]:
    """``series list``: {series uid: state}."""
    listing = subprocess.run(
        [sys.executable, "-m", "node", "series", "list", "--data-dir", str(data_dir), "--limit", "100000"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    return {m[1]: m[2] for line in listing.stdout.splitlines()[1:] if (m := re.match(r"^(\S+)\s+(\S+)\s", line))}


@dataclass(frozen=True)
class OutboxItem:
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    state: str
    attempts: int


def outbox(data_dir: Path) -> list[OutboxItem]:
    """The node's outbox, read through a read-only connection (empty before the node created it)."""
    path = data_dir / "state.sqlite3"
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            rows = db.execute("SELECT series_uid, sop_instance_uid, sop_class_uid, state, attempts FROM outbox")
            return [OutboxItem(*row) for row in rows]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def outbox_cli_unsent(data_dir: Path) -> int | None:
    """Items ``python -m node outbox list`` shows as pending or dead; None where this version of
    the node has no such command (the state database is checked directly in any case)."""
    help_text = subprocess.run([sys.executable, "-m", "node", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=REPO).stdout
    if not re.search(r"\boutbox\b", help_text):
        return None
    unsent = 0
    for state in ("pending", "dead"):
        listing = subprocess.run(
            [sys.executable, "-m", "node", "outbox", "list", "--data-dir", str(data_dir), "--state", state],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert listing.returncode == 0, f"outbox list --state {state}: {listing.stderr}"
        shown = re.search(r"^(\d+) item\(s\) shown", listing.stdout, flags=re.M)
        assert shown, f"outbox list --state {state}: no item count in {listing.stdout!r}"
        unsent += int(shown[1])
    return unsent


# -- the PACS, from outside ----------------------------------------------------------------------


def results_in_pacs(orthanc: Orthanc, study_uid: str) -> list[tuple[str, str]]:
    """QIDO-RS: (SOP Class UID, SOP Instance UID) of every instance of the study in Orthanc."""
    try:
        items = json.loads(orthanc.request("GET", f"/dicom-web/studies/{study_uid}/instances") or b"[]")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # nothing of the study has arrived yet
            return []
        raise
    return [(item["00080016"]["Value"][0], item["00080018"]["Value"][0]) for item in items]


# -- the scenario --------------------------------------------------------------------------------


@dataclass
class OutageReport:
    series: list[SourceSeries]
    outage_s: float = 0.0
    queued: int = 0
    failed_attempts: int = 0
    first_after_back_s: float = 0.0
    deliver_after_back_s: float = 0.0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.series)} series, outage {self.outage_s:.1f} s, {self.queued} results queued "
                f"({self.failed_attempts} failed send attempts during the outage), Orthanc back -> first result "
                f"in Orthanc {self.first_after_back_s:.1f} s, all delivered {self.deliver_after_back_s:.1f} s, "
                f"duplicates {self.duplicates}, problems {len(self.problems)}")


def process_while_pacs_down(orthanc: Orthanc, start_node: StartNode, workdir: Path, series_count: int,
                            slices: int, retry_initial_s: float, retry_max_s: float,
                            log: Callable[[str], None] = print) -> tuple[NodeProcess, OutageReport, float]:
    """Start the node, stop Orthanc, send the series, wait until they are done and every result
    has failed at least once. Returns the node, the report so far and when Orthanc went down."""
    config = node_config(workdir, retry_initial_s, retry_max_s)
    node = start_node("--config", str(config), "--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                      "--quiet-seconds", "2", port=orthanc.node_port)
    orthanc.stop()  # by its PID; waits until it has exited
    down_at = time.monotonic()
    report = OutageReport([fresh_series(workdir / f"series-{i}", slices) for i in range(series_count)])
    for source in report.series:
        sent = storescu(node.port, source.files)
        assert sent.returncode == 0, sent.stderr
    log(f"{series_count} series of {slices} slices sent to the node while Orthanc is down")

    wanted = {s.series_uid for s in report.series}

    def all_done() -> bool:
        states = series_states(node.data_dir)
        bad = {uid: states[uid] for uid in wanted if states.get(uid) in ("rejected", "failed")}
        assert not bad, f"series not processed: {bad}"
        return all(states.get(uid) == "done" for uid in wanted)

    wait_for(all_done, 60 + 20 * series_count, interval=0.5, what="every series done")

    def all_failed_once() -> list[OutboxItem] | None:
        items = [i for i in outbox(node.data_dir) if i.series_uid in wanted]
        return items if len(items) == 2 * len(wanted) and all(i.attempts >= 1 for i in items) else None

    items = wait_for(all_failed_once, 30 + 4 * retry_initial_s, interval=0.5,
                     what="every result queued with a failed attempt")
    assert all(i.state == "pending" for i in items), f"results not pending while Orthanc is down: {items}"
    report.queued = len(items)
    log(f"{report.queued} results queued, each failed at least once")
    return node, report, down_at


def deliver_after_pacs_returns(orthanc: Orthanc, node_data_dir: Path, report: OutageReport,
                               timeout_s: float, log: Callable[[str], None] = print,
                               back_at: float | None = None) -> OutageReport:
    """Wait (bounded) until every result is in Orthanc; check each arrived once and the outbox is empty."""
    back_at = back_at if back_at is not None else time.monotonic()
    wanted = {s.series_uid for s in report.series}

    first: list[float] = []

    def delivered() -> bool:
        counts = [len(results_in_pacs(orthanc, s.study_uid)) for s in report.series]
        if not first and any(counts):
            first.append(time.monotonic())
        return all(n >= 2 for n in counts)

    wait_for(delivered, timeout_s, interval=0.2, what="every SEG and SR in Orthanc")
    report.deliver_after_back_s = time.monotonic() - back_at
    report.first_after_back_s = (first[0] if first else time.monotonic()) - back_at
    # The outbox records delivery right after the C-STORE response: give it a moment.
    wait_for(lambda: all(i.state == "sent" for i in outbox(node_data_dir) if i.series_uid in wanted), 30,
             interval=0.2, what="every outbox item sent")

    items = [i for i in outbox(node_data_dir) if i.series_uid in wanted]
    by_series: dict[str, list[OutboxItem]] = {}
    for item in items:
        by_series.setdefault(item.series_uid, []).append(item)
    for source in report.series:
        queued = by_series.get(source.series_uid, [])
        in_pacs = results_in_pacs(orthanc, source.study_uid)
        kinds = Counter(RESULT_CLASSES.get(sop_class, sop_class) for sop_class, _ in in_pacs)
        copies = Counter(uid for _, uid in in_pacs)
        report.duplicates += sum(n - 1 for n in kinds.values() if n > 1)
        if kinds != Counter({"SEG": 1, "SR": 1}):
            report.problems.append(f"series {source.series_uid}: Orthanc holds {dict(kinds)} in its study")
        if any(n > 1 for n in copies.values()):
            report.problems.append(f"series {source.series_uid}: a SOP Instance UID listed twice: {copies}")
        if sorted(uid for _, uid in in_pacs) != sorted(i.sop_instance_uid for i in queued):
            report.problems.append(f"series {source.series_uid}: Orthanc has {sorted(copies)}, the outbox "
                                   f"{sorted(i.sop_instance_uid for i in queued)}")
    left = [i for i in items if i.state != "sent"]
    if left:
        report.problems.append(f"outbox not empty: {left}")
    listed = outbox_cli_unsent(node_data_dir)
    if listed:
        report.problems.append(f"outbox list shows {listed} items pending or dead")
    log(report.summary())
    return report


def outage_scenario(orthanc: Orthanc, start_node: StartNode, workdir: Path, series_count: int = 3,
                    slices: int = 30, outage_s: float = CI_OUTAGE_SECONDS, retry_initial_s: float = 0.5,
                    retry_max_s: float = 2.0, log: Callable[[str], None] = print) -> tuple[NodeProcess, OutageReport]:
    """Orthanc stopped while results are queued; started again ``outage_s`` after it went down."""
    node, report, down_at = process_while_pacs_down(orthanc, start_node, workdir, series_count, slices,
                                                     retry_initial_s, retry_max_s, log)
    time.sleep(max(0.0, down_at + outage_s - time.monotonic()))
    report.failed_attempts = sum(i.attempts for i in outbox(node.data_dir))
    orthanc.start()
    back_at = time.monotonic()
    report.outage_s = back_at - down_at
    log(f"Orthanc back after {report.outage_s:.1f} s; {report.failed_attempts} failed attempts meanwhile")
    deliver_after_pacs_returns(orthanc, node.data_dir, report, timeout_s=retry_max_s + 60, log=log,
                               back_at=back_at)
    return node, report
