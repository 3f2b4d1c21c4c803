"""The admin's view of a running node: Prometheus metrics, audit trail, JSON logs, status page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import requests
from prometheus_client.parser import text_string_to_metric_families

from node.observe.audit import read_events
from support.data import REPO, abdomen_files
from support.dcmtk import storescu
from support.processes import wait_for


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_audit_and_json_logs_of_a_processed_series(start_node, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[logging]\nlog_format = "json"\n[http]\nhttp_bind_address = "127.0.0.1"\n')
    node = start_node("--config", str(config), "--quiet-seconds", "30")
    files = abdomen_files()
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, files).returncode == 0
    # A caller with the wrong called AE title is a security event.
    assert storescu(node.port, files[:1], called="NOTTHENODE").returncode != 0

    metrics = wait_for(lambda: (m := _metrics(node.http_port)) and _value(
        m, "pacs_ai_node_series_finished_total", state="done") == 1 and m, 120, what="series done in the metrics")
    assert _value(metrics, "pacs_ai_node_instances_received_total", source="dicom") == len(files)
    assert _value(metrics, "pacs_ai_node_associations_total", result="rejected") == 1
    assert _value(metrics, "pacs_ai_node_disk_free_bytes") > 0
    inference = [v for (name, labels), v in metrics.items()
                 if name == "pacs_ai_node_model_inference_seconds_count" and ("bundle", "body-lungs") in labels]
    assert inference and inference[0] >= 1

    events = list(read_events(node.data_dir))
    ids = [e["EventIdentification"]["EventID"]["code"] for e in events]
    assert "110100" in ids  # application start
    assert "110113" in ids  # the rejected association
    received = [e for e in events if e["EventIdentification"]["EventID"]["code"] == "110104"]
    assert len(received) == 1
    objects = received[0]["ParticipantObjectIdentification"]
    assert any(o.get("ParticipantObjectID") == study for o in objects)
    assert "TotalSegmentator" not in json.dumps(events)  # no patient name by default

    # Status page (on: HTTP is on loopback) shows the series; logs are JSON lines without patient identity.
    page = requests.get(f"http://127.0.0.1:{node.http_port}/status", timeout=10).text
    assert "Body" in page and "done" in page
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    detail = requests.get(f"http://127.0.0.1:{node.http_port}/status/series/{series_uid}", timeout=10).text
    assert "Timings of the last run" in detail and "model body-lungs/body-lungs" in detail
    node.stop()
    lines = [json.loads(line) for line in node.output().splitlines() if line.startswith("{")]
    assert any("processed" in line["message"] for line in lines)
    assert "TotalSegmentator^ExampleCT" not in node.output() and "TSEG-EXAMPLE-CT" not in node.output()
    stop_events = [e for e in read_events(node.data_dir)
                   if e["EventIdentification"].get("EventTypeCode", [{}])[0].get("code") == "110121"]
    assert stop_events, "application stop audited"


def test_status_page_is_off_on_a_public_address_by_default(start_node, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[http]\nhttp_bind_address = "0.0.0.0"\n')
    node = start_node("--config", str(config))
    assert requests.get(f"http://127.0.0.1:{node.http_port}/status", timeout=10).status_code == 404
    assert requests.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).status_code == 200
    listing = subprocess.run([sys.executable, "-m", "node", "--help"], capture_output=True, text=True, cwd=REPO)
    assert listing.returncode == 0
