"""The node's state: one SQLite database (WAL) under the data dir.

Instances, series and the outbox live here, not in memory, so that a restart
(or ``kill -9``) resumes everything that was in flight. Every state change is
one transaction. The database runs with ``synchronous=NORMAL``: a committed
transaction survives the process being killed (it is in the WAL, written
before the commit returns) but not necessarily a power cut. What must survive
a power cut is the received data itself, and that is fsynced in the spool
before the success status; :meth:`StateStore.known_paths` lets the node adopt,
at start, spooled files whose row a power cut took away. Every other state
change (outbox, series outcome) is redone safely when lost: at-least-once.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydicom.uid import UID

from node.store.header import InstanceHeader
from pipelines.errors import SeriesRejected
from pipelines.volume.geometry import check_slice_spacing

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    association TEXT,
    position REAL,
    orientation TEXT,
    images_in_acquisition INTEGER,
    number_of_frames INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    completion TEXT,
    results TEXT
);
CREATE INDEX IF NOT EXISTS series_by_state ON series(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    queued_at REAL,
    dead_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""

#: Columns added after the first release: (table, column, declaration).
MIGRATIONS = [
    ("instances", "association", "TEXT"),
    ("instances", "position", "REAL"),
    ("instances", "orientation", "TEXT"),
    ("instances", "images_in_acquisition", "INTEGER"),
    ("instances", "number_of_frames", "INTEGER"),
    ("series", "version", "INTEGER NOT NULL DEFAULT 0"),
    ("series", "completion", "TEXT"),
    ("series", "results", "TEXT"),
    ("outbox", "queued_at", "REAL"),
    ("outbox", "dead_at", "REAL"),
    ("series", "input_purged_at", "REAL"),
    ("series", "timings", "TEXT"),
]


def gap_free(positions: list[float | None], orientations: list[str | None]) -> str | None:
    """Why the slices do not form a complete evenly spaced run, or None when they do.

    ``positions`` are the slices' distances along their normal (mm), in any
    order. Used to finish a series early, with the pipeline's own spacing rule
    (:func:`pipelines.volume.geometry.check_slice_spacing`, one tolerance): a
    series is never queued early with a gap the pipeline would reject. The
    pipeline still checks the rest of the geometry in full.
    """
    if len(positions) < 2:
        return "fewer than 2 slices"
    if any(p is None for p in positions) or len(set(orientations)) != 1:
        return "positions missing or orientations differ"
    try:
        check_slice_spacing([p for p in positions if p is not None])
    except SeriesRejected as exc:
        return exc.reason
    return None

# Series states. receiving -> queued -> processing -> done | rejected | failed
RECEIVING, QUEUED, PROCESSING, DONE, REJECTED, FAILED = (
    "receiving", "queued", "processing", "done", "rejected", "failed",
)
# Outbox states. pending -> sent | dead; dead -> pending by ``retry_outbox``.
PENDING, SENT, DEAD = "pending", "sent", "dead"
OUTBOX_STATES = (PENDING, SENT, DEAD)


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    state: str
    first_received: float
    last_received: float
    instance_count: int
    reason: str | None
    updated_at: float
    attempts: int
    version: int = 0
    completion: str | None = None
    results: str | None = None  # JSON: the last version's result objects (see Node.process_series)
    input_purged_at: float | None = None  # when retention deleted the received instances
    timings: str | None = None  # JSON: seconds per processing stage of the last run


def short_class_name(sop_class_uid: str) -> str:
    """``Segmentation``, ``Comprehensive 3D SR``...: the SOP class name without "Storage", as the
    outbox listings (``outbox list``, the status pages) show an item's SOP Class UID."""
    name = UID(sop_class_uid).name
    return name.removesuffix(" Storage") if name != sop_class_uid else sop_class_uid


@dataclass(frozen=True)
class OutboxRow:
    id: int
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_status: str | None
    last_error: str | None
    created_at: float
    sent_at: float | None
    queued_at: float | None = None  # when the current run of attempts began (created or retried)
    dead_at: float | None = None

    @property
    def age_from(self) -> float:
        """The start of the item's age for ``max_age_s``."""
        return self.queued_at if self.queued_at is not None else self.created_at


