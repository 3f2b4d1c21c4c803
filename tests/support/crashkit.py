"""kill -9 the node while series stream in, and check that nothing acknowledged is lost.

Shared by ``tests/system/test_crash.py`` (20 rounds in CI) and ``tests/soak_crash.py``
(as many rounds as asked). Everything is black-box: a pynetdicom SCU plays the
modality and records exactly which SOP Instance UIDs got status 0x0000; the
node runs as ``python -m node serve`` and is killed with SIGKILL by its PID;
afterwards the spool on disk, ``series list``, the state database (opened
read-only) and the PACS (a real Orthanc) are checked.

A round: a fresh study and series (new UIDs, same real slices) streams in over
one association; at a random moment (seeded) the node is killed, either while
the series streams or a little after, while it is completed, processed or its
results are sent; the node restarts on the same data dir and port; in about
half of the rounds the modality then resends what was not acknowledged, as a
real modality retries.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from support.data import abdomen_files
from support.node import NodeProcess
from support.orthanc import Orthanc
from support.processes import wait_for

#: Series states that end the node's work on a series.
TERMINAL = ("done", "rejected", "failed")


# -- the modality -------------------------------------------------------------------------------


def _nodelay(event: evt.Event) -> None:
    """TCP_NODELAY on the SCU's socket: pynetdicom never sets it (see PEERS.md)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class SeriesSource:
    """The first ``slices`` real abdomen slices, read once; each call of :meth:`fresh`
    gives a copy with new Study, Series and SOP Instance UIDs so that rounds never collide."""

    def __init__(self, slices: int) -> None:
        files = abdomen_files()
        if not 10 <= slices <= len(files):
            raise ValueError(f"slices: {slices} not in 10..{len(files)}")
        self.templates = [pydicom.dcmread(p) for p in files[:slices]]

    def fresh(self) -> list[Dataset]:
        study, series = generate_uid(), generate_uid()
        out: list[Dataset] = []
        for template in self.templates:
            ds = copy.deepcopy(template)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            out.append(ds)
        return out


@dataclass
class Delivery:
    """What the modality saw: every SOP Instance UID it tried, and those answered 0x0000."""

    attempted: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    statuses: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    assoc: object = field(default=None, repr=False)

    def wake(self) -> None:
        """Tell an SCU blocked on a C-STORE response that the node is gone.

        pynetdicom 3.0 notices the closed connection (the association is
        aborted) but its DIMSE layer keeps waiting for the response until the
        whole DIMSE timeout has passed; a modality would give up at once. An
        empty message on DIMSE's queue is what ``get_msg`` returns on abort.
        """
        dimse = getattr(self.assoc, "dimse", None)
        if dimse is not None:
            dimse.msg_queue.put((None, None))


def send_series(port: int, datasets: list[Dataset], delivery: Delivery, timeout: float = 10.0) -> Delivery:
    """C-STORE ``datasets`` over one association; record each status. Never raises."""
    started = time.monotonic()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        delivery.assoc = assoc
        if not assoc.is_established:
            delivery.error = "no association"
            return delivery
        try:
            for ds in datasets:
                uid = str(ds.SOPInstanceUID)
                delivery.attempted.append(uid)
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, OSError, ValueError) as exc:  # association gone under us
                    delivery.statuses[uid] = None
                    delivery.error = f"{type(exc).__name__}: {exc}"
                    break
                code = int(status.Status) if status and "Status" in status else None
                delivery.statuses[uid] = code
                if code == 0x0000:
                    delivery.acked.append(uid)
                elif code is None:  # no response: the association is gone
                    delivery.error = "no response, association aborted"
                    break
        finally:
            if assoc.is_established:
                assoc.release()
    except Exception as exc:  # the node died at the worst moment: that is the point of the test
        delivery.error = f"{type(exc).__name__}: {exc}"
    finally:
        ae.shutdown()
        delivery.seconds = time.monotonic() - started
    return delivery


# -- the node's state, read from outside --------------------------------------------------------


def series_states(data_dir: Path) -> dict[str, tuple[str, int, str]]:
    """``series list`` as {series uid: (state, instance count, reason)}."""
    listing = subprocess.run(
        [sys.executable, "-m", "node", "series", "list", "--data-dir", str(data_dir), "--limit", "100000"],
        capture_output=True, text=True, timeout=60,
    )
    out = {}
    for line in listing.stdout.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+(\S+)\s+(\d+)\s+\S+ \S+\s*(.*)$", line)
        if match:
            out[match[1]] = (match[2], int(match[3]), match[4].strip())
    return out


