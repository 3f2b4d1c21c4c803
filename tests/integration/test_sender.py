"""The sender against real peers on loopback: Orthanc (C-STORE, DICOM TLS, STOW-RS,
QIDO-RS), DCMTK storescp with association negotiation profiles, the node's own
STOW-RS endpoint, a port that refuses and a peer that never answers.

The outbox is a real StateStore in tmp_path; result objects are small
SEG / SR datasets made here (the sender does not look inside them).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from node.config import ConfigError, Destination, NodeConfig
from node.http.server import HttpServer, create_app
from node.receive.intake import Intake
from node.send.sender import Sender, describe_status, encode_file, is_permanent, is_stored, stow_outcomes
from node.store.spool import Spool
from node.store.state import DEAD, PENDING, SENT, StateStore
from support.dcmtk import PEER_ENV, dcmtk
from support.orthanc import Orthanc
from support.processes import free_port, stop_process, wait_for

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
PASSWORD_VARIABLE = "PACS_AI_NODE_TEST_STOW_PASSWORD"


def make_result(folder: Path, modality: str, study_uid: str) -> Path:
    """A small result object (SEG or Comprehensive 3D SR header) stored as Explicit VR LE, as the node does."""
    ds = Dataset()
    ds.SOPClassUID = SEG if modality == "SEG" else SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "SENDER-TEST"
    ds.PatientName = "Sender^Test"
    ds.SeriesDescription = f"{modality} sender test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{modality}_{ds.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    study = generate_uid()
    return [make_result(tmp_path / "results", "SEG", study), make_result(tmp_path / "results", "SR", study)]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path / "state.sqlite3")
    yield store
    store.close()


def enqueue(state: StateStore, paths: list[Path], destinations: list[Destination]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        state.enqueue_result(series_uid="1.2.3", sop_instance_uid=str(ds.SOPInstanceUID),
                             sop_class_uid=str(ds.SOPClassUID), path=str(path),
                             destinations=[str(d) for d in destinations])


def outbox(state: StateStore) -> dict[tuple[str, str], object]:
    """(destination, modality) -> row."""
    return {(row.destination, "SEG" if row.sop_class_uid == SEG else "SR"): row for row in state.list_outbox()}


def send_round(sender: Sender, timeout: float = 60) -> None:
    sender.send_due()
    assert sender.wait_idle(timeout)


def config(*destinations: Destination, **overrides) -> NodeConfig:  # noqa: ANN003
    values = {"send_retry_initial_s": 0.05, "send_retry_max_s": 0.1, "send_connect_timeout_s": 3.0,
              "send_dimse_timeout_s": 10.0, **overrides}
    return NodeConfig(destinations=destinations, **values)


# --------------------------------------------------------------------------- statuses


def test_status_texts_and_what_they_mean() -> None:
    assert describe_status(0x0000) == "0x0000 success"
    assert describe_status(0xB000) == "0xB000 warning: coercion of data elements"
    assert describe_status(0xA700) == "0xA700 refused: out of resources"
    assert describe_status(0xA7FE) == "0xA7FE refused: out of resources"
    assert describe_status(0x0122) == "0x0122 refused: SOP class not supported"
    assert describe_status(0xA900) == "0xA900 error: data set does not match SOP class"
    assert describe_status(0xC123) == "0xC123 error: cannot understand"
    assert describe_status(0x1234) == "0x1234 failure"
    assert all(is_stored(c) for c in (0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116))
    assert not any(is_stored(c) for c in (0xA700, 0x0110, 0x0122, 0xC000))
    assert all(is_permanent(c) for c in (0x0122, 0x0124, 0x0117, 0xA900, 0xA9FF, 0xC000, 0xCFFF))
    assert not any(is_permanent(c) for c in (0xA700, 0xA7FF, 0x0110, 0x0213, 0x1234))


def test_stow_response_is_read_per_instance() -> None:
    def ref(uid: str, tag: str = "", code: int | None = None) -> dict:
        item = {"00081155": {"vr": "UI", "Value": [uid]}}
        if code is not None:
            item[tag] = {"vr": "US", "Value": [code]}
        return item

    body = json.dumps({
        "00081199": {"vr": "SQ", "Value": [ref("1.1"), ref("1.2", "00081196", 0xB000)]},
        "00081198": {"vr": "SQ", "Value": [ref("1.3", "00081197", 0xC000), ref("1.4", "00081197", 0xA700)]},
    }).encode()
    out = stow_outcomes(202, "Accepted", None, body, ["1.1", "1.2", "1.3", "1.4", "1.5"])
    assert out["1.1"] == ("HTTP 202", False)
    assert out["1.2"] == ("HTTP 202, 0xB000 warning: coercion of data elements", True)
    assert out["1.3"].status == "HTTP 202, 0xC000 error: cannot understand" and out["1.3"].permanent
    assert out["1.4"].status == "HTTP 202, 0xA700 refused: out of resources" and not out["1.4"].permanent
    assert "not listed as stored" in out["1.5"].error and not out["1.5"].permanent
    # A request refused as a whole; Retry-After is honoured.
    busy = stow_outcomes(503, "Service Unavailable", "120", b"disk full", ["1.1"])
    assert busy.status == "HTTP 503 Service Unavailable" and busy.retry_after == 120.0 and "disk full" in busy.error
    assert stow_outcomes(401, "Unauthorized", None, b"", ["1.1"]).status == "HTTP 401 Unauthorized"
    # Lenient: HTTP 200 without a body means stored; 202 without one does not.
    assert stow_outcomes(200, "OK", None, b"", ["1.1"]) == {"1.1": ("HTTP 200", False)}
    assert stow_outcomes(202, "Accepted", None, b"", ["1.1"]).status == "HTTP 202 Accepted"


def test_encode_file_changes_only_the_encoding(results: list[Path]) -> None:
    original = pydicom.dcmread(results[0])
    assert encode_file(results[0], ExplicitVRLittleEndian) == results[0].read_bytes()  # sent as stored
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        again = pydicom.dcmread(BytesIO(encode_file(results[0], syntax)))
        assert again.file_meta.TransferSyntaxUID == syntax
        assert again.is_implicit_VR == (syntax == ImplicitVRLittleEndian)
        assert again == original  # every element equal


# --------------------------------------------------------------------------- limits and isolation


def test_retries_until_max_attempts_or_max_age_then_dead(state: StateStore, results: list[Path]) -> None:
    closed = free_port()  # nobody listens here
    by_attempts = Destination("NOBODY", "127.0.0.1", closed, "by-attempts", max_attempts=3)
    by_age = Destination("NOBODY", "127.0.0.1", closed, "by-age", max_age_s=60)
    enqueue(state, results[:1], [by_attempts, by_age])
    sender = Sender(config(by_attempts, by_age), state)
    # The by-age item has been waiting for two minutes.
    state._connection().execute("UPDATE outbox SET created_at = created_at - 120, queued_at = queued_at - 120 "
                                "WHERE destination = 'by-age'")
    for _ in range(3):
        wait_for(lambda: state.due_outbox(), 5, interval=0.02, what="a due item")
        send_round(sender)
    rows = outbox(state)
    attempts, age = rows[("by-attempts", "SEG")], rows[("by-age", "SEG")]
    assert (attempts.state, attempts.attempts, age.state, age.attempts) == (DEAD, 3, DEAD, 1)
    assert "Connection refused" in attempts.last_error and attempts.last_status is None
    assert attempts.dead_at is not None


def test_a_destination_that_never_answers_does_not_delay_another(orthanc: Orthanc, state: StateStore,
                                                                  results: list[Path]) -> None:
    silent = socket.socket()  # accepts the TCP connection (backlog), never answers the association request
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        hung = Destination("SILENT", "127.0.0.1", silent.getsockname()[1], "silent")
        pacs = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port, "pacs")
        enqueue(state, results, [hung, pacs])
        sender = Sender(config(hung, pacs, send_dimse_timeout_s=4.0), state)
        started = time.monotonic()
        assert sender.send_due() == 2
        wait_for(lambda: all(r.state == SENT for r in state.list_outbox(destination="pacs")), 3, interval=0.05,
                 what="delivery to the PACS while the other destination hangs")
        assert time.monotonic() - started < 3
        assert sender.send_due() == 0  # the hung destination's thread is still busy: no second one
        assert sender.wait_idle(15)
    finally:
        silent.close()
    hung_rows = state.list_outbox(destination="silent")
    assert [r.state for r in hung_rows] == [PENDING, PENDING]
    assert all("no answer to the association request within 4 s" in r.last_error for r in hung_rows)


# --------------------------------------------------------------------------- DICOM


def test_one_association_with_only_the_needed_contexts_and_implicit_vr(orthanc: Orthanc, state: StateStore,
                                                                       results: list[Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    proposed: list[list[tuple[str, tuple[str, ...]]]] = []
    original = AE.associate

    def counting(ae: AE, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        proposed.append(sorted((str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax)))
                               for cx in ae.requested_contexts))
        return original(ae, *args, **kwargs)

    monkeypatch.setattr(AE, "associate", counting)
    pacs = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port, "pacs", transfer_syntax=ImplicitVRLittleEndian)
    enqueue(state, results, [pacs])
    send_round(Sender(config(pacs), state))
    assert [r.state for r in state.list_outbox()] == [SENT, SENT]
    assert {r.last_status for r in state.list_outbox()} == {"0x0000 success"}
    assert proposed == [[(SEG, (ImplicitVRLittleEndian,)), (SR, (ImplicitVRLittleEndian,))]]
    # Orthanc received both, re-encoded to Implicit VR Little Endian.
    for path in results:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        found = json.loads(orthanc.request("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"SOPInstanceUID": str(uid)}}).encode()))
        assert len(found) == 1
        syntax = orthanc.request("GET", f"/instances/{found[0]}/metadata/TransferSyntax").decode()
        assert syntax == ImplicitVRLittleEndian


def storescp_profiles(folder: Path) -> Path:
    """DCMTK association negotiation profiles: a PACS without SR, and one that takes only Implicit VR."""
    path = folder / "storescp-profiles.cfg"
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n[Implicit]\nTransferSyntax1 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[SegOnly]\nPresentationContext1 = VerificationSOPClass\\Uncompressed\n"
        "PresentationContext2 = SegmentationStorage\\Uncompressed\n"
        "[ImplicitOnly]\nPresentationContext1 = SegmentationStorage\\Implicit\n"
        "PresentationContext2 = Comprehensive3DSRStorage\\Implicit\n"
        "[[Profiles]]\n[SegOnly]\nPresentationContexts = SegOnly\n[ImplicitOnly]\nPresentationContexts = ImplicitOnly\n"
    )
    return path


def start_storescp(profiles: Path, profile: str, port: int, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "-xf", str(profiles), profile, "-od", str(out),
                             str(port)], env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(lambda: proc.poll() is not None or _port_listening(port), 10, interval=0.05, what="storescp")
    assert proc.poll() is None, "storescp did not start"
    return proc


def _port_listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_refused_sop_class_is_dead_at_once_and_retry_delivers_it(state: StateStore, results: list[Path],
                                                                   tmp_path: Path) -> None:
    profiles = storescp_profiles(tmp_path)
    port = free_port()
    pacs = Destination("STORESCP", "127.0.0.1", port, "storescp")
    enqueue(state, results, [pacs])
    sender = Sender(config(pacs), state)
    scp = start_storescp(profiles, "SegOnly", port, tmp_path / "received-1")
    try:
        send_round(sender)
    finally:
        stop_process(scp)
    rows = outbox(state)
    seg, sr = rows[("storescp", "SEG")], rows[("storescp", "SR")]
    assert (seg.state, seg.last_status) == (SENT, "0x0000 success")
    assert sr.state == DEAD and sr.attempts == 1
    assert sr.last_status == "presentation context rejected: abstract syntax not supported"
    assert "STORESCP does not accept Comprehensive 3D SR Storage" in sr.last_error

    # The PACS is fixed (now it takes SR, in Implicit VR only); the admin retries the dead item.
    assert [r.id for r in state.retry_outbox(all_dead=True)] == [sr.id]
    scp = start_storescp(profiles, "ImplicitOnly", port, tmp_path / "received-2")
    try:
        send_round(sender)
    finally:
        stop_process(scp)
    sr = outbox(state)[("storescp", "SR")]
    assert (sr.state, sr.attempts, sr.last_status) == (SENT, 1, "0x0000 success")
    received, = (tmp_path / "received-2").iterdir()
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


@dataclass
class ConfiguredOrthanc(Orthanc):
    """Orthanc with extra configuration keys (here: DICOM TLS)."""

    extra: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {**super().config(), **self.extra}


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA and a server and a client certificate it signed (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=pacs-ai-node test CA")
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "ext")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_dicom_tls_with_a_client_certificate(tmp_path: Path, state: StateStore, results: list[Path]) -> None:
    certs = make_certificates(tmp_path / "tls")
    pacs = ConfiguredOrthanc(tmp_path / "orthanc-tls", "TLSPACS", free_port(), free_port(), free_port(), extra={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(certs["server.crt"]),
        "DicomTlsPrivateKey": str(certs["server.key"]), "DicomTlsTrustedCertificates": str(certs["ca.crt"]),
        "DicomTlsRemoteCertificateRequired": True})
    pacs.workdir.mkdir()
    common = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": pacs.dicom_port, "tls": True}
    good = Destination(name="tls", tls_ca_file=certs["ca.crt"], tls_cert_file=certs["client.crt"],
                       tls_key_file=certs["client.key"], **common)
    unknown_ca = Destination(name="system-cas", tls_cert_file=certs["client.crt"], tls_key_file=certs["client.key"],
                             **common)
    no_client_cert = Destination(name="no-client-cert", tls_ca_file=certs["ca.crt"], **common)
    plain = Destination("TLSPACS", "127.0.0.1", pacs.dicom_port, "plain")
    enqueue(state, results[:1], [good, unknown_ca, no_client_cert, plain])
    pacs.start()
    try:
        send_round(Sender(config(good, unknown_ca, no_client_cert, plain), state))
    finally:
        pacs.stop()
    rows = outbox(state)
    assert (rows[("tls", "SEG")].state, rows[("tls", "SEG")].last_status) == (SENT, "0x0000 success")
    assert "certificate verify failed" in rows[("system-cas", "SEG")].last_error
    assert "TLS: does it accept the client certificate?" in rows[("no-client-cert", "SEG")].last_error
    assert rows[("plain", "SEG")].state == PENDING


def test_tls_files_that_cannot_be_loaded_stop_the_sender(tmp_path: Path, state: StateStore) -> None:
    bad = tmp_path / "not-a-certificate.pem"
    bad.write_text("nothing here\n")
    destination = Destination("PACS", "127.0.0.1", 104, "pacs", tls=True, tls_cert_file=bad)
    with pytest.raises(ConfigError, match=r"^send.destinations\[0\]: TLS files cannot be loaded"):
        Sender(config(destination), state)


# --------------------------------------------------------------------------- DICOMweb


def test_stow_rs_to_orthanc_with_basic_auth_and_qido_confirmation(orthanc: Orthanc, state: StateStore,
                                                                  results: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    web = Destination(kind="dicomweb", url=url, name="web", username=orthanc.user, password_env=PASSWORD_VARIABLE,
                      confirm=True)
    wrong = Destination(kind="dicomweb", url=url + "/", name="wrong-password", username=orthanc.user,
                        password="not-the-password")
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    with pytest.raises(ConfigError, match=rf"send.destinations\[0\].password_env: environment variable "
                                          rf"{PASSWORD_VARIABLE} is not set"):
        Sender(config(web, wrong), state)
    monkeypatch.setenv(PASSWORD_VARIABLE, orthanc.password)
    enqueue(state, results, [web, wrong])
    send_round(Sender(config(web, wrong), state))
    rows = outbox(state)
    for modality in ("SEG", "SR"):
        assert (rows[("web", modality)].state, rows[("web", modality)].last_status) == (
            SENT, "HTTP 200, confirmed by QIDO-RS")
        assert rows[("wrong-password", modality)].state == PENDING
        assert rows[("wrong-password", modality)].last_status == "HTTP 401 Unauthorized"
    study = str(pydicom.dcmread(results[0], stop_before_pixels=True).StudyInstanceUID)
    assert {s["00080060"]["Value"][0] for s in orthanc.series_in_study(study)} == {"SEG", "SR"}


def test_stow_rs_refusal_with_a_status_is_dead_at_once(tmp_path: Path, state: StateStore,
                                                       results: list[Path]) -> None:
    """The node's own STOW-RS endpoint refuses these header-only objects: failed with 0xC000 in its response."""
    peer_config = NodeConfig(data_dir=tmp_path / "peer", min_free_disk_mb=1)
    peer_state = StateStore(peer_config.state_path)
    intake = Intake(peer_config, Spool(peer_config.spool_dir), peer_state)
    server = HttpServer(create_app(intake), "127.0.0.1", free_port(), graceful_timeout_s=5)
    server.start()
    try:
        web = Destination(kind="dicomweb", url=f"http://127.0.0.1:{server.port}", name="own-stow")
        enqueue(state, results, [web])
        send_round(Sender(config(web), state))
    finally:
        server.stop()
        peer_state.close()
    for row in state.list_outbox():
        assert row.state == DEAD and row.attempts == 1
        assert row.last_status == "HTTP 409, 0xC000 error: cannot understand"
        assert row.last_error == "refused in the STOW-RS response"
