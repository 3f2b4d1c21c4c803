"""The SQLite state store: series life cycle, crash recovery, outbox, concurrency."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from node.store.header import InstanceHeader
from node.store.state import (
    DEAD,
    DONE,
    FAILED,
    PENDING,
    PROCESSING,
    QUEUED,
    RECEIVING,
    REJECTED,
    SENT,
    StateStore,
    gap_free,
)
from pipelines.errors import SeriesRejected
from pipelines.volume.geometry import SPACING_TOLERANCE, check_slice_spacing

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


@pytest.fixture
def store(tmp_path: Path):  # noqa: ANN201
    s = StateStore(tmp_path / "state" / "state.sqlite3")
    yield s
    s.close()


def record(
    store: StateStore,
    sop: str,
    series: str = "1.2.3",
    now: float | None = None,
    study: str = "1.2",
    *,
    position: float | None = None,
    expected: int | None = None,
    frames: int | None = None,
    association: str | None = None,
    size: int = 1000,
) -> bool:
    header = InstanceHeader(
        study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid=CT, position=position,
        orientation=None if position is None else AXIAL, images_in_acquisition=expected, number_of_frames=frames,
    )
    return store.record_instance(
        header, path=f"/spool/{series}/{sop}.dcm", size=size, calling_ae="MODALITY", association=association, now=now
    )


def enqueue(store: StateStore, sop: str, destinations: list[str], series: str = "1.2.3", path: str = "") -> None:
    store.enqueue_result(
        series_uid=series, sop_instance_uid=sop, sop_class_uid=SEG, path=path or f"/results/{sop}.dcm",
        destinations=destinations,
    )


# --------------------------------------------------------------------------- instances and series


def test_new_database_is_created_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "state.sqlite3"
    store = StateStore(path)
    assert path.exists()
    assert store.counts() == {}
    assert store.get_series("nothing") is None
    assert store.claim_next_series() is None
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()
    store.close()


def test_record_instance_and_duplicates(store: StateStore) -> None:
    assert record(store, "1.2.3.1", now=100.0) is True
    assert record(store, "1.2.3.2", now=101.0) is True
    assert record(store, "1.2.3.1", now=102.0, size=999) is False  # the same instance again, changed
    row = store.get_series("1.2.3")
    assert row is not None
    assert row.instance_count == 2
    assert row.state == RECEIVING
    assert row.study_uid == "1.2"
    assert (row.first_received, row.last_received) == (100.0, 102.0)
    assert store.series_instances("1.2.3") == ["/spool/1.2.3/1.2.3.1.dcm", "/spool/1.2.3/1.2.3.2.dcm"]
    assert record(store, "9.9.1", series="9.9", now=103.0) is True
    assert store.get_series("9.9").instance_count == 1
    assert store.get_series("1.2.3").instance_count == 2
    assert [r.series_uid for r in store.list_series()] == ["9.9", "1.2.3"]  # most recent first
    assert store.counts() == {"series_receiving": 2}


def test_queue_quiet_series_respects_the_quiet_period(store: StateStore) -> None:
    record(store, "a.1", series="a", now=1000.0)
    record(store, "b.1", series="b", now=1000.0)
    record(store, "b.2", series="b", now=1008.0)
    assert store.queue_quiet_series(10.0, now=1009.9) == []
    assert store.queue_quiet_series(10.0, now=1010.0) == ["a"]  # exactly quiet_seconds after the last one
    assert store.get_series("a").state == QUEUED
    assert store.get_series("b").state == RECEIVING
    assert store.queue_quiet_series(10.0, now=1017.9) == []
    assert store.queue_quiet_series(10.0, now=1018.0) == ["b"]
    assert store.queue_quiet_series(10.0, now=5000.0) == []  # already queued: not again


def test_instance_for_a_queued_series_restarts_the_timer(store: StateStore) -> None:
    record(store, "a.1", series="a", now=1000.0)
    assert store.queue_quiet_series(10.0, now=1010.0) == ["a"]
    record(store, "a.2", series="a", now=1011.0)
    assert store.get_series("a").state == RECEIVING
    assert store.queue_quiet_series(10.0, now=1020.0) == []
    assert store.queue_quiet_series(10.0, now=1021.0) == ["a"]


def test_claim_next_series_takes_the_oldest_and_marks_it_processing(store: StateStore) -> None:
    record(store, "new.1", series="new", now=2000.0)
    record(store, "old.1", series="old", now=1000.0)
    store.queue_quiet_series(10.0, now=3000.0)
    first = store.claim_next_series()
    assert first is not None and first.series_uid == "old"
    assert first.state == PROCESSING and first.attempts == 1
    assert store.get_series("old").state == PROCESSING
    assert store.get_series("old").updated_at == first.updated_at
    second = store.claim_next_series()
    assert second is not None and second.series_uid == "new"
    assert store.claim_next_series() is None
    assert store.counts() == {"series_processing": 2}


def test_finish_series_sets_the_outcome(store: StateStore) -> None:
    for series, outcome in (("d", DONE), ("r", REJECTED), ("f", FAILED)):
        record(store, f"{series}.1", series=series, now=1000.0)
        store.queue_quiet_series(10.0, now=1010.0)
        row = store.claim_next_series()
        assert row.series_uid == series
        stored = store.finish_series(series, outcome, f"why {series}", row.updated_at)
        assert stored == outcome
        assert store.get_series(series).state == outcome
        assert store.get_series(series).reason == f"why {series}"
    with pytest.raises(ValueError, match="not an outcome"):
        store.finish_series("d", PROCESSING, None, 0.0)
    with pytest.raises(KeyError):
        store.finish_series("unknown", DONE, None, 0.0)


def test_instance_arriving_during_processing_sends_the_series_back_to_receiving(store: StateStore) -> None:
    record(store, "s.1", series="s", now=1000.0)
    store.queue_quiet_series(10.0, now=1010.0)
    row = store.claim_next_series()
    record(store, "s.2", series="s", now=row.updated_at + 0.5)
    assert store.get_series("s").state == PROCESSING  # the worker still owns it
    assert store.get_series("s").instance_count == 2
    assert store.finish_series("s", DONE, "ok", row.updated_at) == RECEIVING
    after = store.get_series("s")
    assert after.state == RECEIVING and after.reason is None
    # The completion timer restarts from the late instance.
    assert store.queue_quiet_series(10.0, now=row.updated_at + 10.4) == []
    assert store.queue_quiet_series(10.0, now=row.updated_at + 10.5) == ["s"]
    assert store.claim_next_series().attempts == 2


def test_instance_committed_after_a_claim_is_never_older_than_the_claim(tmp_path: Path) -> None:
    """record_instance timestamps under the write lock.

    The listener calls record_instance without ``now``. If its timestamp were
    taken before waiting for the database lock, an instance committed *after*
    a claim could carry a time *before* it, and finish_series would mark the
    series done without that instance.
    """
    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    record(store, "s.1", series="s", now=1000.0)
    blocker = sqlite3.connect(path, isolation_level=None, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # a worker holding the write lock, about to claim
    listener = threading.Thread(target=record, args=(StateStore(path), "s.2", "s"))
    listener.start()
    time.sleep(0.3)  # the listener is now waiting for the lock
    claimed_at = time.time()
    blocker.execute("UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ?", (PROCESSING, claimed_at, "s"))
    blocker.execute("COMMIT")
    listener.join(timeout=30)
    assert not listener.is_alive()
    assert store.get_series("s").instance_count == 2
    assert store.get_series("s").last_received > claimed_at
    assert store.finish_series("s", DONE, None, claimed_at) == RECEIVING
    blocker.close()
    store.close()


def test_instance_for_a_finished_series_reopens_it(store: StateStore) -> None:
    for uid, outcome in (("s", REJECTED), ("t", FAILED)):
        record(store, f"{uid}.1", series=uid, now=1000.0)
        store.queue_quiet_series(10.0, now=1010.0)
        row = store.claim_next_series()
        store.finish_series(uid, outcome, "why", row.updated_at)
    record(store, "s.1", series="s", now=row.updated_at + 100)  # the same instance again: same decision
    assert store.get_series("s").state == REJECTED
    record(store, "s.2", series="s", now=row.updated_at + 100)  # a new instance: decide again
    after = store.get_series("s")
    assert after.state == RECEIVING and after.reason is None and after.instance_count == 2
    record(store, "t.1", series="t", now=row.updated_at + 100)  # a re-send retries a failed series
    assert store.get_series("t").state == RECEIVING


def test_requeue_interrupted_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = StateStore(path)
    record(first, "p.1", series="p", now=1000.0)
    record(first, "q.1", series="q", now=1001.0)
    record(first, "r.1", series="r", now=5000.0)
    first.queue_quiet_series(10.0, now=1020.0)
    claimed = first.claim_next_series()
    assert claimed.series_uid == "p"
    # Simulated crash: the process is gone without finish_series or close().
    del first

    second = StateStore(path)
    assert second.get_series("p").state == PROCESSING
    assert second.requeue_interrupted() == ["p"]
    assert second.get_series("p").state == QUEUED
    assert second.get_series("q").state == QUEUED
    assert second.get_series("r").state == RECEIVING
    assert second.requeue_interrupted() == []
    again = second.claim_next_series()
    assert again.series_uid == "p" and again.attempts == 2
    second.close()


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    record(store, "a.1", series="a", now=1000.0)
    record(store, "a.2", series="a", now=1001.0)
    store.queue_quiet_series(10.0, now=2000.0)
    row = store.claim_next_series()
    store.finish_series("a", DONE, "2 findings", row.updated_at)
    enqueue(store, "seg.1", ["PACS@h:104"], series="a")
    store.close()

    reopened = StateStore(path)
    a = reopened.get_series("a")
    assert (a.state, a.reason, a.instance_count, a.attempts) == (DONE, "2 findings", 2, 1)
    assert reopened.series_instances("a") == ["/spool/a/a.1.dcm", "/spool/a/a.2.dcm"]
    assert [(o.sop_instance_uid, o.destination, o.state) for o in reopened.list_outbox()] == [
        ("seg.1", "PACS@h:104", PENDING)
    ]
    assert record(reopened, "a.1", series="a", now=3000.0) is False  # still known as a duplicate
    reopened.close()


# --------------------------------------------------------------------------- outbox


def test_enqueue_is_idempotent_per_object_and_destination(store: StateStore) -> None:
    enqueue(store, "seg.1", ["A@h:1", "B@h:2"])
    enqueue(store, "seg.1", ["A@h:1", "B@h:2"])
    enqueue(store, "seg.1", ["A@h:1"], path="/results/newer.dcm")
    enqueue(store, "sr.1", ["A@h:1"])
    items = store.list_outbox()
    assert sorted((o.sop_instance_uid, o.destination) for o in items) == [
        ("seg.1", "A@h:1"), ("seg.1", "B@h:2"), ("sr.1", "A@h:1"),
    ]
    by_key = {(o.sop_instance_uid, o.destination): o for o in items}
    assert by_key[("seg.1", "A@h:1")].path == "/results/newer.dcm"  # the latest file wins
    assert all(o.state == PENDING and o.attempts == 0 for o in items)
    assert store.counts()["outbox_pending"] == 3


def test_due_outbox_honours_next_attempt_and_mark_sent(store: StateStore) -> None:
    enqueue(store, "seg.1", ["A@h:1"])
    enqueue(store, "sr.1", ["A@h:1"])
    now = time.time() + 1
    due = store.due_outbox(now)
    assert [o.sop_instance_uid for o in due] == ["seg.1", "sr.1"]
    seg, sr = due

    store.mark_attempt_failed(seg.id, "0xA700", "out of resources", retry_at=now + 60)
    assert [o.sop_instance_uid for o in store.due_outbox(now)] == ["sr.1"]
    assert store.due_outbox(now + 59.9, limit=10)[0].sop_instance_uid == "sr.1"
    assert [o.sop_instance_uid for o in store.due_outbox(now + 60)] == ["seg.1", "sr.1"]
    failed = {o.id: o for o in store.list_outbox()}[seg.id]
    assert (failed.attempts, failed.last_status, failed.last_error, failed.state) == (
        1, "0xA700", "out of resources", PENDING,
    )

    store.mark_sent(sr.id, "0x0000")
    assert [o.sop_instance_uid for o in store.due_outbox(now + 1000)] == ["seg.1"]
    sent = {o.id: o for o in store.list_outbox()}[sr.id]
    assert sent.state == SENT and sent.last_status == "0x0000" and sent.sent_at is not None
    assert sent.attempts == 1 and sent.last_error is None
    assert store.counts()["outbox_sent"] == 1 and store.counts()["outbox_pending"] == 1
    assert len(store.due_outbox(now + 1000, limit=1)) == 1


def test_due_outbox_groups_by_destination(store: StateStore) -> None:
    enqueue(store, "seg.1", ["B@h:2", "A@h:1"])
    enqueue(store, "sr.1", ["B@h:2", "A@h:1"])
    due = store.due_outbox(time.time() + 1)
    assert [(o.destination, o.sop_instance_uid) for o in due] == [
        ("A@h:1", "seg.1"), ("A@h:1", "sr.1"), ("B@h:2", "seg.1"), ("B@h:2", "sr.1"),
    ]


def test_record_results_queues_each_object_only_for_its_destinations(store: StateStore) -> None:
    record(store, "s.1", series="s", now=100.0)
    store.record_results("s", 1, '[{"modality": "SEG"}]', [
        ("seg.1", SEG, "/results/seg.dcm", ["A@h:1", "web"]),
        ("sr.1", SR, "/results/sr.dcm", ["web"]),
        ("ko.1", "1.2.840.10008.5.1.4.1.1.88.59", "/results/ko.dcm", []),
    ])
    assert sorted((o.sop_instance_uid, o.destination) for o in store.list_outbox()) == [
        ("seg.1", "A@h:1"), ("seg.1", "web"), ("sr.1", "web"),
    ]
    assert store.get_series("s").version == 1
    assert all(o.queued_at == o.created_at for o in store.list_outbox())


def test_dead_letters_retry_and_purge(store: StateStore) -> None:
    for sop in ("a", "b", "c", "d"):
        enqueue(store, sop, ["P@h:1"])
    enqueue(store, "e", ["web"])
    ids = {o.sop_instance_uid: o.id for o in store.list_outbox()}
    store.mark_sent(ids["a"], "0x0000 success")
    store.mark_failed([(ids["b"], "0x0122 refused: SOP class not supported", "refused by P", None),
                       (ids["c"], None, "cannot connect", time.time() + 600),
                       (ids["e"], "HTTP 401 Unauthorized", "STOW-RS request refused", None)])
    store.mark_failed([(ids["a"], None, "late failure report", None)])  # a sent item stays sent
    rows = {o.sop_instance_uid: o for o in store.list_outbox()}
    assert (rows["a"].state, rows["a"].last_error) == (SENT, None)
    assert (rows["b"].state, rows["b"].attempts, rows["b"].last_status) == (
        DEAD, 1, "0x0122 refused: SOP class not supported")
    assert rows["b"].dead_at is not None and rows["c"].state == PENDING
    assert [o.sop_instance_uid for o in store.list_outbox(state=DEAD)] == ["e", "b"]
    assert [o.sop_instance_uid for o in store.list_outbox(destination="web")] == ["e"]
    assert store.outbox_counts() == {("P@h:1", SENT): 1, ("P@h:1", DEAD): 1, ("P@h:1", PENDING): 2, ("web", DEAD): 1}
    assert store.due_destinations() == ["P@h:1"]  # d is due; c waits; dead items are never due

    with pytest.raises(ValueError):
        store.retry_outbox()
    # --destination: dead and failed pending items of that destination, never sent or untried ones.
    assert sorted(o.sop_instance_uid for o in store.retry_outbox(destination="P@h:1", now=5000.0)) == ["b", "c"]
    rows = {o.sop_instance_uid: o for o in store.list_outbox()}
    for sop in ("b", "c"):
        assert (rows[sop].state, rows[sop].attempts, rows[sop].next_attempt_at, rows[sop].queued_at) == (
            PENDING, 0, 5000.0, 5000.0)
        assert rows[sop].age_from == 5000.0 and rows[sop].dead_at is None
    assert rows["b"].last_status == "0x0122 refused: SOP class not supported"  # history kept
    assert rows["a"].state == SENT and rows["d"].attempts == 0
    # --all-dead, --id.
    assert [o.sop_instance_uid for o in store.retry_outbox(all_dead=True)] == ["e"]
    store.mark_dead(ids["b"], "0xC000 error: cannot understand", "refused by P")
    assert store.retry_outbox(ids=[ids["a"], ids["d"]]) == []  # sent, and pending without a failure
    assert [o.id for o in store.retry_outbox(ids=[ids["b"]], all_dead=True)] == [ids["b"]]
    assert [o.id for o in store.outbox_items([ids["e"], 999, ids["a"]])] == [ids["a"], ids["e"]]

    # purge: sent before a time, dead ones; pending ones never.
    store.mark_dead(ids["c"], None, "gave up")
    with pytest.raises(ValueError):
        store.purge_outbox()
    assert store.purge_outbox(sent_before=time.time() - 60) == 0
    assert store.purge_outbox(dead_before=time.time() + 1, destination="web") == 0
    assert store.purge_outbox(sent_before=time.time() + 1, dead_before=time.time() + 1) == 2
    assert sorted(o.sop_instance_uid for o in store.list_outbox()) == ["b", "d", "e"]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_record_instance_loses_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def receive(thread: int) -> None:
        try:
            barrier.wait()
            for i in range(50):
                assert record(store, f"1.2.3.{thread}.{i}", series="shared") is True
                if i % 10 == 0:  # and one series per thread, interleaved
                    record(store, f"9.{thread}.{i}", series=f"own.{thread}")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    shared = store.get_series("shared")
    assert shared.instance_count == 200
    assert len(store.series_instances("shared")) == 200
    for t in range(4):
        assert store.get_series(f"own.{t}").instance_count == 5
    check = sqlite3.connect(tmp_path / "state.sqlite3")
    assert check.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 220
    check.close()
    store.close()


# --------------------------------------------------------------------------- faster completion


def test_gap_free_rule() -> None:
    axial = [AXIAL] * 4
    assert gap_free([0.0, 1.0, 2.0, 3.0], axial) is None
    assert gap_free([3.0, 0.0, 2.0, 1.0], axial) is None  # order of arrival does not matter
    assert gap_free([0.0, 1.25, 2.5, 3.75], axial) is None
    assert "gap" in gap_free([0.0, 1.0, 3.0, 4.0], axial)
    assert "duplicate" in gap_free([0.0, 0.0, 0.0, 1.0], axial)
    assert gap_free([0.0, 1.0, None, 3.0], axial) is not None
    assert gap_free([0.0, 1.0, 2.0, 3.0], [AXIAL, AXIAL, "other", AXIAL]) is not None
    assert gap_free([0.0], [AXIAL]) is not None


def test_gap_free_is_the_pipelines_spacing_rule() -> None:
    """Completion on release and the volume loader share one tolerance (pipelines.volume.geometry).

    Position jitter the pipeline accepts does not hold a series back for the quiet
    timer; a missing slice, which the pipeline rejects, never lets it finish early.
    """
    axial = [AXIAL] * 6
    jitter = 0.8 * SPACING_TOLERANCE * 2.5
    jittered = [0.0, 2.5, 5.0 + jitter, 7.5, 10.0 - jitter, 12.5]
    assert gap_free(jittered, axial) is None
    check_slice_spacing(jittered)  # the pipeline accepts the same run
    gap = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]
    problem = gap_free(gap, axial)
    assert problem is not None and "missing slices" in problem
    with pytest.raises(SeriesRejected, match="missing slices"):
        check_slice_spacing(gap)


def test_release_completes_a_gap_free_series_carried_whole(store: StateStore) -> None:
    for i in range(5):
        record(store, f"a.{i}", series="a", position=i * 2.5, association="assoc-1", now=100.0 + i)
    for i in (0, 1, 3, 4):  # a gap: slice 2 is missing
        record(store, f"b.{i}", series="b", position=float(i), association="assoc-1", now=100.0)
    record(store, "c.0", series="c", position=0.0, association="assoc-1", now=100.0)  # c also came through
    record(store, "c.1", series="c", position=1.0, association="assoc-2", now=100.0)  # another association
    record(store, "d.0", series="d", position=0.0, association="assoc-2", now=100.0)
    assert store.complete_released("assoc-1", now=200.0) == [("a", "sender released the association, "
                                                                    "gap-free run of 5 slices")]
    assert store.get_series("a").state == QUEUED
    assert store.get_series("a").completion.startswith("sender released")
    for uid in "bcd":
        assert store.get_series(uid).state == RECEIVING  # left to the quiet timer
    assert store.complete_released("assoc-1", now=201.0) == []  # a is no longer receiving
    assert store.queue_quiet_series(10.0, now=1000.0) == ["b", "c", "d"]
    assert store.get_series("b").completion == "quiet for 10 s"


def test_release_completes_a_multiframe_instance(store: StateStore) -> None:
    record(store, "e.0", series="e", frames=120, association="assoc-e")
    assert [uid for uid, _ in store.complete_released("assoc-e")] == ["e"]


def test_expected_count_completes_without_release(store: StateStore) -> None:
    for i in range(3):
        record(store, f"f.{i}", series="f", position=float(i), expected=4, association="x")
        assert store.get_series("f").state == RECEIVING
    record(store, "f.3", series="f", position=3.0, expected=4, association="x")
    assert store.get_series("f").state == QUEUED
    assert store.get_series("f").completion == "expected count 4 reached, gap-free run of 4 slices"
    # The count is reached but with a gap: the quiet timer decides.
    for i in (0, 1, 2, 5):
        record(store, f"g.{i}", series="g", position=float(i), expected=4)
    assert store.get_series("g").state == RECEIVING


def test_resent_instance_does_not_reopen_a_finished_series(store: StateStore) -> None:
    record(store, "h.0", series="h", now=100.0)
    store.queue_quiet_series(10.0, now=200.0)
    row = store.claim_next_series()
    store.finish_series("h", DONE, "ok", row.updated_at, version=1, results="[]")
    assert record(store, "h.0", series="h") is False  # same size: a re-send
    assert store.get_series("h").state == DONE
    assert record(store, "h.1", series="h") is True  # a late new instance: a new version will follow
    assert store.get_series("h").state == RECEIVING
    assert store.get_series("h").version == 1 and store.get_series("h").results == "[]"


def test_finish_records_the_version_even_when_a_late_instance_reopens(store: StateStore) -> None:
    record(store, "k.0", series="k", now=100.0)
    store.queue_quiet_series(10.0, now=200.0)
    row = store.claim_next_series()
    record(store, "k.1", series="k")  # arrives while processing
    assert store.finish_series("k", DONE, "ok", row.updated_at, version=1, results='["x"]') == RECEIVING
    assert store.get_series("k").version == 1


def old_database(tmp_path: Path, script: str) -> Path:
    """A database made by an earlier version of the node: ``script`` run by plain sqlite3."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()
    return path


