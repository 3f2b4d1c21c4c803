"""Intake behaviour through the network: concurrency, limits, completion rules, versions.

The node runs as a subprocess; the senders are pynetdicom SCUs (several at once)
and DCMTK storescu; the PACS is a real Orthanc.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.store.recovery import adopt_unrecorded
from node.store.spool import Spool, write_durably
from node.store.state import StateStore
from support.data import abdomen_files
from support.dcmtk import storescu
from support.node import transfers_audited
from support.processes import wait_for
from support.series import copy_series
from support.validators import dciodvfy

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def series_row(data_dir: Path, series_uid: str) -> dict | None:
    db = sqlite3.connect(f"file:{data_dir / 'state.sqlite3'}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return dict(row) if row else None
    except sqlite3.OperationalError:  # the node has not created the tables yet
        return None
    finally:
        db.close()


def series_uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def scu_send(port: int, files: list[Path], results: dict, key: str, calling: str = "SCU") -> None:
    """Send files over one pynetdicom association; record each status under ``results[key]``."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    statuses = []
    try:
        assert assoc.is_established, "association not established"
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status) if status else None)
            time.sleep(0.002)  # let the other senders interleave
        assoc.release()
    finally:
        if assoc.is_alive():
            assoc.abort()
        results[key] = statuses


def test_concurrent_associations_keep_series_apart(start_node, tmp_path: Path) -> None:
    # The quiet timer is long: each series finishes because its association released it whole.
    node = start_node("--quiet-seconds", "120")
    batches = {name: copy_series(tmp_path / name, count=30).files for name in ("pacs-a", "pacs-b", "modality")}
    results: dict[str, list] = {}
    threads = [threading.Thread(target=scu_send, args=(node.port, files, results, name, name.upper()))
               for name, files in batches.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(not t.is_alive() for t in threads)
    for name, files in batches.items():
        assert results[name] == [0] * len(files), name
        uid = series_uid_of(files)
        row = wait_for(lambda uid=uid: (r := series_row(node.data_dir, uid)) and r["state"] == "done" and r, 90,
                       what=f"series {name} processed")
        assert row["instance_count"] == 30
        assert row["completion"] == "sender released the association, gap-free run of 30 slices"
        spooled = sorted((node.data_dir / "spool").glob(f"*/{uid}/*.dcm"))
        assert len(spooled) == 30
        assert {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in spooled} == {uid}
    # Each association's line is logged as it ends, which may follow the series' completion.
    wait_for(lambda: node.output().count("30 instances stored, 0 refused") >= 3, 10, what="three association lines")
    assert "3 instances stored" not in node.output()
    assert node.output().count("30 instances stored, 0 refused") == 3


def test_association_limit_rejects_with_local_limit_exceeded(start_node, tmp_path: Path) -> None:
    node = start_node("--config", str(config_file(tmp_path, "[node]\nmax_associations = 1\n")))
    ae = AE(ae_title="FIRST")
    ae.add_requested_context(CTImageStorage)
    first = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    try:
        assert first.is_established
        second = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
        assert second.is_rejected
        assert (second.acceptor.primitive.result, second.acceptor.primitive.result_source,
                second.acceptor.primitive.diagnostic) == (2, 3, 2)  # transient, presentation, local limit
    finally:
        first.release()
    third = wait_for(lambda: (a := ae.associate("127.0.0.1", node.port, ae_title="AINODE")).is_established and a,
                     10, what="a slot after the release")
    third.release()
    wait_for(lambda: "1 associations already active" in node.output(), 10, what="the rejection in the log")


def test_disk_watermark_refuses_with_out_of_resources(start_node, tmp_path: Path) -> None:
    node = start_node("--config", str(config_file(tmp_path, "[node]\nmin_free_disk_mb = 1000000000\n")))
    files = copy_series(tmp_path / "s", count=2).files
    results: dict[str, list] = {}
    scu_send(node.port, files, results, "s")
    assert results["s"] == [0xA700, 0xA700]
    assert not list((node.data_dir / "spool").glob("*/*/*.dcm"))
    assert "watermark" in node.output()


def test_a_series_with_a_gap_waits_for_the_quiet_timer(start_node, tmp_path: Path) -> None:
    node = start_node("--quiet-seconds", "4")
    files = copy_series(tmp_path / "gap", count=20, skip=(10,)).files
    assert storescu(node.port, files).returncode == 0
    uid = series_uid_of(files)
    released = time.monotonic()
    wait_for(lambda: transfers_audited(node.data_dir), 10, what="the association's end handled (audited)")
    assert series_row(node.data_dir, uid)["state"] == "receiving"  # not complete on release: a slice is missing
    row = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["state"] in ("rejected", "done") and r, 30,
                   what="series decided")
    assert time.monotonic() - released >= 3.5
    assert row["completion"] == "quiet for 4 s"
    assert row["state"] == "rejected" and "gap" in row["reason"]


