"""Metrics, structured logs and the audit trail: the admin's view of the node.

The exposition is read back with prometheus_client's own parser and the audit
codes are checked against pydicom's copy of the DICOM code dictionary, so
neither test trusts the code it checks. Everything runs in-process: no
network except one UDP datagram on loopback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.http.server import metrics_route
from node.observe.audit import (
    ACTIONS,
    OUTCOMES,
    AuditError,
    AuditTrail,
    TransferTally,
    read_events,
    transfer_outcome,
)
from node.observe.logs import NOISY_LOGGERS, configure_logging, patient_text
from node.observe.metrics import NodeMetrics, store_counts
from node.store.header import InstanceHeader
from node.store.state import StateStore
from pipelines.timing import StageTiming

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"


# -- metrics ------------------------------------------------------------------


def scrape(metrics: NodeMetrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} parsed from the text exposition."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_exposition_parses_and_hooks_change_values(tmp_path: Path) -> None:
    metrics = NodeMetrics(tmp_path, version="1.2.3")
    before = scrape(metrics)
    assert value(before, "pacs_ai_node_build_info", version="1.2.3") == 1
    assert value(before, "pacs_ai_node_disk_free_bytes") > 0
    assert value(before, "pacs_ai_node_disk_total_bytes") >= value(before, "pacs_ai_node_disk_free_bytes")
    assert value(before, "pacs_ai_node_instances_received_total", source="dicom") is None  # nothing yet

    metrics.instance_received("dicom")
    metrics.instance_received("dicom")
    metrics.instance_received("stowrs")
    metrics.instance_refused(0xA700)
    metrics.instance_refused("0xa700")
    metrics.instance_refused(0x0122)
    metrics.association("accepted")
    metrics.association("rejected")
    metrics.series_finished("done")
    metrics.series_finished("rejected", rules=("no_contrast_agent", "slice_thickness", "no_contrast_agent"))
    metrics.series_finished("rejected", rules=["geometry"])
    metrics.series_finished("failed")
    metrics.stage_timings([StageTiming("eligibility", 0.004),
                           StageTiming("organs", 0.42, "reference-cascade", model=True),
                           StageTiming("postprocess", 0.07, "reference-cascade"),
                           StageTiming("encode", 0.76, "reference-cascade"), StageTiming("total", 1.54),
                           StageTiming("bogus", float("inf"))])
    metrics.send_attempt("ORTHANC@127.0.0.1:4343", "ok")
    metrics.send_attempt("ORTHANC@127.0.0.1:4343", "warning")
    metrics.send_attempt("ORTHANC@127.0.0.1:4343", "failed", count=3)
    metrics.send_attempt("ORTHANC@127.0.0.1:4343", "failed", dead=True)

    after = scrape(metrics)
    assert value(after, "pacs_ai_node_instances_received_total", source="dicom") == 2
    assert value(after, "pacs_ai_node_instances_received_total", source="stowrs") == 1
    assert value(after, "pacs_ai_node_instances_refused_total", status="0xA700") == 2
    assert value(after, "pacs_ai_node_instances_refused_total", status="0x0122") == 1
    assert value(after, "pacs_ai_node_associations_total", result="accepted") == 1
    assert value(after, "pacs_ai_node_associations_total", result="rejected") == 1
    assert value(after, "pacs_ai_node_series_finished_total", state="done") == 1
    assert value(after, "pacs_ai_node_series_finished_total", state="rejected") == 2
    assert value(after, "pacs_ai_node_series_finished_total", state="failed") == 1
    for rule in ("no_contrast_agent", "slice_thickness", "geometry"):
        assert value(after, "pacs_ai_node_series_rejected_total", rule=rule) == 1
    assert value(after, "pacs_ai_node_series_rejected_total", rule="other") is None  # failures are not rejections
    assert value(after, "pacs_ai_node_model_inference_seconds_count", bundle="reference-cascade",
                 stage="organs") == 1
    assert value(after, "pacs_ai_node_model_inference_seconds_sum", bundle="reference-cascade",
                 stage="organs") == pytest.approx(0.42)
    assert value(after, "pacs_ai_node_model_inference_seconds_bucket", bundle="reference-cascade",
                 stage="organs", le="0.25") == 0
    assert value(after, "pacs_ai_node_model_inference_seconds_bucket", bundle="reference-cascade",
                 stage="organs", le="0.5") == 1
    assert value(after, "pacs_ai_node_stage_duration_seconds_count", stage="encode", bundle="reference-cascade") == 1
    assert value(after, "pacs_ai_node_stage_duration_seconds_count", stage="eligibility", bundle="") == 1
    assert value(after, "pacs_ai_node_stage_duration_seconds_bucket", stage="total", bundle="", le="600.0") == 1
    assert value(after, "pacs_ai_node_stage_duration_seconds_count", stage="bogus", bundle="") is None
    assert value(after, "pacs_ai_node_stage_duration_seconds_count", stage="negative", bundle="") is None
    dest = "ORTHANC@127.0.0.1:4343"
    assert value(after, "pacs_ai_node_send_attempts_total", destination=dest, result="ok") == 1
    assert value(after, "pacs_ai_node_send_attempts_total", destination=dest, result="warning") == 1
    assert value(after, "pacs_ai_node_send_attempts_total", destination=dest, result="failed") == 4
    assert value(after, "pacs_ai_node_send_failures_total", destination=dest, disposition="retry") == 3
    assert value(after, "pacs_ai_node_send_failures_total", destination=dest, disposition="dead") == 1
    # No callback given: no queue gauges at all rather than zeros that look real.
    assert not any(name.startswith("pacs_ai_node_queue_depth") for name, _ in after)


def test_hooks_refuse_unknown_label_values(tmp_path: Path) -> None:
    metrics = NodeMetrics(tmp_path, version="0")
    with pytest.raises(ValueError, match="'ftp'"):
        metrics.instance_received("ftp")
    with pytest.raises(ValueError, match="'maybe'"):
        metrics.association("maybe")
    with pytest.raises(ValueError, match="'receiving'"):
        metrics.series_finished("receiving")
    with pytest.raises(ValueError, match="'lost'"):
        metrics.send_attempt("X@h:1", "lost")
    with pytest.raises(ValueError, match="'busy'"):
        metrics.instance_refused("busy")
    with pytest.raises(ValueError, match="16-bit"):
        metrics.instance_refused(0x10000)
    with pytest.raises(TypeError, match="counts"):
        NodeMetrics(tmp_path, counts={"series": {}})  # type: ignore[arg-type]


def test_each_node_metrics_has_its_own_registry(tmp_path: Path) -> None:
    first, second = NodeMetrics(tmp_path, version="0"), NodeMetrics(tmp_path, version="0")
    first.instance_received("dicom")
    assert value(scrape(first), "pacs_ai_node_instances_received_total", source="dicom") == 1
    assert value(scrape(second), "pacs_ai_node_instances_received_total", source="dicom") is None
    assert ("pacs_ai_node_instances_received_total", {"source": "dicom"}, 1.0) in list(first.samples())


def test_scrape_time_gauges_come_from_the_callback(tmp_path: Path) -> None:
    calls = []
    counts: dict[str, Any] = {"series": {"queued": 2}, "outbox_pending": {"PACS@h:104": 5}}

    def callback() -> dict[str, Any]:
        calls.append(1)
        return counts

    metrics = NodeMetrics(tmp_path, callback, version="0")
    assert calls == []  # registering does not read the state
    first = scrape(metrics)
    assert len(calls) == 1
    assert value(first, "pacs_ai_node_queue_depth", state="queued") == 2
    assert value(first, "pacs_ai_node_queue_depth", state="receiving") == 0  # always there, for alerts
    assert value(first, "pacs_ai_node_queue_depth", state="processing") == 0
    assert value(first, "pacs_ai_node_outbox_pending", destination="PACS@h:104") == 5
    assert value(first, "pacs_ai_node_state_store_up") == 1

    counts = {"series": {"queued": 0, "processing": 1}, "outbox_pending": {}, "outbox_dead": {"PACS@h:104": 1}}
    second = scrape(metrics)
    assert len(calls) == 2
    assert value(second, "pacs_ai_node_queue_depth", state="queued") == 0
    assert value(second, "pacs_ai_node_queue_depth", state="processing") == 1
    assert value(second, "pacs_ai_node_outbox_pending", destination="PACS@h:104") is None  # not stale
    assert value(second, "pacs_ai_node_outbox_dead", destination="PACS@h:104") == 1

    def broken() -> dict[str, Any]:
        raise RuntimeError("database is locked")

    failing = scrape(NodeMetrics(tmp_path, broken, version="0"))
    assert value(failing, "pacs_ai_node_state_store_up") == 0
    assert value(failing, "pacs_ai_node_disk_free_bytes") > 0  # the rest of the scrape still works


def test_store_counts_reads_a_state_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    for n, series in enumerate(("1.2.3.1", "1.2.3.1", "1.2.3.2")):
        header = InstanceHeader(STUDY, series, f"1.2.3.9.{n}", CT, float(n), "1\\0\\0\\0\\1\\0", None, None)
        store.record_instance(header, path=f"/spool/{n}.dcm", size=1, calling_ae="CT1")
    store.enqueue_result(series_uid="1.2.3.1", sop_instance_uid="2.25.1", sop_class_uid=CT, path="/r/1.dcm",
                         destinations=["A@h:1", "B@h:2"])
    store.enqueue_result(series_uid="1.2.3.1", sop_instance_uid="2.25.2", sop_class_uid=CT, path="/r/2.dcm",
                         destinations=["A@h:1"])
    item = next(i for i in store.list_outbox() if i.destination == "B@h:2")
    store.mark_dead(item.id, None, "refused")
    samples = scrape(NodeMetrics(tmp_path, store_counts(store), version="0"))
    assert value(samples, "pacs_ai_node_queue_depth", state="receiving") == 2
    assert value(samples, "pacs_ai_node_queue_depth", state="queued") == 0
    assert value(samples, "pacs_ai_node_outbox_pending", destination="A@h:1") == 2
    assert value(samples, "pacs_ai_node_outbox_pending", destination="B@h:2") is None
    assert value(samples, "pacs_ai_node_outbox_dead", destination="B@h:2") == 1
    store.close()


def test_timing_labels() -> None:
    assert StageTiming("organs", 0.4, "reference-cascade", model=True).label == "model reference-cascade/organs"
    assert StageTiming("encode", 0.1, "body-lungs").label == "encode body-lungs"
    assert StageTiming("eligibility", 0.0).label == "eligibility"
    for seconds in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            StageTiming("total", seconds)


def test_metrics_route_serves_the_exposition(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    metrics = NodeMetrics(tmp_path, lambda: {"series": {"queued": 3}}, version="9.9")
    metrics.instance_received("stowrs")
    with TestClient(Starlette(routes=[metrics_route(metrics)])) as client:
        response = client.get("/metrics")
        assert client.post("/metrics").status_code == 405
    assert response.status_code == 200
    assert response.headers["content-type"] == metrics.render()[1]
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert "pacs_ai_node_queue_depth" in families and "pacs_ai_node_build_info" in families


# -- logs ---------------------------------------------------------------------


@pytest.fixture
def restore_logging():  # noqa: ANN201
    """configure_logging changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_extra_fields(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    log = logging.getLogger("node.test")
    log.info("series %s processed", "1.2.3", extra={"series_uid": "1.2.3", "study_uid": "1.2", "job_id": 7,
                                                    "duration_s": 1.54, "destination": Path("/not/json"),
                                                    "unlisted": "left out"})
    log.debug("not shown at INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("worker error", extra={"calling_ae": "CT1", "sop_instance_uid": "1.2.3.4"})
    first, second = json_lines(stream)
    assert first["message"] == "series 1.2.3 processed"
    assert first["level"] == "INFO" and first["logger"] == "node.test"
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert first["time"].endswith("Z")
    assert (first["series_uid"], first["study_uid"], first["job_id"], first["duration_s"]) == ("1.2.3", "1.2", 7, 1.54)
    assert first["destination"] == "/not/json"
    assert "unlisted" not in first and "exception" not in first
    assert second["level"] == "ERROR" and second["calling_ae"] == "CT1"
    assert second["exception"].startswith("Traceback") and "ValueError: boom" in second["exception"]


def test_noisy_loggers_are_clamped(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", json=True, stream=stream)
    for name in NOISY_LOGGERS:
        assert logging.getLogger(name).level == logging.WARNING
    logging.getLogger("pynetdicom.assoc").debug("dataset with PatientName Doe^Jane")
    logging.getLogger("pynetdicom.assoc").info("association accepted")
    logging.getLogger("pynetdicom.assoc").warning("peer aborted")
    logging.getLogger("node.receive.listener").debug("own debug line")
    assert [line["message"] for line in json_lines(stream)] == ["peer aborted", "own debug line"]
    configure_logging("ERROR", stream=stream)
    assert logging.getLogger("highdicom").level == logging.ERROR


def test_configure_logging_replaces_its_own_handler_only(restore_logging: None) -> None:
    root = logging.getLogger()
    others = [h for h in root.handlers]
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", stream=first)
    configure_logging("INFO", json=True, stream=second)
    logging.getLogger("node.x").info("hello")
    assert first.getvalue() == ""
    assert json_lines(second)[0]["message"] == "hello"
    assert len([h for h in root.handlers if h not in others]) == 1
    assert all(h in root.handlers for h in others)  # pytest's capture handlers stay
    plain = io.StringIO()
    configure_logging("INFO", stream=plain)
    logging.getLogger("node.x").warning("plain line")
    assert "WARNING node.x: plain line" in plain.getvalue()
    with pytest.raises(ValueError, match="'verbose'"):
        configure_logging("verbose")


def test_json_lines_of_a_processed_series_carry_its_uid(restore_logging: None, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's lines about one series carry ``series_uid`` (and the duration once processed)."""
    from node.config import NodeConfig
    from node.work import worker as worker_module
    from node.work.orchestrate import SeriesDone, SeriesRefused
    from pipelines.analysis import SeriesResult

    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    store = StateStore(tmp_path / "state.sqlite3")
    config = NodeConfig(data_dir=tmp_path / "data")
    metrics = NodeMetrics(tmp_path, version="0")
    outcomes = {
        "1.2.3.1": SeriesDone(SeriesResult((), (StageTiming("total", 0.25),)), (),
                              (StageTiming("screen and load", 0.1), StageTiming("total", 0.25))),
        "1.2.3.2": SeriesRefused("slice_thickness: slice thickness over 5 mm (7.0)", ("slice_thickness",)),
    }
    monkeypatch.setattr(worker_module, "process_instances", lambda paths, *args, **kwargs: outcomes[
        Path(paths[0]).parent.name])
    worker = worker_module.Worker(config, store, None, None, metrics=metrics)  # type: ignore[arg-type]
    for series in outcomes:
        header = InstanceHeader(STUDY, series, f"{series}.1", CT, 0.0, "1\\0\\0\\0\\1\\0", None, None)
        store.record_instance(header, path=f"/spool/{series}/1.dcm", size=1, calling_ae="CT1")
    assert store.queue_quiet_series(0.0)
    for _ in outcomes:
        row = store.claim_next_series()
        assert row is not None
        worker.process_series(row.series_uid, row.updated_at)
    lines = json_lines(stream)
    [processed] = [line for line in lines if "processed in" in line["message"]]
    assert processed["series_uid"] == "1.2.3.1" and processed["duration_s"] >= 0
    [rejected] = [line for line in lines if "rejected" in line["message"]]
    assert rejected["series_uid"] == "1.2.3.2"
    assert value(scrape(metrics), "pacs_ai_node_series_rejected_total", rule="slice_thickness") == 1
    assert json.loads(store.get_series("1.2.3.1").timings) == {"screen and load": 0.1, "total": 0.25}
    store.close()


def test_json_lines_of_an_association_carry_its_id(restore_logging: None, tmp_path: Path) -> None:
    """The listener's lines about one association carry its short ``association_id`` and ``calling_ae``."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node.config import NodeConfig
    from node.receive.intake import Intake
    from node.receive.listener import DicomServer
    from node.store.spool import Spool
    from support.processes import free_port

    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    config = NodeConfig(data_dir=tmp_path / "data", port=free_port(), bind_address="127.0.0.1")
    config.data_dir.mkdir(parents=True)
    store = StateStore(config.state_path)
    server = DicomServer(config, Intake(config, Spool(config.spool_dir), store))
    server.start()
    try:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", config.port, ae_title=config.ae_title)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        deadline = time.monotonic() + 10
        while "released" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
        server.stop(5)
        store.close()
    [line] = [line for line in json_lines(stream) if "released" in line["message"]]
    assert len(line["association_id"]) == 8 and line["calling_ae"] == "ECHOSCU"
    assert line["duration_s"] >= 0


def test_patient_text_only_when_configured() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID123"
    assert patient_text(ds, False) == ""
    assert patient_text(ds, True) == "patient Doe^Jane (PID123)"
    assert patient_text(Dataset(), True) == ""
    assert patient_text({"PatientID": "P9"}, True) == "patient (P9)"
    assert patient_text(None, True) == ""


# -- audit --------------------------------------------------------------------


def check_a5(event: dict[str, Any]) -> None:
    """The fields PS3.15 A.5.1 makes mandatory in every audit message, in this JSON form."""
    ident = event["EventIdentification"]
    assert set(ident["EventID"]) == {"code", "scheme", "meaning"}
    assert ident["EventActionCode"] in ACTIONS
    moment = datetime.fromisoformat(ident["EventDateTime"].replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    assert ident["EventOutcomeIndicator"] in OUTCOMES
    for code in ident.get("EventTypeCode", []):
        assert set(code) == {"code", "scheme", "meaning"}
    assert event["ActiveParticipant"]
    for participant in event["ActiveParticipant"]:
        assert isinstance(participant["UserID"], str) and participant["UserID"]
        assert isinstance(participant["UserIsRequestor"], bool)
        assert ("NetworkAccessPointID" in participant) == ("NetworkAccessPointTypeCode" in participant)
        assert participant.get("NetworkAccessPointTypeCode", 1) in (1, 2)
    assert event["AuditSourceIdentification"]["AuditSourceID"]
    for obj in event["ParticipantObjectIdentification"]:
        assert obj["ParticipantObjectTypeCode"] in (1, 2)
        assert set(obj["ParticipantObjectIDTypeCode"]) == {"code", "scheme", "meaning"}
        assert obj["ParticipantObjectID"]


def roles(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["RoleIDCode"][0]["code"]: p for p in event["ActiveParticipant"] if "RoleIDCode" in p}


def test_events_have_the_a5_structure(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path, "AINODE")
    events = [
        audit.application_activity(True),
        audit.instances_received("CT1", "10.0.0.5", STUDY, {CT: 112}),
        audit.instances_sent("pacs", "ORTHANC", "127.0.0.1", STUDY, {"1.2.840.10008.5.1.4.1.1.66.4": 1,
                                                                     "1.2.840.10008.5.1.4.1.1.88.34": 1},
                             4, "SR refused: 0xA700"),
        audit.association_rejected("EVIL", "10.6.6.6", "calling AE title not in the allow-list"),
        audit.admin_action("alice", "10.0.0.9", "outbox retry", {"ids": [3, 4]}),
        audit.application_activity(False, launcher="systemd"),
    ]
    audit.close()
    assert list(read_events(tmp_path)) == events
    for event in events:
        check_a5(event)
    start, received, sent, alert, admin, stop = events
    assert start["EventIdentification"]["EventID"]["code"] == "110100"
    assert start["EventIdentification"]["EventTypeCode"][0]["code"] == "110120"
    assert roles(start)["110150"]["UserID"] == "AINODE"
    assert stop["EventIdentification"]["EventTypeCode"][0]["code"] == "110121"
    assert roles(stop)["110151"]["UserID"] == "systemd"

    assert received["EventIdentification"]["EventID"]["code"] == "110104"
    assert received["EventIdentification"]["EventActionCode"] == "C"
    source, destination = roles(received)["110153"], roles(received)["110152"]
    assert (source["UserID"], source["AlternativeUserID"], source["UserIsRequestor"]) == ("CT1", "AETITLES=CT1", True)
    assert (source["NetworkAccessPointID"], source["NetworkAccessPointTypeCode"]) == ("10.0.0.5", 2)
    assert (destination["UserID"], destination["UserIsRequestor"]) == ("AINODE", False)
    [study] = received["ParticipantObjectIdentification"]
    assert (study["ParticipantObjectTypeCode"], study["ParticipantObjectTypeCodeRole"]) == (2, 3)
    assert study["ParticipantObjectIDTypeCode"]["code"] == "110180"
    assert study["ParticipantObjectID"] == STUDY
    assert study["ParticipantObjectDescription"] == {"SOPClass": [{"UID": CT, "NumberOfInstances": 112}]}

    assert sent["EventIdentification"]["EventActionCode"] == "R"
    assert sent["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert sent["EventIdentification"]["EventOutcomeDescription"] == "SR refused: 0xA700"
    assert roles(sent)["110153"]["UserIsRequestor"] is True
    assert roles(sent)["110152"]["UserName"] == "pacs"
    assert len(sent["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"]) == 2

    assert alert["EventIdentification"]["EventID"]["code"] == "110113"
    assert alert["EventIdentification"]["EventTypeCode"][0]["code"] == "110126"
    assert alert["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"][0]["value"].startswith("calling")
    assert admin["EventIdentification"]["EventTypeCode"][0]["code"] == "110131"
    assert {"type": "ids", "value": "[3, 4]"} in admin["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    assert admin["ActiveParticipant"][0]["UserID"] == "alice"
    web = AuditTrail(tmp_path, "AINODE").record_admin("admin action", {
        "action": "outbox purge", "user": "admin", "client": "10.0.0.9", "purged": 3, "destination": None})
    check_a5(web)
    assert (web["ActiveParticipant"][0]["UserID"], web["ActiveParticipant"][0]["NetworkAccessPointID"]) == (
        "admin", "10.0.0.9")
    details = web["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    assert details == [{"type": "Action", "value": "outbox purge"}, {"type": "purged", "value": "3"},
                       {"type": "destination", "value": "null"}]
    security = AuditTrail(tmp_path, "AINODE").admin_action("root", None, "allow-list changed", security=True)
    assert security["EventIdentification"]["EventTypeCode"][0]["code"] == "110129"
    assert "NetworkAccessPointID" not in security["ActiveParticipant"][0]


def test_audit_codes_match_the_dicom_dictionary() -> None:
    """Every DCM code the audit trail writes, against pydicom's copy of PS3.16."""
    from pydicom.sr._concepts_dict import concepts

    import node.observe.audit as audit

    meanings = {code: meaning for entries in concepts["DCM"].values() for code, (meaning, _) in entries.items()}
    written = [v for v in vars(audit).values() if isinstance(v, audit.Code) and v.scheme == "DCM"]
    assert len(written) >= 14
    for code in written:
        assert meanings.get(code.code) == code.meaning, code


def test_no_patient_identity_unless_enabled(tmp_path: Path) -> None:
    patient = ("PID123", "Doe^Jane")
    default = AuditTrail(tmp_path / "a", "AINODE")
    default.instances_received("CT1", "10.0.0.5", STUDY, {CT: 1}, patient=patient)
    default.instances_sent("pacs", "PACS", "10.0.0.7", STUDY, {CT: 1}, patient=patient)
    text = (tmp_path / "a" / "audit").joinpath(os.listdir(tmp_path / "a" / "audit")[0]).read_text()
    assert "PID123" not in text and "Doe" not in text

    enabled = AuditTrail(tmp_path / "b", "AINODE", include_patient_identity=True)
    event = enabled.instances_received("CT1", "10.0.0.5", STUDY, {CT: 1}, patient=patient)
    check_a5(event)
    person = event["ParticipantObjectIdentification"][1]
    assert (person["ParticipantObjectTypeCode"], person["ParticipantObjectTypeCodeRole"]) == (1, 1)
    assert (person["ParticipantObjectID"], person["ParticipantObjectName"]) == patient
    assert person["ParticipantObjectIDTypeCode"]["code"] == "2"


def test_appended_never_rewritten_and_private(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path, "AINODE")
    audit.application_activity(True)
    audit.instances_received("CT1", "10.0.0.5", STUDY, {CT: 3})
    [path] = (tmp_path / "audit").iterdir()
    assert path.name == f"audit-{datetime.now(UTC).date().isoformat()}.jsonl"
    before = path.read_bytes()
    inode = path.stat().st_ino
    audit.association_rejected("EVIL", "10.6.6.6", "called AE title is not AINODE")
    AuditTrail(tmp_path, "AINODE").application_activity(False)  # another writer (a CLI command, a restart)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    assert path.stat().st_ino == inode
    assert len(after.splitlines()) == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "audit").stat().st_mode) == 0o700


def test_a_torn_line_is_kept_apart_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    day = datetime.now(UTC).date()
    path = folder / f"audit-{day.isoformat()}.jsonl"
    torn = b'{"EventIdentification":{"EventID":{"code":"110104"'
    path.write_bytes(torn)  # a crash in the middle of a write
    event = AuditTrail(tmp_path, "AINODE").application_activity(True)
    assert path.read_bytes().startswith(torn + b"\n")
    with caplog.at_level(logging.WARNING, logger="node.observe.audit"):
        assert list(read_events(tmp_path)) == [event]
    assert "line 1 is not a complete audit event" in caplog.text


def test_files_by_utc_date_and_read_since(tmp_path: Path) -> None:
    moments = iter([
        datetime(2026, 1, 2, 1, 30, tzinfo=timezone(timedelta(hours=5))),  # 2026-01-01 20:30 UTC
        datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 1, 2, 0, 0, 1, tzinfo=UTC),
    ])
    audit = AuditTrail(tmp_path, "AINODE", clock=lambda: next(moments))
    first = audit.application_activity(True)
    audit.instances_received("CT1", None, STUDY, {CT: 1})
    last = audit.application_activity(False)
    assert first["EventIdentification"]["EventDateTime"] == "2026-01-01T20:30:00.000Z"
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        "audit-2026-01-01.jsonl", "audit-2026-01-02.jsonl"]
    assert len(list(read_events(tmp_path))) == 3
    since = list(read_events(tmp_path, since=datetime(2026, 1, 1, 23, 0, tzinfo=UTC)))
    assert [e["EventIdentification"]["EventDateTime"] for e in since] == [
        "2026-01-01T23:59:59.000Z", "2026-01-02T00:00:01.000Z"]
    assert list(read_events(tmp_path, since=datetime(2026, 1, 2, tzinfo=UTC))) == [last]
    with pytest.raises(ValueError, match="time zone"):
        list(read_events(tmp_path, since=datetime(2026, 1, 2)))
    assert list(read_events(tmp_path / "nothing")) == []


