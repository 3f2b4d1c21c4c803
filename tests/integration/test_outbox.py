"""Delivery that survives outages, the way an admin sees it: the node as a
subprocess, Orthanc as the PACS (C-STORE and STOW-RS), ``pacs-ai-node outbox``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from node.cli.main import main
from node.store.state import DEAD, PENDING, SENT, StateStore
from support.data import abdomen_files
from support.dcmtk import storescu
from support.orthanc import Orthanc
from support.processes import wait_for

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
PASSWORD_VARIABLE = "PACS_AI_NODE_TEST_PACS_PASSWORD"


@dataclass
class RefusingOrthanc(Orthanc):
    """The same PACS (ports, storage) with a Lua filter that fails on every SR.

    Orthanc 1.10 then answers the C-STORE with 0xA700 and leaves the SR out of
    the STOW-RS response (a plain ``false`` from the filter would answer success).
    """

    def config(self) -> dict:
        script = self.workdir / "refuse-sr.lua"
        script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                          "  if dicom.Modality == 'SR' then error('this PACS refuses SR') end\n"
                          "  return true\nend\n")
        return {**super().config(), "LuaScripts": [str(script)]}


def outbox_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "outbox", *args], capture_output=True, text=True, timeout=60)


def test_refused_sop_class_goes_dead_and_outbox_retry_delivers_it(
    orthanc: Orthanc, start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The PACS refuses SR for now.
    orthanc.stop()
    refusing = RefusingOrthanc(orthanc.workdir, orthanc.aet, orthanc.dicom_port, orthanc.http_port, orthanc.node_port)
    refusing.start()
    try:
        monkeypatch.setenv(PASSWORD_VARIABLE, orthanc.password)
        config = tmp_path / "node.toml"
        config.write_text(f"""
[send]
send_retry_initial_s = 0.2
send_retry_max_s = 0.5

