"""Retention: received instances deleted after the configured time, results kept until delivered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.store.header import InstanceHeader
from node.store.retention import DAY_S, apply_retention
from node.store.state import DONE, PENDING, SENT, StateStore

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def _series(config: NodeConfig, store: StateStore, uid: str, count: int, finished_at: float) -> list[Path]:
    """A finished series with ``count`` spooled files; returns their paths."""
    paths = []
    for i in range(count):
        path = config.spool_dir / "study" / uid / f"{uid}.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"DICM" * 10)
        header = InstanceHeader(study_uid="study", series_uid=uid, sop_instance_uid=f"{uid}.{i}", sop_class_uid=CT,
                                position=float(i), orientation=None, images_in_acquisition=None,
                                number_of_frames=None)
        store.record_instance(header, path=str(path), size=40, calling_ae="CT1", now=finished_at - 100)
        paths.append(path)
    store.queue_quiet_series(1.0, now=finished_at)
    row = store.claim_next_series()
    assert row is not None and row.series_uid == uid
    store.finish_series(uid, DONE, "summary", row.updated_at)
    with store._tx() as db:  # the outcome was recorded at finished_at
        db.execute("UPDATE series SET updated_at = ? WHERE series_uid = ?", (finished_at, uid))
    return paths


def _result(config: NodeConfig, store: StateStore, uid: str, destinations: list[str]) -> Path:
    path = config.results_dir / "study" / f"{uid}-seg" / f"{uid}.seg.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SEG")
    store.enqueue_result(series_uid=uid, sop_instance_uid=f"{uid}.seg", sop_class_uid=SEG, path=str(path),
                         destinations=destinations)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[NodeConfig, StateStore]:
    config = NodeConfig(data_dir=tmp_path / "data", retain_input_days=30, retain_results_days=7)
    return config, StateStore(config.state_path)


def test_inputs_of_old_finished_series_are_deleted_and_recent_ones_kept(setup) -> None:  # noqa: ANN001
    config, store = setup
    now = time.time()
    old = _series(config, store, "old", 3, finished_at=now - 31 * DAY_S)
    recent = _series(config, store, "recent", 2, finished_at=now - 29 * DAY_S)
    deleted, _ = apply_retention(config, store, now=now)
    assert deleted == 3
    assert not any(p.exists() for p in old) and not old[0].parent.exists()  # empty folders go too
    assert all(p.exists() for p in recent)
    assert store.series_instances("old") == [] and store.get_series("old").input_purged_at == pytest.approx(now)
    assert store.get_series("old").state == DONE  # the series' history stays
    assert apply_retention(config, store, now=now) == (0, 0)  # idempotent


def test_results_are_kept_until_every_destination_has_them(setup) -> None:  # noqa: ANN001
    config, store = setup
    now = time.time()
    _series(config, store, "s", 1, finished_at=now - 40 * DAY_S)
    delivered = _result(config, store, "s", ["PACS@h:104", "web"])
    waiting = _result(config, store, "t", ["PACS@h:104", "web"])
    for row in store.list_outbox():
        if row.path == str(delivered) or row.destination == "PACS@h:104":
            store.mark_sent(row.id, "0x0000")
    with store._tx() as db:
        db.execute("UPDATE outbox SET sent_at = ? WHERE state = ?", (now - 8 * DAY_S, SENT))
    _, results = apply_retention(config, store, now=now)
    assert results == 1
    assert not delivered.exists() and waiting.exists()  # "t" still waits for "web"
    assert {(r.path, r.state) for r in store.list_outbox()} == {
        (str(waiting), SENT), (str(waiting), PENDING),
    }


def test_zero_keeps_everything(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path / "data", retain_input_days=0, retain_results_days=0)
    store = StateStore(config.state_path)
    now = time.time()
    paths = _series(config, store, "old", 2, finished_at=now - 400 * DAY_S)
    result = _result(config, store, "old", ["web"])
    store.mark_sent(store.list_outbox()[0].id, "200")
    assert apply_retention(config, store, now=now + 400 * DAY_S) == (0, 0)
    assert all(p.exists() for p in paths) and result.exists()