def test_concurrent_writers_produce_whole_lines(tmp_path: Path) -> None:
    audit, other = AuditTrail(tmp_path, "AINODE"), AuditTrail(tmp_path, "AINODE")
    threads_n, per_thread = 6, 15

    def write(trail: AuditTrail, n: int) -> None:
        for i in range(per_thread):
            trail.instances_received(f"CT{n}", "10.0.0.5", f"{STUDY}.{n}.{i}", {CT: i + 1, ENHANCED_CT: 1})

    threads = [threading.Thread(target=write, args=(audit if n % 2 else other, n)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    [path] = (tmp_path / "audit").iterdir()
    lines = path.read_bytes().splitlines()
    assert len(lines) == threads_n * per_thread
    studies = set()
    for line in lines:
        event = json.loads(line)
        check_a5(event)
        studies.add(event["ParticipantObjectIdentification"][0]["ParticipantObjectID"])
    assert len(studies) == threads_n * per_thread
    assert audit.write_errors == other.write_errors == 0


def test_syslog_datagram_is_rfc5424_with_the_json_event(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(5)
        audit = AuditTrail(tmp_path, "AINODE", syslog=("127.0.0.1", collector.getsockname()[1]))
        event = audit.association_rejected("EVIL", "10.6.6.6", "calling AE title not in the allow-list")
        datagram, _ = collector.recvfrom(65536)
        audit.close()
    header, bom, message = datagram.partition(b"\xef\xbb\xbf")
    assert bom
    pri_version, timestamp, host, app, procid, msgid, structured = header.decode("ascii").rstrip(" ").split(" ")
    assert pri_version == "<85>1"  # authpriv.notice, syslog protocol version 1
    assert timestamp == event["EventIdentification"]["EventDateTime"]
    assert host == socket.gethostname()[:255] and app == "pacs-ai-node" and procid == str(os.getpid())
    assert msgid and structured == "-"
    assert json.loads(message) == event
    with pytest.raises(AuditError, match="syslog"):
        AuditTrail(tmp_path, "AINODE", syslog=("127.0.0.1", 0))


def test_transfer_tally_writes_one_event_per_study(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path, "AINODE")
    tally = TransferTally()
    tally.stored(STUDY, CT)
    tally.stored(STUDY, CT)
    tally.stored(STUDY, ENHANCED_CT, duplicate=True)
    tally.refused(STUDY, 0xA700)
    tally.stored(OTHER_STUDY, CT, duplicate=True)
    assert tally.report_received(audit, calling_ae="CT1", peer_ip="10.0.0.5") == 2
    first, second = list(read_events(tmp_path))
    assert first["EventIdentification"]["EventOutcomeIndicator"] == 4
    assert first["EventIdentification"]["EventOutcomeDescription"] == "1 refused (0xA700)"
    assert first["EventIdentification"]["EventActionCode"] == "C"
    assert first["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": CT, "NumberOfInstances": 2}, {"UID": ENHANCED_CT, "NumberOfInstances": 1}]
    assert second["EventIdentification"]["EventActionCode"] == "R"  # the node held every one already
    assert second["EventIdentification"]["EventOutcomeIndicator"] == 0

    sent = TransferTally()
    sent.refused(STUDY, "0xA700")
    assert sent.report_sent(audit, destination_name="web", destination_ae_or_url="https://pacs/dicom-web",
                            peer="pacs") == 1
    last = list(read_events(tmp_path))[-1]
    assert last["EventIdentification"]["EventOutcomeIndicator"] == 8
    destination = roles(last)["110152"]
    assert "AlternativeUserID" not in destination  # a URL is not an AE title
    assert destination["NetworkAccessPointTypeCode"] == 1
    assert transfer_outcome(0, 0) == 0


def test_a_failed_write_is_counted_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "audit").write_text("a file where the folder should be")
    audit = AuditTrail(tmp_path, "AINODE")
    with caplog.at_level(logging.ERROR, logger="node.observe.audit"):
        event = audit.application_activity(True)
    assert audit.write_errors == 1
    assert "audit event could not be written" in caplog.text and "110100" in caplog.text
    check_a5(event)


def test_arguments_are_checked(tmp_path: Path) -> None:
    audit = AuditTrail(tmp_path, "AINODE")
    with pytest.raises(ValueError, match="source_id"):
        AuditTrail(tmp_path, " ")
    with pytest.raises(ValueError, match="via"):
        audit.instances_received("CT1", None, STUDY, {CT: 1}, via="FTP")
    with pytest.raises(ValueError, match="outcome"):
        audit.instances_received("CT1", None, STUDY, {CT: 1}, outcome=3)
    with pytest.raises(ValueError, match="study_uid"):
        audit.instances_received("CT1", None, "", {CT: 1})
    with pytest.raises(ValueError, match="count"):
        audit.instances_sent("p", "PACS", None, STUDY, {CT: -1})
    assert list(read_events(tmp_path)) == []