def test_old_database_is_migrated(tmp_path: Path) -> None:
    path = old_database(
        tmp_path,
        "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,"
        " sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, calling_ae TEXT NOT NULL,"
        " received_at REAL NOT NULL);"
        "CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL,"
        " first_received REAL NOT NULL, last_received REAL NOT NULL, instance_count INTEGER NOT NULL DEFAULT 0,"
        " reason TEXT, updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO series VALUES ('s', '1', 'done', 1, 1, 1, 'ok', 1, 1);",
    )
    store = StateStore(path)
    assert store.get_series("s").version == 0
    assert record(store, "s.1", series="s", position=1.0) is True
    store.close()


def test_old_outbox_is_migrated(tmp_path: Path) -> None:
    path = old_database(
        tmp_path,
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL,"
        " sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL, path TEXT NOT NULL, destination TEXT NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_status TEXT,"
        " last_error TEXT, created_at REAL NOT NULL, sent_at REAL, UNIQUE (sop_instance_uid, destination));"
        "INSERT INTO outbox (series_uid, sop_instance_uid, sop_class_uid, path, destination, state, attempts,"
        " next_attempt_at, created_at) VALUES ('s', 'seg.1', '1.2', '/r.dcm', 'P@h:1', 'pending', 7, 10, 5);",
    )
    store = StateStore(path)
    row, = store.list_outbox()
    assert (row.queued_at, row.dead_at, row.age_from, row.attempts) == (None, None, 5.0, 7)
    assert [o.id for o in store.retry_outbox(ids=[row.id], now=50.0)] == [row.id]
    assert store.list_outbox()[0].age_from == 50.0
    store.close()