[[send.destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
max_attempts = 2

[[send.destinations]]
name = "web"
kind = "dicomweb"
url = "http://127.0.0.1:{orthanc.http_port}/dicom-web"
username = "{orthanc.user}"
password_env = "{PASSWORD_VARIABLE}"
results = ["SR"]
max_attempts = 2
""")
        node = start_node("--config", str(config), "--quiet-seconds", "1")
        files = abdomen_files()
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(node.port, files).returncode == 0
        state = StateStore(node.data_dir / "state.sqlite3")

        def settled() -> list:
            rows = state.list_outbox()
            return rows if len(rows) == 3 and all(r.state != PENDING for r in rows) else []

        rows = {(r.destination, r.sop_class_uid): r for r in wait_for(settled, 90, interval=0.3,
                                                                      what="SEG sent and both SR dead")}
        # Each destination got only its result types: the DICOMweb one takes SR only.
        assert set(rows) == {("pacs", SEG), ("pacs", SR), ("web", SR)}
        assert rows[("pacs", SEG)].state == SENT and rows[("pacs", SEG)].last_status == "0x0000 success"
        sr_dicom, sr_web = rows[("pacs", SR)], rows[("web", SR)]
        assert (sr_dicom.state, sr_dicom.attempts, sr_dicom.last_status) == (
            DEAD, 2, "0xA700 refused: out of resources")
        assert (sr_web.state, sr_web.attempts, sr_web.last_status) == (DEAD, 2, "HTTP 200")
        assert sr_web.last_error == "not listed as stored in the STOW-RS response"
        # The sender records the failure, then logs it: wait for the line itself.
        node.wait_for_line("dead after 2 attempts (0xA700 refused: out of resources")

        listing = outbox_cli("list", "--data-dir", str(node.data_dir), "--state", "dead")
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.count("Comprehensive 3D SR  dead") == 2
        assert "0xA700 refused: out of resources; refused by TESTPACS" in listing.stdout
        assert "2 item(s) shown" in listing.stdout
    finally:
        refusing.stop()

    # The PACS is fixed; the admin retries the dead letters while the node runs.
    orthanc.start()
    retry = outbox_cli("retry", "--data-dir", str(node.data_dir), "--all-dead")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert f"item {sr_dicom.id}: Comprehensive 3D SR" in retry.stdout and "2 item(s) due now" in retry.stdout
    wait_for(lambda: all(r.state == SENT for r in state.list_outbox()), 30, interval=0.2,
             what="the retried SR delivered")
    rows = {(r.destination, r.sop_class_uid): r for r in state.list_outbox()}
    assert (rows[("pacs", SR)].attempts, rows[("pacs", SR)].last_status) == (1, "0x0000 success")
    assert rows[("web", SR)].last_status == "HTTP 200"
    modalities = {s["00080060"]["Value"][0] for s in orthanc.series_in_study(study_uid)}
    assert {"SEG", "SR"} <= modalities
    again = outbox_cli("retry", "--data-dir", str(node.data_dir), "--all-dead")
    assert again.returncode == 1 and "nothing to retry" in again.stdout
    state.close()


# --------------------------------------------------------------------------- the CLI on a state database


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A state database with one item in each state, for two destinations."""
    folder = tmp_path / "data"
    state = StateStore(folder / "state.sqlite3")
    for sop, destination in (("1.1", "pacs"), ("1.2", "pacs"), ("1.3", "pacs"), ("1.4", "web")):
        state.enqueue_result(series_uid="9.9", sop_instance_uid=sop, sop_class_uid=SEG if sop != "1.2" else SR,
                             path=str(tmp_path / f"{sop}.dcm"), destinations=[destination])
        (tmp_path / f"{sop}.dcm").write_bytes(b"result")
    state.mark_sent(1, "0x0000 success")
    state.mark_dead(2, "0xA700 refused: out of resources", "refused by PACS")
    state.mark_attempt_failed(4, "HTTP 503 Service Unavailable", "STOW-RS request refused", time.time() + 3600)
    state.close()
    return folder


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["outbox", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_outbox_list(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "list", "--data-dir", str(data_dir))
    assert code == 0
    header, *lines, summary = out.splitlines()
    assert header.split()[:6] == ["id", "destination", "object", "state", "tries", "next"]
    assert [line.split()[0] for line in lines] == ["4", "3", "2", "1"]  # newest first
    assert "Segmentation" in lines[0] and "pending" in lines[0] and " next 20" in lines[0]
    assert "HTTP 503 Service Unavailable; STOW-RS request refused" in lines[0]
    assert "due now" in lines[1]
    assert "Comprehensive 3D SR" in lines[2] and " dead 20" in lines[2] and "0xA700 refused" in lines[2]
    assert " sent 20" in lines[3] and "0x0000 success" in lines[3]
    assert summary == "4 item(s) shown (pacs: 1 dead, 1 pending, 1 sent; web: 1 pending)"
    code, out, _ = run_cli(capsys, "list", "--data-dir", str(data_dir), "--state", "dead")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = run_cli(capsys, "list", "--data-dir", str(data_dir), "--destination", "web", "--limit", "5")
    assert out.splitlines()[-1] == "1 item(s) shown (web: 1 pending)"
    code, _, err = run_cli(capsys, "list", "--data-dir", str(data_dir / "nothing"))
    assert code == 1 and "no state database" in err


def test_outbox_retry(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "retry", "--data-dir", str(data_dir))
    assert code == 2 and "--all-dead" in err
    code, out, _ = run_cli(capsys, "retry", "--data-dir", str(data_dir), "--id", "1", "--id", "3", "--id", "77")
    assert code == 1
    assert "item 1: already sent" in out and "item 3: pending and not failed" in out and "item 77: no such item" in out
    code, out, _ = run_cli(capsys, "retry", "--data-dir", str(data_dir), "--destination", "web")
    assert code == 0 and "item 4: Segmentation 1.4 to web: pending after 1 attempts" in out
    code, out, _ = run_cli(capsys, "retry", "--data-dir", str(data_dir), "--all-dead")
    assert code == 0 and "item 2: Comprehensive 3D SR 1.2 to pacs: dead after 1 attempts" in out
    state = StateStore(data_dir / "state.sqlite3")
    rows = {r.id: r for r in state.list_outbox()}
    assert (rows[2].state, rows[2].attempts, rows[2].dead_at) == (PENDING, 0, None)
    assert rows[2].last_status == "0xA700 refused: out of resources"  # kept: the history of the last failure
    assert rows[4].next_attempt_at <= time.time() and rows[1].state == SENT
    state.close()


def test_outbox_purge_keeps_pending_items_and_every_file(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "purge", "--data-dir", str(data_dir))
    assert code == 2 and "--sent-older-than" in err
    code, out, _ = run_cli(capsys, "purge", "--data-dir", str(data_dir), "--sent-older-than", "1")
    assert code == 0 and out.startswith("0 item(s) removed")  # sent just now
    code, out, _ = run_cli(capsys, "purge", "--data-dir", str(data_dir), "--sent-older-than", "0", "--dead",
                           "--destination", "pacs")
    assert code == 0 and out.startswith("2 item(s) removed")
    state = StateStore(data_dir / "state.sqlite3")
    assert sorted(r.id for r in state.list_outbox()) == [3, 4]
    state.close()
    assert len(list(data_dir.parent.glob("*.dcm"))) == 4