class StateStore:
    """Thread-safe access to the state database (one connection per thread)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        db = self._connection()
        db.executescript(SCHEMA)
        for table, column, declaration in MIGRATIONS:
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    class _Tx:
        """One write transaction. Writers of this process take a lock first: SQLite's own
        busy handler would make competing threads sleep in steps of milliseconds."""

        def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
            self.db = db
            self.lock = lock

        def __enter__(self) -> sqlite3.Connection:
            self.lock.acquire()
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
            return self.db

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
            try:
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.lock.release()

    def _tx(self) -> StateStore._Tx:
        return StateStore._Tx(self._connection(), self._write_lock)

    # -- instances and series -------------------------------------------------

    def record_instance(
        self,
        header: InstanceHeader,
        *,
        path: str,
        size: int,
        calling_ae: str,
        association: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a received instance and touch its series; False if it was a duplicate.

        A duplicate (same SOP Instance UID) replaces the earlier file record. A
        new instance for a series that was already finished sends it back to
        ``receiving``: its result will be a new version. A series whose
        expected instance count (Images in Acquisition) is reached with a
        gap-free run of positions is queued at once.
        """
        with self._tx() as db:
            # Timestamp under the write lock: an instance committed after a claim
            # is then never older than the claim (see finish_series).
            now = time.time() if now is None else now
            existing = db.execute(
                "SELECT size FROM instances WHERE sop_instance_uid = ?", (header.sop_instance_uid,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (header.sop_instance_uid, header.series_uid, header.study_uid, header.sop_class_uid, path, size,
                 calling_ae, now, association, header.position, header.orientation,
                 header.images_in_acquisition, header.number_of_frames),
            )
            series = db.execute(
                "SELECT state, instance_count FROM series WHERE series_uid = ?", (header.series_uid,)
            ).fetchone()
            if series is None:
                db.execute(
                    """INSERT INTO series (series_uid, study_uid, state, first_received, last_received,
                                           instance_count, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?)""",
                    (header.series_uid, header.study_uid, RECEIVING, now, now, now),
                )
                count = 1
            elif existing is not None and existing["size"] == size and series["state"] in (DONE, REJECTED):
                # The same instance sent again (a PACS re-sending a study): nothing new to
                # analyse, the decision stands. A re-send does retry a failed series.
                db.execute("UPDATE series SET last_received = ? WHERE series_uid = ?", (now, header.series_uid))
                return False
            else:
                count = series["instance_count"] + (0 if existing else 1)
                db.execute(
                    """UPDATE series SET last_received = ?, instance_count = ?, updated_at = ?,
                           state = CASE WHEN state = 'processing' THEN state ELSE 'receiving' END,
                           reason = CASE WHEN state = 'processing' THEN reason ELSE NULL END,
                           completion = CASE WHEN state = 'processing' THEN completion ELSE NULL END
                       WHERE series_uid = ?""",
                    (now, count, now, header.series_uid),
                )
            expected = header.images_in_acquisition
            if expected is not None and count == expected:
                self._complete_if_gap_free(db, header.series_uid, now, f"expected count {expected} reached")
            return existing is None

    def _complete_if_gap_free(self, db: sqlite3.Connection, series_uid: str, now: float, why: str) -> bool:
        """Queue a receiving series if its slices form a gap-free run (inside a transaction)."""
        rows = db.execute(
            "SELECT position, orientation, number_of_frames FROM instances WHERE series_uid = ?", (series_uid,)
        ).fetchall()
        if rows and all((r["number_of_frames"] or 1) > 1 for r in rows):
            detail = f"{why}, {len(rows)} multi-frame instance(s)"
        else:
            problem = gap_free([r["position"] for r in rows], [r["orientation"] for r in rows])
            if problem is not None:
                return False
            detail = f"{why}, gap-free run of {len(rows)} slices"
        cursor = db.execute(
            "UPDATE series SET state = ?, updated_at = ?, completion = ? WHERE series_uid = ? AND state = ?",
            (QUEUED, now, detail, series_uid, RECEIVING),
        )
        return cursor.rowcount > 0

    def complete_released(
        self, association: str, now: float | None = None, why: str = "sender released the association"
    ) -> list[tuple[str, str]]:
        """An association (or STOW-RS request) ended normally: queue the series it carried whole.

        A series is queued when every one of its instances came through this
        association and they form a gap-free run (or are multi-frame). Series
        that also came through other associations keep waiting for the quiet
        timer. Returns (series UID, completion detail) for each series queued.
        """
        now = time.time() if now is None else now
        queued = []
        with self._tx() as db:
            candidates = [r[0] for r in db.execute(
                """SELECT DISTINCT i.series_uid FROM instances i JOIN series s ON s.series_uid = i.series_uid
                   WHERE i.association = ? AND s.state = ?""", (association, RECEIVING))]
            for uid in candidates:
                others = db.execute(
                    "SELECT 1 FROM instances WHERE series_uid = ? AND (association IS NULL OR association != ?) "
                    "LIMIT 1", (uid, association)).fetchone()
                if others is None and self._complete_if_gap_free(db, uid, now, why):
                    detail = db.execute("SELECT completion FROM series WHERE series_uid = ?", (uid,)).fetchone()[0]
                    queued.append((uid, detail))
        return queued

    def known_paths(self) -> set[str]:
        """Paths of every recorded instance (to find spooled files a power cut left unrecorded)."""
        return {r[0] for r in self._connection().execute("SELECT path FROM instances")}

    def series_instances(self, series_uid: str) -> list[str]:
        rows = self._connection().execute(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY path", (series_uid,)
        ).fetchall()
        return [r["path"] for r in rows]

    def get_series(self, series_uid: str) -> SeriesRow | None:
        row = self._connection().execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return SeriesRow(**dict(row)) if row else None

    def list_series(self, limit: int = 100) -> list[SeriesRow]:
        rows = self._connection().execute(
            "SELECT * FROM series ORDER BY last_received DESC LIMIT ?", (limit,)
        ).fetchall()
        return [SeriesRow(**dict(r)) for r in rows]

    def queue_quiet_series(self, quiet_seconds: float, now: float | None = None) -> list[str]:
        """Move series with no new instance for ``quiet_seconds`` to ``queued``."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT series_uid FROM series WHERE state = ? AND last_received <= ?",
                (RECEIVING, now - quiet_seconds),
            ).fetchall()
            uids = [r["series_uid"] for r in rows]
            db.executemany(
                "UPDATE series SET state = ?, updated_at = ?, completion = ? WHERE series_uid = ?",
                [(QUEUED, now, f"quiet for {quiet_seconds:g} s", uid) for uid in uids],
            )
        return uids

    def claim_next_series(self) -> SeriesRow | None:
        """Take the oldest queued series and mark it ``processing``."""
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM series WHERE state = ? ORDER BY last_received LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE series SET state = ?, attempts = attempts + 1, updated_at = ? WHERE series_uid = ?",
                (PROCESSING, now, row["series_uid"]),
            )
            return SeriesRow(**{**dict(row), "state": PROCESSING, "attempts": row["attempts"] + 1, "updated_at": now})

    def finish_series(
        self,
        series_uid: str,
        state: str,
        reason: str | None,
        claimed_at: float,
        *,
        version: int | None = None,
        results: str | None = None,
        timings: str | None = None,
    ) -> str:
        """Set the outcome of processing, unless new instances arrived meanwhile.

        A series that received instances while it was processed goes back to
        ``receiving`` (its completion timer restarts) rather than being marked done.
        ``claimed_at`` is the ``updated_at`` of the row :meth:`claim_next_series`
        returned. ``version`` and ``results`` record a result version that was
        produced (and queued for sending), whatever the outcome: the next run
        makes the next version, superseding it. Returns the state actually stored.
        """
        if state not in (DONE, REJECTED, FAILED, QUEUED):
            raise ValueError(f"state: {state!r} is not an outcome")
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                raise KeyError(series_uid)
            if row["last_received"] > claimed_at:
                state, reason = RECEIVING, None
            db.execute(
                "UPDATE series SET state = ?, reason = ?, updated_at = ?, version = ?, results = ?, timings = ? "
                "WHERE series_uid = ?",
                (state, reason, now, row["version"] if version is None else version,
                 row["results"] if results is None else results, timings, series_uid),
            )
        return state

    def requeue_interrupted(self) -> list[str]:
        """After a restart: series caught in ``processing`` go back to ``queued``."""
        with self._tx() as db:
            rows = db.execute("SELECT series_uid FROM series WHERE state = ?", (PROCESSING,)).fetchall()
            uids = [r["series_uid"] for r in rows]
            db.execute("UPDATE series SET state = ?, updated_at = ? WHERE state = ?", (QUEUED, time.time(), PROCESSING))
        return uids

    # -- outbox ---------------------------------------------------------------
    #
    # pending -> sent | dead. An item is attempted when due (next_attempt_at);
    # a failed attempt sets the next one (backoff) or, when the failure is
    # permanent or the destination's attempt or age limit is reached, makes it
    # dead. ``retry_outbox`` makes dead (or failed pending) items due again and
    # restarts their attempt count and age (``queued_at``).

    def enqueue_result(
        self, *, series_uid: str, sop_instance_uid: str, sop_class_uid: str, path: str, destinations: list[str]
    ) -> None:
        """Queue a result file for every destination (idempotent per object and destination)."""
        with self._tx() as db:
            self._enqueue(db, series_uid, sop_instance_uid, sop_class_uid, path, destinations, time.time())

    def record_results(
        self,
        series_uid: str,
        version: int,
        results: str,
        items: list[tuple[str, str, str, list[str]]],
    ) -> None:
        """In one transaction: queue result objects ((SOP Instance UID, SOP Class UID, path,
        destinations) each: every object goes only to the destinations that take its result
        type) and record them as the series' result ``version``."""
        now = time.time()
        with self._tx() as db:
            for sop_instance_uid, sop_class_uid, path, destinations in items:
                self._enqueue(db, series_uid, sop_instance_uid, sop_class_uid, path, destinations, now)
            db.execute("UPDATE series SET version = ?, results = ? WHERE series_uid = ?",
                       (version, results, series_uid))

    @staticmethod
    def _enqueue(db: sqlite3.Connection, series_uid: str, sop_instance_uid: str, sop_class_uid: str, path: str,
                 destinations: list[str], now: float) -> None:
        for dest in destinations:
            db.execute(
                """INSERT INTO outbox (series_uid, sop_instance_uid, sop_class_uid, path, destination,
                                       state, next_attempt_at, created_at, queued_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET
                       path = excluded.path, state = 'pending', next_attempt_at = excluded.next_attempt_at,
                       attempts = 0, last_error = NULL, queued_at = excluded.queued_at, dead_at = NULL""",
                (series_uid, sop_instance_uid, sop_class_uid, path, dest, PENDING, now, now, now),
            )

    def due_outbox(self, now: float | None = None, limit: int | None = 100,
                   destination: str | None = None) -> list[OutboxRow]:
        """Pending items whose next attempt is due, by destination then age (``limit`` None = all)."""
        now = time.time() if now is None else now
        sql = "SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ?"
        params: list[object] = [PENDING, now]
        if destination is not None:
            sql += " AND destination = ?"
            params.append(destination)
        sql += " ORDER BY destination, id LIMIT ?"
        params.append(-1 if limit is None else limit)
        return [OutboxRow(**dict(r)) for r in self._connection().execute(sql, params).fetchall()]

    def due_destinations(self, now: float | None = None) -> list[str]:
        """Destinations that have at least one due item."""
        now = time.time() if now is None else now
        rows = self._connection().execute(
            "SELECT DISTINCT destination FROM outbox WHERE state = ? AND next_attempt_at <= ? ORDER BY destination",
            (PENDING, now),
        ).fetchall()
        return [r[0] for r in rows]

    def list_outbox(self, limit: int = 200, state: str | None = None,
                    destination: str | None = None) -> list[OutboxRow]:
        """Items, newest first, optionally of one state and/or destination."""
        sql, params = "SELECT * FROM outbox WHERE 1 = 1", []
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if destination is not None:
            sql += " AND destination = ?"
            params.append(destination)
        rows = self._connection().execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [OutboxRow(**dict(r)) for r in rows]

    def outbox_items(self, ids: list[int]) -> list[OutboxRow]:
        """The items with these ids (those that exist), by id."""
        rows = self._connection().execute(
            f"SELECT * FROM outbox WHERE id IN ({', '.join('?' * len(ids))}) ORDER BY id", ids
        ).fetchall()
        return [OutboxRow(**dict(r)) for r in rows]

    def outbox_counts(self) -> dict[tuple[str, str], int]:
        """Number of items by (destination, state)."""
        rows = self._connection().execute("SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state")
        return {(r[0], r[1]): r[2] for r in rows}

    def mark_sent(self, item_id: int, status: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = NULL, "
                "sent_at = ? WHERE id = ?",
                (SENT, status, time.time(), item_id),
            )

    def mark_attempt_failed(self, item_id: int, status: str | None, error: str, retry_at: float) -> None:
        """A failed attempt; the item is due again at ``retry_at``."""
        self.mark_failed([(item_id, status, error, retry_at)])

    def mark_dead(self, item_id: int, status: str | None, error: str) -> None:
        """A failed attempt after which the item is not retried (until ``retry_outbox``)."""
        self.mark_failed([(item_id, status, error, None)])

    def make_due(self, destination: str, now: float | None = None) -> int:
        """A destination answered again: its pending items waiting out a backoff are due now.

        Returns how many items were brought forward.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE destination = ? AND state = ? AND next_attempt_at > ?",
                (now, destination, PENDING, now),
            )
            return cursor.rowcount

    def mark_failed(self, failures: list[tuple[int, str | None, str, float | None]]) -> None:
        """Failed attempts in one transaction: (id, status, error, retry_at or None for dead) each."""
        now = time.time()
        with self._tx() as db:
            for item_id, status, error, retry_at in failures:
                if retry_at is None:
                    db.execute(
                        "UPDATE outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?, "
                        "dead_at = ? WHERE id = ? AND state = ?",
                        (DEAD, status, error, now, item_id, PENDING),
                    )
                else:
                    db.execute(
                        "UPDATE outbox SET attempts = attempts + 1, last_status = ?, last_error = ?, "
                        "next_attempt_at = ? WHERE id = ? AND state = ?",
                        (status, error, retry_at, item_id, PENDING),
                    )

    def retry_outbox(self, *, ids: list[int] | None = None, destination: str | None = None,
                     all_dead: bool = False, now: float | None = None) -> list[OutboxRow]:
        """Make dead items, and pending ones that have failed before, due now with a fresh attempt count and age.

        Selects the items with these ``ids`` and/or of ``destination``; ``all_dead`` keeps only
        dead ones (alone: every dead item). Sent items are never selected. Returns the
        selected items as they were before.
        """
        if not ids and destination is None and not all_dead:
            raise ValueError("retry_outbox: give ids, a destination or all_dead")
        now = time.time() if now is None else now
        sql = "SELECT * FROM outbox WHERE (state = ? OR (state = ? AND attempts > 0))"
        params: list[object] = [DEAD, PENDING]
        if ids:
            sql += f" AND id IN ({', '.join('?' * len(ids))})"
            params.extend(ids)
        if destination is not None:
            sql += " AND destination = ?"
            params.append(destination)
        if all_dead:
            sql += " AND state = ?"
            params.append(DEAD)
        with self._tx() as db:
            rows = [OutboxRow(**dict(r)) for r in db.execute(sql + " ORDER BY id", params).fetchall()]
            db.executemany(
                "UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ?, queued_at = ?, dead_at = NULL "
                "WHERE id = ?",
                [(PENDING, now, now, row.id) for row in rows],
            )
        return rows

    def purge_outbox(self, *, sent_before: float | None = None, dead_before: float | None = None,
                     destination: str | None = None) -> int:
        """Delete sent items sent before ``sent_before`` and/or dead items dead before ``dead_before``
        (of one destination if given); returns how many rows went. Pending items are never purged,
        and no file is deleted: result files stay where the series' results point to them."""
        if sent_before is None and dead_before is None:
            raise ValueError("purge_outbox: give sent_before and/or dead_before")
        clauses, params = [], []
        if sent_before is not None:
            clauses.append("(state = ? AND sent_at < ?)")
            params += [SENT, sent_before]
        if dead_before is not None:
            clauses.append("(state = ? AND COALESCE(dead_at, created_at) < ?)")
            params += [DEAD, dead_before]
        sql = f"DELETE FROM outbox WHERE ({' OR '.join(clauses)})"
        if destination is not None:
            sql += " AND destination = ?"
            params.append(destination)
        with self._tx() as db:
            return db.execute(sql, params).rowcount

    def expired_inputs(self, before: float) -> list[tuple[str, list[str]]]:
        """Finished series (done, rejected, failed) last changed before ``before`` whose received
        instances are still on disk: (series uid, instance paths)."""
        db = self._connection()
        rows = db.execute(
            "SELECT series_uid FROM series WHERE state IN (?, ?, ?) AND updated_at < ? AND input_purged_at IS NULL",
            (DONE, REJECTED, FAILED, before),
        ).fetchall()
        return [(r["series_uid"], self.series_instances(r["series_uid"])) for r in rows]

    def mark_input_purged(self, series_uid: str, now: float | None = None) -> None:
        """Forget a series' instances (their files are gone); the series row stays, with the date."""
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            db.execute("UPDATE series SET input_purged_at = ? WHERE series_uid = ?",
                       (time.time() if now is None else now, series_uid))

    def delivered_results(self, before: float) -> list[str]:
        """Result files every destination received, the last of them before ``before``.

        A file with any pending or dead row is never listed: results are kept until delivered."""
        rows = self._connection().execute(
            "SELECT path FROM outbox GROUP BY path HAVING SUM(state != ?) = 0 AND MAX(sent_at) < ?",
            (SENT, before),
        ).fetchall()
        return [r["path"] for r in rows]

    def forget_delivered(self, path: str) -> None:
        """Drop the sent rows of a result file that retention deleted (the audit trail keeps the history)."""
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE path = ? AND state = ?", (path, SENT))

    def counts(self) -> dict[str, int]:
        """Series by state and pending outbox items, for status output."""
        db = self._connection()
        out = {f"series_{r[0]}": r[1] for r in db.execute("SELECT state, COUNT(*) FROM series GROUP BY state")}
        out.update({f"outbox_{r[0]}": r[1] for r in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")})
        return out