def test_completion_on_release_can_be_turned_off(start_node, tmp_path: Path) -> None:
    node = start_node("--quiet-seconds", "3",
                      "--config", str(config_file(tmp_path, "[series]\ncomplete_on_release = false\n")))
    files = copy_series(tmp_path / "s", count=20).files
    assert storescu(node.port, files).returncode == 0
    uid = series_uid_of(files)
    wait_for(lambda: transfers_audited(node.data_dir), 10, what="the association's end handled (audited)")
    assert series_row(node.data_dir, uid)["state"] == "receiving"
    row = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["state"] == "done" and r, 30,
                   what="series processed")
    assert row["completion"] == "quiet for 3 s"


def test_contrast_series_is_rejected_with_its_reason(start_node, tmp_path: Path) -> None:
    node = start_node()
    files = copy_series(tmp_path / "contrast", count=20, ContrastBolusAgent="IOMEPROL 350").files
    assert storescu(node.port, files).returncode == 0
    uid = series_uid_of(files)
    row = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["state"] == "rejected" and r, 30,
                   what="series rejected")
    assert "IOMEPROL 350" in row["reason"]
    assert not list((node.data_dir / "results").rglob("*.dcm"))


def test_late_instances_make_a_superseding_version(orthanc, start_node, tmp_path: Path, have_tools: None) -> None:
    node = start_node("--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--quiet-seconds", "2",
                      port=orthanc.node_port)
    files = copy_series(tmp_path / "s").files
    uid = series_uid_of(files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, files[:80]).returncode == 0
    first = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["state"] == "done" and r, 60,
                     what="version 1")
    assert first["version"] == 1 and first["completion"].startswith("sender released")

    # The rest of the series arrives later, in another association: version 2 supersedes version 1.
    assert storescu(node.port, files[80:]).returncode == 0
    second = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["version"] == 2 and r["state"] == "done"
                      and r, 60, what="version 2")
    assert second["instance_count"] == 112 and second["reason"].startswith("version 2 (supersedes 1)")
    assert second["completion"] == "quiet for 2 s"

    def srs_in_pacs() -> list[pydicom.Dataset]:
        found = json.loads(orthanc.request("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}).encode()))
        return [pydicom.dcmread(__import__("io").BytesIO(orthanc.request("GET", f"/instances/{i}/file")))
                for i in found]

    srs = wait_for(lambda: len(s := srs_in_pacs()) == 2 and s, 60, what="both SR versions in the PACS")
    old, new = sorted(srs, key=lambda ds: "PredecessorDocumentsSequence" in ds)
    assert "PredecessorDocumentsSequence" not in old
    predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert new.SeriesInstanceUID != old.SeriesInstanceUID and new.SOPInstanceUID != old.SOPInstanceUID
    path = tmp_path / "sr-v2.dcm"
    new.save_as(path)
    errors, _ = dciodvfy(path)
    assert errors == []


def test_power_cut_leftovers_are_adopted_or_quarantined(tmp_path: Path) -> None:
    """At start, a spooled file without a state row is recorded when complete (its row was lost
    in a power cut after the fsyncs) and moved to quarantine when not (it was never acknowledged)."""
    spool = Spool(tmp_path / "spool")
    state = StateStore(tmp_path / "state.sqlite3")
    complete, truncated = abdomen_files()[:2]
    for src, data in ((complete, complete.read_bytes()), (truncated, truncated.read_bytes()[:-5000])):
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        write_durably(spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), data)
    (spool.root / "1.2" / "3.4").mkdir(parents=True)
    (spool.root / "1.2" / "3.4" / "5.6.dcm").write_bytes(b"not dicom")
    quarantine = tmp_path / "quarantine"
    assert adopt_unrecorded(spool, state, quarantine) == 1
    assert adopt_unrecorded(spool, state, quarantine) == 0
    ds = pydicom.dcmread(complete, stop_before_pixels=True)
    row = state.get_series(str(ds.SeriesInstanceUID))
    assert row is not None and row.instance_count == 1 and row.state == "receiving"
    assert (quarantine / "1.2" / "3.4" / "5.6.dcm").read_bytes() == b"not dicom"
    assert len(list(quarantine.rglob("*.dcm"))) == 2
    assert len(spool.files()) == 1


@pytest.mark.parametrize("source", ["MODALITY", "ODD", ""])
def test_file_meta_matches_pydicom(source: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from node.receive.intake import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, file_meta_bytes

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.45"  # odd length: padded
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source:
        meta.SourceApplicationEntityTitle = source
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    ours = file_meta_bytes(meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID,
                           source)
    assert ours == buffer.getvalue()


@pytest.mark.parametrize("comment", [None, "free disk 12 MiB below the 500 MiB watermark", "odd"])
def test_response_command_reads_back_with_pydicom(comment: str | None) -> None:
    from pynetdicom.dsutils import decode

    from node.receive.listener import response_command

    raw = response_command(0x8001, 7, 0xA700, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", comment)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.CommandDataSetType, ds.Status) == (0x8001, 7, 0x0101,
                                                                                                0xA700)
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert ds.get("ErrorComment") == comment


def test_stow_rs_through_the_running_node(start_node, tmp_path: Path) -> None:
    """curl posts a whole series to the node's STOW-RS port; it completes on the end of the request."""
    import subprocess

    node = start_node("--quiet-seconds", "120")
    files = copy_series(tmp_path / "stow", count=20).files
    boundary = "pacs-ai-node-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in files
    ) + f"--{boundary}--\r\n".encode()
    (tmp_path / "body").write_bytes(body)
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-o", str(tmp_path / "response.json"), "-w", "%{http_code}",
         "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
         "-H", "Accept: application/dicom+json",
         "--data-binary", f"@{tmp_path / 'body'}", f"http://127.0.0.1:{node.http_port}/dicom-web/studies"],
        capture_output=True, text=True, timeout=90,
    )
    assert done.stdout == "200", done.stderr
    response = json.loads((tmp_path / "response.json").read_text())
    assert len(response["00081199"]["Value"]) == 20
    uid = series_uid_of(files)
    row = wait_for(lambda: (r := series_row(node.data_dir, uid)) and r["state"] == "done" and r, 60,
                   what="series processed")
    assert row["completion"].endswith("gap-free run of 20 slices")
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spooled = node.data_dir / "spool" / ds.StudyInstanceUID / uid / f"{ds.SOPInstanceUID}.dcm"
        assert spooled.read_bytes() == path.read_bytes()  # byte for byte


