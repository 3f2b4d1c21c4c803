"""The node's state: one SQLite database (WAL) under the data dir.

Instances, series and the outbox live here, not in memory, so that a restart
(or ``kill -9``) resumes everything that was in flight. Every state change is
one transaction; ``synchronous=FULL`` makes a commit durable before the
C-STORE success status goes back.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL
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
    attempts INTEGER NOT NULL DEFAULT 0
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
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""

# Series states. receiving -> queued -> processing -> done | rejected | failed
RECEIVING, QUEUED, PROCESSING, DONE, REJECTED, FAILED = (
    "receiving", "queued", "processing", "done", "rejected", "failed",
)
# Outbox states.
PENDING, SENT = "pending", "sent"


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


class StateStore:
    """Thread-safe access to the state database (one connection per thread)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connection().executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> "StateStore._Tx":
        return StateStore._Tx(self._connection())

    # -- instances and series -------------------------------------------------

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        series_uid: str,
        study_uid: str,
        sop_class_uid: str,
        path: str,
        size: int,
        calling_ae: str,
        now: float | None = None,
    ) -> bool:
        """Record a received instance and touch its series; False if it was a duplicate.

        A duplicate (same SOP Instance UID) replaces the earlier file record; a
        series that was already finished goes back to ``receiving`` so that the
        late instance is not silently ignored.
        """
        with self._tx() as db:
            # Timestamp under the write lock: an instance committed after a claim
            # is then never older than the claim (see finish_series).
            now = time.time() if now is None else now
            existing = db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, series_uid, study_uid, sop_class_uid, path, size, calling_ae, now),
            )
            count = db.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[0]
            db.execute(
                """INSERT INTO series (series_uid, study_uid, state, first_received, last_received,
                                       instance_count, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(series_uid) DO UPDATE SET
                       last_received = excluded.last_received,
                       instance_count = excluded.instance_count,
                       state = CASE WHEN series.state = 'processing' THEN series.state ELSE 'receiving' END,
                       reason = CASE WHEN series.state = 'processing' THEN series.reason ELSE NULL END,
                       updated_at = excluded.updated_at""",
                (series_uid, study_uid, RECEIVING, now, now, count, now),
            )
            return existing is None

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
                "UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ?",
                [(QUEUED, now, uid) for uid in uids],
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

    def finish_series(self, series_uid: str, state: str, reason: str | None, claimed_at: float) -> str:
        """Set the outcome of processing, unless new instances arrived meanwhile.

        A series that received instances while it was processed goes back to
        ``receiving`` (its completion timer restarts) rather than being marked done.
        ``claimed_at`` is the ``updated_at`` of the row :meth:`claim_next_series`
        returned. Returns the state actually stored.
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
                "UPDATE series SET state = ?, reason = ?, updated_at = ? WHERE series_uid = ?",
                (state, reason, now, series_uid),
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

    def enqueue_result(
        self, *, series_uid: str, sop_instance_uid: str, sop_class_uid: str, path: str, destinations: list[str]
    ) -> None:
        """Queue a result file for every destination (idempotent per object and destination)."""
        now = time.time()
        with self._tx() as db:
            for dest in destinations:
                db.execute(
                    """INSERT INTO outbox (series_uid, sop_instance_uid, sop_class_uid, path, destination,
                                           state, next_attempt_at, created_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET
                           path = excluded.path, state = 'pending', next_attempt_at = excluded.next_attempt_at,
                           attempts = 0, last_error = NULL""",
                    (series_uid, sop_instance_uid, sop_class_uid, path, dest, PENDING, now, now),
                )

    def due_outbox(self, now: float | None = None, limit: int = 100) -> list[OutboxRow]:
        now = time.time() if now is None else now
        rows = self._connection().execute(
            "SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ? ORDER BY destination, id LIMIT ?",
            (PENDING, now, limit),
        ).fetchall()
        return [OutboxRow(**dict(r)) for r in rows]

    def list_outbox(self, limit: int = 200) -> list[OutboxRow]:
        rows = self._connection().execute("SELECT * FROM outbox ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [OutboxRow(**dict(r)) for r in rows]

    def mark_sent(self, item_id: int, status: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = NULL, "
                "sent_at = ? WHERE id = ?",
                (SENT, status, time.time(), item_id),
            )

    def mark_attempt_failed(self, item_id: int, status: str | None, error: str, retry_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_status = ?, last_error = ?, next_attempt_at = ? "
                "WHERE id = ?",
                (status, error, retry_at, item_id),
            )

    def counts(self) -> dict[str, int]:
        """Series by state and pending outbox items, for status output."""
        db = self._connection()
        out = {f"series_{r[0]}": r[1] for r in db.execute("SELECT state, COUNT(*) FROM series GROUP BY state")}
        out.update({f"outbox_{r[0]}": r[1] for r in db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state")})
        return out