@dataclass
class StateSnapshot:
    """The state database, read through a read-only connection."""

    instances: dict[str, tuple[str, str]]  # sop -> (series, path)
    series: dict[str, tuple[str, str | None]]  # series -> (state, reason)
    outbox: list[tuple[str, str, str, str]]  # (series, sop, destination, state)


def read_state(data_dir: Path) -> StateSnapshot:
    path = data_dir / "state.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        db.execute("PRAGMA busy_timeout=30000")
        instances = {r[0]: (r[1], r[2]) for r in db.execute("SELECT sop_instance_uid, series_uid, path FROM instances")}
        series = {r[0]: (r[1], r[2]) for r in db.execute("SELECT series_uid, state, reason FROM series")}
        outbox = [tuple(r) for r in db.execute("SELECT series_uid, sop_instance_uid, destination, state FROM outbox")]
    return StateSnapshot(instances, series, outbox)


def spooled(data_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where the node keeps an instance (README: ``spool/<study>/<series>/<sop>.dcm``)."""
    return data_dir / "spool" / study_uid / series_uid / f"{sop_uid}.dcm"


# -- the rounds ---------------------------------------------------------------------------------


@dataclass
class Round:
    index: int
    study_uid: str
    series_uid: str
    kill_at: float | None  # seconds after the association was requested; None: not killed
    phase: str  # "streaming", "after" (completion, processing, sending), "after-done", "none"
    first: Delivery
    retry: Delivery | None = None
    datasets: dict[str, Dataset] = field(default_factory=dict, repr=False)

    @property
    def acked(self) -> list[str]:
        return self.first.acked + (self.retry.acked if self.retry else [])


class CrashRig:
    """One node (same data dir and port across restarts) and the rounds played against it."""

    def __init__(self, workdir: Path, port: int, node_args: list[str], slices: int, seed: int,
                 log: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.node = NodeProcess(data_dir=workdir / "node-data", port=port, args=node_args, log=workdir / "node.log")
        self.source = SeriesSource(slices)
        self.rng = random.Random(seed)
        self.seed = seed
        self.rounds: list[Round] = []
        self.restarts = 0
        self.restart_seconds: list[float] = []
        self.stream_seconds = 1.0  # calibrated by the first, unkilled round
        self.log = log

    # process control: only the node this rig started, by PID
    def start(self) -> None:
        started = time.monotonic()
        self.node.start()
        self.restart_seconds.append(time.monotonic() - started)

    def kill(self) -> None:
        self.node.stop(9)  # SIGKILL by PID; waits for it

    def stop(self) -> None:
        self.node.stop()

    def _new_round(self, phase: str) -> tuple[Round, list[Dataset]]:
        datasets = self.source.fresh()
        rnd = Round(
            index=len(self.rounds), study_uid=str(datasets[0].StudyInstanceUID),
            series_uid=str(datasets[0].SeriesInstanceUID), kill_at=None, phase=phase, first=Delivery(),
            datasets={str(ds.SOPInstanceUID): ds for ds in datasets},
        )
        self.rounds.append(rnd)
        return rnd, datasets

    def calibrate(self) -> Round:
        """A whole series without a kill: it measures the streaming time that kills aim at."""
        rnd, datasets = self._new_round("none")
        send_series(self.node.port, datasets, rnd.first)
        self.stream_seconds = max(rnd.first.seconds, 0.05)
        self.log(f"round {rnd.index}: no kill, {len(rnd.first.acked)}/{len(datasets)} acknowledged in "
                 f"{rnd.first.seconds:.2f} s")
        return rnd

    def crash_round(self, after_window: float = 3.0) -> Round:
        """Stream a series and SIGKILL the node at a random moment; restart; maybe resend."""
        if self.rng.random() < 0.7:
            phase, kill_at = "streaming", self.rng.uniform(0.0, 1.1 * self.stream_seconds)
        else:
            phase, kill_at = "after", self.rng.uniform(self.stream_seconds, self.stream_seconds + after_window)
        resend = self.rng.random() < 0.5
        rnd, datasets = self._new_round(phase)
        rnd.kill_at = kill_at
        thread = threading.Thread(target=send_series, args=(self.node.port, datasets, rnd.first), daemon=True)
        started = time.monotonic()
        thread.start()
        time.sleep(max(0.0, started + kill_at - time.monotonic()))
        self.kill()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            rnd.first.wake()
            thread.join(timeout=0.2)
        if thread.is_alive():
            raise RuntimeError(f"round {rnd.index}: the SCU did not notice the node's death within 30 s")
        self.restarts += 1
        self.start()
        if resend:
            missing = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(rnd.first.acked)]
            rnd.retry = send_series(self.node.port, missing, Delivery()) if missing else None
        self.log(
            f"round {rnd.index}: kill at {kill_at:.3f} s ({phase}), {len(rnd.first.acked)}/{len(datasets)} "
            f"acknowledged before it ({rnd.first.error or 'no SCU error'})"
            + (f"; resent {len(rnd.retry.attempted)}, {len(rnd.retry.acked)} acknowledged" if rnd.retry else "")
        )
        return rnd

    def kill_after_done(self, timeout: float = 60.0) -> Round:
        """A whole series; SIGKILL as soon as the node says ``done`` (its results are
        being sent, or just were); restart. The PACS must get the results anyway.
        (Kills at the first terminal state, so that a node which rejects the series
        fails in :func:`verify` with the reason, not here with a timeout.)"""
        rnd, datasets = self._new_round("after-done")
        send_series(self.node.port, datasets, rnd.first)

        def finished() -> str | None:
            try:
                state = read_state(self.node.data_dir).series.get(rnd.series_uid, ("",))[0]
            except sqlite3.Error:
                return None
            return state if state in TERMINAL else None

        started = time.monotonic()
        outcome = wait_for(finished, timeout, interval=0.02, what=f"series {rnd.series_uid} done")
        rnd.kill_at = time.monotonic() - started
        self.kill()
        try:  # what the kill interrupted (the database survives the kill; read it before the restart)
            items = [o for o in read_state(self.node.data_dir).outbox if o[0] == rnd.series_uid]
            unsent = f"{sum(o[3] != 'sent' for o in items)} of {len(items)} results not yet sent"
        except sqlite3.Error as exc:
            unsent = f"outbox not readable: {exc}"
        self.restarts += 1
        self.start()
        self.log(f"round {rnd.index}: {len(rnd.first.acked)}/{len(datasets)} acknowledged; killed right after "
                 f"'{outcome}' was seen ({unsent})")
        return rnd


# -- the verdict --------------------------------------------------------------------------------


@dataclass
class Verdict:
    rounds: int
    acknowledged: int
    lost: list[str]
    series_terminal: dict[str, int]
    problems: list[str]
    results_in_pacs: int

    def summary(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.series_terminal.items()))
        return (f"{self.rounds} rounds, {self.acknowledged} instances acknowledged, {len(self.lost)} lost, "
                f"series: {states}; {self.results_in_pacs} done series with SEG and SR in the PACS; "
                f"{len(self.problems)} problems")


def _orthanc_has(orthanc: Orthanc, sop_uid: str) -> bool:
    found = orthanc.request("POST", "/tools/lookup", sop_uid.encode())
    return any(item.get("Type") == "Instance" for item in json.loads(found))


def verify(rig: CrashRig, orthanc: Orthanc | None, settle_timeout: float = 120.0) -> Verdict:
    """After the last restart: nothing acknowledged lost, nothing stuck, results delivered."""
    data_dir = rig.node.data_dir
    problems: list[str] = []

    # 1. Every acknowledged instance is on disk, whole, and recorded.
    state = read_state(data_dir)
    lost = []
    acknowledged = 0
    for rnd in rig.rounds:
        for sop in rnd.acked:
            acknowledged += 1
            sent = rnd.datasets[sop]
            path = spooled(data_dir, rnd.study_uid, rnd.series_uid, sop)
            if not path.exists():
                lost.append(sop)
                problems.append(f"round {rnd.index}: acknowledged {sop} is not in the spool ({path})")
                continue
            back: Dataset | Exception
            try:
                back = pydicom.dcmread(path)
                whole = back.SOPInstanceUID == sop and back.PixelData == sent.PixelData and \
                    back.pixel_array.shape == sent.pixel_array.shape
            except Exception as exc:  # a torn or unreadable file is a loss too
                whole, back = False, exc
            if not whole:
                lost.append(sop)
                problems.append(f"round {rnd.index}: acknowledged {sop} is on disk but not whole: {back!r:.200}")
            if sop not in state.instances:
                problems.append(f"round {rnd.index}: acknowledged {sop} has no row in the state database")
            elif state.instances[sop][0] != rnd.series_uid:
                problems.append(f"round {rnd.index}: {sop} recorded under series {state.instances[sop][0]}")

    # A refusal is a bug here: every instance is a valid CT slice.
    for rnd in rig.rounds:
        for delivery in (rnd.first, rnd.retry):
            for sop, code in (delivery.statuses.items() if delivery else ()):
                if code not in (0x0000, None):
                    problems.append(f"round {rnd.index}: {sop} refused with status 0x{code:04X}")

    # 2. Every series the node heard of ends done or rejected (with a reason): none forgotten.
    ours = {rnd.series_uid: rnd for rnd in rig.rounds}

    def settled() -> dict[str, tuple[str, int, str]] | None:
        listing = series_states(data_dir)
        pending = {uid: s for uid, s in listing.items() if s[0] not in TERMINAL}
        return None if pending else listing

    try:
        listing = wait_for(settled, settle_timeout, interval=0.5, what="every series done or rejected")
    except TimeoutError:
        listing = series_states(data_dir)
        for uid, (st, n, _reason) in listing.items():
            if st not in TERMINAL:
                problems.append(
                    f"series {uid} still {st} ({n} instances) {settle_timeout:.0f} s after the last restart")
    for rnd in rig.rounds:
        if rnd.acked and rnd.series_uid not in listing:
            problems.append(f"round {rnd.index}: series {rnd.series_uid} with {len(rnd.acked)} acknowledged "
                            f"instances is missing from series list")
    counts: dict[str, int] = {}
    for uid, (st, n, reason) in listing.items():
        counts[st] = counts.get(st, 0) + 1
        if st == "failed":
            problems.append(f"series {uid} failed: {reason}")
        elif st == "rejected" and not reason:
            problems.append(f"series {uid} rejected without a reason")
        if uid in ours and n < len(set(ours[uid].acked)):
            problems.append(f"series {uid}: {n} instances listed, {len(set(ours[uid].acked))} acknowledged")

    # 3. Every done series has its SEG and SR in the PACS (the node's sender retried across kills).
    in_pacs = 0
    if orthanc is not None:
        done = [ours[uid] for uid, s in listing.items() if s[0] == "done" and uid in ours]

        def modalities(study_uid: str) -> set[str]:
            return {item.get("00080060", {}).get("Value", [""])[0] for item in orthanc.series_in_study(study_uid)}

        def delivered() -> bool:
            return all({"SEG", "SR"} <= modalities(rnd.study_uid) for rnd in done)

        try:
            wait_for(delivered, settle_timeout, interval=0.5, what="SEG and SR of every done series in the PACS")
        except TimeoutError:
            pass
        for rnd in done:
            have = modalities(rnd.study_uid)
            if {"SEG", "SR"} <= have:
                in_pacs += 1
            else:
                problems.append(f"round {rnd.index}: series {rnd.series_uid} is done but the PACS has {sorted(have)}")
        # What the node's outbox says it delivered is really there.
        state = read_state(data_dir)
        for series_uid, sop, destination, item_state in state.outbox:
            if item_state != "sent":
                problems.append(f"outbox item {sop} of series {series_uid} for {destination} still {item_state}")
            elif not _orthanc_has(orthanc, sop):
                problems.append(f"outbox item {sop} of series {series_uid} marked sent but not in the PACS")

    return Verdict(rounds=len(rig.rounds), acknowledged=acknowledged, lost=lost, series_terminal=counts,
                   problems=problems, results_in_pacs=in_pacs)


def play(rig: CrashRig, rounds: int) -> None:
    """The scenario: one unkilled series, ``rounds`` crash rounds, then a kill right after done."""
    rig.start()
    rig.calibrate()
    for _ in range(rounds):
        rig.crash_round()
    rig.kill_after_done()


def finish_soak(ok: bool, workdir: Path, keep: bool) -> int:
    """End of a soak script: remove its work folder unless kept or failed; the exit code."""
    if ok and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work folder kept: {workdir}")
    return 0 if ok else 1