def test_every_byte_is_in_the_file_when_it_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The success status promises the instance is on disk: fdatasync must see the whole file."""
    import os

    from node.config import NodeConfig
    from node.receive.intake import Intake

    config = NodeConfig(data_dir=tmp_path / "data", min_free_disk_mb=1)
    intake = Intake(config, Spool(config.spool_dir), StateStore(config.state_path))
    src = abdomen_files()[0]
    ds = pydicom.dcmread(src)
    raw = BytesIO(src.read_bytes())
    pydicom.filereader.read_preamble(raw, False)
    pydicom.filereader._read_file_meta_info(raw)
    data = raw.read()  # the dataset alone, as it travels in P-DATA
    synced_sizes = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced_sizes.append(os.fstat(fd).st_size), real(fd)))
    incoming = intake.begin(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                            transfer_syntax=ds.file_meta.TransferSyntaxUID, source="TEST", association="a")
    for start in range(0, len(data), 4000):
        incoming.write(memoryview(data)[start:start + 4000])
    result = incoming.finish()
    assert result.ok, result.reason
    stored = config.spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert synced_sizes == [stored.stat().st_size]
    assert stored.read_bytes().endswith(data)


def test_an_idle_association_is_aborted_after_the_network_timeout(start_node, tmp_path: Path) -> None:
    node = start_node("--config", str(config_file(tmp_path, "[node]\nnetwork_timeout_s = 1.0\n")))
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    wait_for(lambda: assoc.is_aborted, 15, interval=0.1, what="the node to abort the idle association")
    wait_for(lambda: "nothing received for 1 s" in node.output(), 10, what="the log line")
