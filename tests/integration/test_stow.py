"""STOW-RS ingest with real clients on loopback: dicomweb-client and the curl binary.

Each test runs the node's HTTP app (uvicorn in a thread) on a port from the
OS, in front of a real Intake (spool + SQLite state) in tmp_path.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from node.config import NodeConfig
from node.http.server import HttpServer, HttpServerError, create_app
from node.receive.intake import Intake
from node.receive.stow import STUDY_MISMATCH
from node.store.spool import Spool
from node.store.state import QUEUED, StateStore
from support.data import DATA, abdomen_files
from support.processes import free_port, wait_for

CURL = "/usr/bin/curl"
BOUNDARY = "stow-test-boundary-7d1c"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
CT_SMALL = DATA / "single-slices" / "CT_small.dcm"

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
SOP_CLASS = "00081150"
SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"


class StowNode:
    """An Intake with its spool and state, and the STOW-RS server in front of it."""

    def __init__(self, config: NodeConfig, intake_class: type[Intake] = Intake, **app_args) -> None:
        self.config = config
        self.spool = Spool(config.spool_dir)
        self.state = StateStore(config.state_path)
        self.intake = intake_class(config, self.spool, self.state)
        self.server = HttpServer(create_app(self.intake, **app_args), "127.0.0.1", free_port(), graceful_timeout_s=5)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"

    def spooled(self) -> list[Path]:
        return sorted(self.spool.root.rglob("*.dcm"))

    def temp_files(self) -> list[Path]:
        """Temporary files of parts being received (none once every request has ended)."""
        return sorted(self.spool.incoming_dir.iterdir())

    def post(self, path: str, body: bytes = b"", headers: dict[str, str | bytes] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
        """POST with http.client, whose header values may be any bytes; (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            connection.putrequest("POST", path)
            for name, value in {"Content-Type": MULTIPART, "Content-Length": str(len(body)),
                                **(headers or {})}.items():
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def instance_row(self, sop_instance_uid: str):  # noqa: ANN201
        return self.state._connection().execute(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator:
    """Factory: start_node(min_free_disk_mb=1, intake_class=Intake, **create_app args) -> StowNode."""
    nodes: list[StowNode] = []

    def start(min_free_disk_mb: int = 1, intake_class: type[Intake] = Intake, **app_args) -> StowNode:
        config = NodeConfig(data_dir=tmp_path / f"node-{len(nodes)}", min_free_disk_mb=min_free_disk_mb)
        node = StowNode(config, intake_class, **app_args)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.server.stop()
        node.state.close()


def multipart_body(parts: list[bytes], part_type: str | None = "application/dicom") -> bytes:
    out = BytesIO()
    for part in parts:
        out.write(f"--{BOUNDARY}\r\n".encode())
        if part_type:
            out.write(f"Content-Type: {part_type}\r\n".encode())
        out.write(b"\r\n" + part + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def curl_post(url: str, body: bytes, tmp_path: Path, content_type: str = MULTIPART, extra: list[str] | None = None,
              accept: str = "application/dicom+json") -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` with the curl binary; returns (HTTP status, response headers, response body)."""
    if not Path(CURL).exists():
        pytest.fail("curl is not installed (apt-get install curl)")
    body_file, out_file, header_file = tmp_path / "body.bin", tmp_path / "response.bin", tmp_path / "headers.txt"
    body_file.write_bytes(body)
    done = subprocess.run(
        [CURL, "-sS", "--max-time", "30", "-o", str(out_file), "-D", str(header_file), "-w", "%{http_code}",
         "-H", f"Content-Type: {content_type}", "-H", f"Accept: {accept}", *(extra or []),
         "--data-binary", f"@{body_file}", url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    headers = {}
    for line in header_file.read_text(errors="replace").splitlines()[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(done.stdout), headers, out_file.read_bytes()


def items(response: dict, tag: str) -> list[dict]:
    return response.get(tag, {}).get("Value", [])


def uid_of(item: dict, tag: str) -> str | None:
    return (item[tag].get("Value") or [None])[0]


def mr_dataset() -> bytes:
    """A small MR Image Storage instance, built here (the node accepts CT only)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8 * 8 * 2)
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def test_dicomweb_client_stores_a_series_durably(start_node) -> None:
    """112 slices with dicomweb-client: all referenced, stored byte for byte as sent, recorded, series queued."""
    node = start_node()
    files = abdomen_files()
    datasets = [pydicom.dcmread(f) for f in files]
    response = DICOMwebClient(url=f"{node.url}/dicom-web").store_instances(datasets=datasets)

    assert "FailedSOPSequence" not in response
    referenced = response.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in referenced] == [ds.SOPInstanceUID for ds in datasets]
    assert {r.ReferencedSOPClassUID for r in referenced} == {"1.2.840.10008.5.1.4.1.1.2"}
    for ds in datasets:
        sent = BytesIO()
        pydicom.dcmwrite(sent, ds)  # what dicomweb-client puts in each part
        path = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert path.read_bytes() == sent.getvalue()
        row = node.instance_row(ds.SOPInstanceUID)
        assert row["path"] == str(path) and row["calling_ae"] == "STOW-RS 127.0.0.1"
        assert row["association"].startswith("stow-")
    series = node.state.get_series(datasets[0].SeriesInstanceUID)
    assert series.instance_count == len(files)
    # The request carried the whole series (a gap-free run): complete at its end, no quiet period.
    assert series.state == QUEUED and "gap-free run of 112 slices" in series.completion

    # The study resource, under the "" base path; a resend replaces (a plain success).
    again = DICOMwebClient(url=node.url).store_instances(datasets=datasets[:10],
                                                         study_instance_uid=datasets[0].StudyInstanceUID)
    assert len(again.ReferencedSOPSequence) == 10 and "FailedSOPSequence" not in again
    assert len(node.spooled()) == len(files)


def test_curl_mixed_body_stores_the_good_parts(start_node, tmp_path: Path) -> None:
    """Two CT files and a garbage part: 202, two referenced, one failed with 0xC000, files byte for byte."""
    node = start_node()
    files = abdomen_files()[:2]
    body = multipart_body([files[0].read_bytes(), b"this is not a DICOM file" * 10, files[1].read_bytes()])
    status, headers, raw = curl_post(f"{node.url}/studies", body, tmp_path)
    assert status == 202 and headers["content-type"] == "application/dicom+json"
    response = json.loads(raw)
    failed = items(response, FAILED_SOP_SEQUENCE)
    assert len(failed) == 1 and failed[0][FAILURE_REASON]["Value"] == [0xC000]
    assert uid_of(failed[0], SOP_INSTANCE) is None  # nothing to name: it has no header
    referenced = items(response, REFERENCED_SOP_SEQUENCE)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [uid_of(r, SOP_INSTANCE) for r in referenced] == [ds.SOPInstanceUID for ds in sources]
    for f, ds in zip(files, sources):
        path = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert path.read_bytes() == f.read_bytes()
        assert node.instance_row(ds.SOPInstanceUID)["size"] == f.stat().st_size
    assert len(node.spooled()) == 2


def test_part_content_types(start_node, tmp_path: Path) -> None:
    """A part without a Content-Type is taken as application/dicom; another media type fails with 0xC000."""
    node = start_node()
    ct = CT_SMALL.read_bytes()
    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([ct], part_type=None), tmp_path)
    assert status == 200 and len(items(json.loads(raw), REFERENCED_SOP_SEQUENCE)) == 1
    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([ct], part_type="application/octet-stream"),
                               tmp_path)
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    assert status == 409 and failed[0][FAILURE_REASON]["Value"] == [0xC000]


def test_curl_refusals_per_instance(start_node, tmp_path: Path) -> None:
    """Non-CT SOP class: 0x0122; study other than the URL's: STUDY_MISMATCH; nothing stored: 409."""
    node = start_node()
    mr = mr_dataset()
    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([mr]), tmp_path)
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    mr_ds = pydicom.dcmread(BytesIO(mr))
    assert status == 409 and [f[FAILURE_REASON]["Value"] for f in failed] == [[0x0122]]
    assert uid_of(failed[0], SOP_INSTANCE) == mr_ds.SOPInstanceUID and uid_of(failed[0], SOP_CLASS) == MRImageStorage

    ct = CT_SMALL.read_bytes()
    ct_ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    status, _, raw = curl_post(f"{node.url}/dicom-web/studies/1.2.3.4", multipart_body([ct]), tmp_path)
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    assert status == 409 and failed[0][FAILURE_REASON]["Value"] == [STUDY_MISMATCH]
    assert uid_of(failed[0], SOP_INSTANCE) == ct_ds.SOPInstanceUID
    assert node.spooled() == []

    status, _, raw = curl_post(f"{node.url}/studies/{ct_ds.StudyInstanceUID}", multipart_body([ct, mr]), tmp_path)
    response = json.loads(raw)
    assert status == 202
    assert [uid_of(r, SOP_INSTANCE) for r in items(response, REFERENCED_SOP_SEQUENCE)] == [ct_ds.SOPInstanceUID]
    assert [f[FAILURE_REASON]["Value"] for f in items(response, FAILED_SOP_SEQUENCE)] == [[STUDY_MISMATCH]]


def test_curl_single_application_dicom_body(start_node, tmp_path: Path) -> None:
    """One file as Content-Type application/dicom (no multipart), the simplest curl upload."""
    node = start_node()
    status, _, raw = curl_post(f"{node.url}/studies", CT_SMALL.read_bytes(), tmp_path, content_type="application/dicom")
    assert status == 200
    assert len(items(json.loads(raw), REFERENCED_SOP_SEQUENCE)) == 1
    assert [p.read_bytes() for p in node.spooled()] == [CT_SMALL.read_bytes()]


@pytest.mark.parametrize(
    ("content_type", "body", "accept", "expected", "says"),
    [
        ("application/json", b"{}", "*/*", 415, "is not supported"),
        ('multipart/related; type="application/dicom+json"; boundary=x', b"--x--", "*/*", 415,
         "only application/dicom"),
        ('multipart/related; type="application/dicom"', b"--x--", "*/*", 400, "without a boundary"),
        (MULTIPART, b"--wrong-boundary\r\n\r\nabc\r\n--wrong-boundary--\r\n", "*/*", 400, "no delimiter"),
        (MULTIPART, f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(), "*/*", 400,
         "before the closing delimiter"),
        (MULTIPART, f"--{BOUNDARY}--\r\n".encode(), "*/*", 400, "without any part"),
        (MULTIPART, multipart_body([b"x"]), "application/dicom+xml", 406, "Accept"),
    ],
    ids=["json", "metadata-stow", "no-boundary", "wrong-boundary", "truncated", "no-part", "accept-xml"],
)
def test_request_level_errors(start_node, tmp_path: Path, content_type: str, body: bytes, accept: str,
                              expected: int, says: str) -> None:
    node = start_node()
    status, headers, raw = curl_post(f"{node.url}/studies", body, tmp_path, content_type=content_type, accept=accept)
    assert status == expected, raw
    assert headers["content-type"].startswith("text/plain") and says in raw.decode()
    assert node.spooled() == []


def test_disk_watermark_refuses_everything_with_503(start_node, tmp_path: Path) -> None:
    """Free disk under min_free_disk_mb: every instance fails with 0xA700, HTTP 503 with Retry-After."""
    node = start_node(min_free_disk_mb=2**40)
    files = abdomen_files()[:3]
    status, headers, raw = curl_post(f"{node.url}/studies", multipart_body([f.read_bytes() for f in files]),
                                     tmp_path)
    assert status == 503 and int(headers["retry-after"]) > 0
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    assert [f[FAILURE_REASON]["Value"] for f in failed] == [[0xA700]] * 3
    # Named although the intake refused them before reading them.
    assert [uid_of(f, SOP_INSTANCE) for f in failed] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert node.spooled() == [] and node.state.list_series() == []


def test_size_limits(start_node, tmp_path: Path) -> None:
    """A body over max_request_bytes is refused with 413 unread; a part over max_part_bytes fails alone."""
    files = abdomen_files()[:6]
    body = multipart_body([f.read_bytes() for f in files])
    node = start_node(max_request_bytes=len(body) - 1, max_part_bytes=files[0].stat().st_size - 1)
    status, _, raw = curl_post(f"{node.url}/studies", body, tmp_path)
    assert status == 413 and f"request body of {len(body)} bytes is over the".encode() in raw
    # Streamed (no Content-Length): reading stops at the limit.
    status, _, raw = curl_post(f"{node.url}/studies", body, tmp_path, extra=["-H", "Transfer-Encoding: chunked"])
    assert status == 413 and f"request body over the {len(body) - 1} bytes limit".encode() in raw
    assert node.spooled() == []  # every part was over max_part_bytes, so none was stored before the limit
    assert node.temp_files() == []

    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([files[0].read_bytes()]), tmp_path)
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    assert status == 409 and failed[0][FAILURE_REASON]["Value"] == [0xA700]
    assert uid_of(failed[0], SOP_INSTANCE) == pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert node.spooled() == [] and node.temp_files() == []


def test_limit_reached_after_some_parts(start_node, tmp_path: Path) -> None:
    """A streamed body that passes the limit after some parts: those stay stored, and the 413 says so."""
    files = abdomen_files()[:6]
    body = multipart_body([f.read_bytes() for f in files])
    node = start_node(max_request_bytes=len(body) // 2)
    status, _, raw = curl_post(f"{node.url}/studies", body, tmp_path, extra=["-H", "Transfer-Encoding: chunked"])
    stored = len(node.spooled())
    assert status == 413 and 0 < stored < len(files)
    assert f"({stored} instances before this were stored)".encode() in raw
    assert node.temp_files() == []


def test_parts_are_streamed_to_the_spool(start_node) -> None:
    """A part is written to a temporary spool file as it arrives; a client that goes away leaves none."""
    node = start_node()
    data = abdomen_files()[0].read_bytes()
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data[:len(data) // 2]
    with socket.create_connection(("127.0.0.1", node.server.port), timeout=10) as sock:
        sock.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
                     f"Content-Length: {len(data) * 2}\r\n\r\n".encode() + head)
        # Half a part received: it goes to a temporary file (written through a 1 MiB buffer).
        wait_for(lambda: node.temp_files(), 10, 0.05, "the part's temporary file")
    wait_for(lambda: node.temp_files() == [] or None, 10, 0.05, "the temporary file removed")
    assert node.spooled() == []


class FailingIntake(Intake):
    def accept_part10_file(self, temp, **kwargs):  # noqa: ANN001, ANN003, ANN201
        raise RuntimeError("simulated bug")


def test_unexpected_error_is_a_processing_failure(start_node, tmp_path: Path) -> None:
    node = start_node(intake_class=FailingIntake)
    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([CT_SMALL.read_bytes()]), tmp_path)
    failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
    assert status == 409 and failed[0][FAILURE_REASON]["Value"] == [0x0110]
    assert uid_of(failed[0], SOP_INSTANCE) == pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID


class SlowIntake(Intake):
    """Records when each instance was stored, after a delay, to show the response waits for it."""

    def accept_part10_file(self, temp, **kwargs):  # noqa: ANN001, ANN003, ANN201
        time.sleep(0.2)
        result = super().accept_part10_file(temp, **kwargs)
        self.stored_at = [*getattr(self, "stored_at", []), time.monotonic()]
        return result


def test_response_only_after_every_instance_is_durable(start_node, tmp_path: Path) -> None:
    node = start_node(intake_class=SlowIntake)
    files = abdomen_files()[:3]
    request = urllib.request.Request(f"{node.url}/studies", data=multipart_body([f.read_bytes() for f in files]),
                                     headers={"Content-Type": MULTIPART}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        answered_at = time.monotonic()
        assert response.status == 200
    assert len(node.intake.stored_at) == 3 and max(node.intake.stored_at) < answered_at
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).exists()
        assert node.instance_row(ds.SOPInstanceUID) is not None


def test_http_server_start_and_stop(start_node, tmp_path: Path) -> None:
    """A port in use is a clear error at start; stop returns promptly and frees the port."""
    node = start_node()
    busy = HttpServer(create_app(node.intake), "127.0.0.1", node.server.port)
    with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{node.server.port}"):
        busy.start()
    started = time.monotonic()
    node.server.stop()
    assert time.monotonic() - started < 5
    again = HttpServer(create_app(node.intake), "127.0.0.1", node.server.port)
    again.start()
    again.stop()
    with pytest.raises(ValueError, match="max_part_bytes"):
        create_app(node.intake, max_part_bytes=0)
    with pytest.raises(ValueError, match="base_paths"):
        create_app(node.intake, base_paths=("dicom-web",))



def test_stalled_body_gets_408(start_node) -> None:
    """A body that stops arriving is answered 408 after idle_timeout_s, and its part's temporary file removed."""
    node = start_node(idle_timeout_s=0.5)
    data = CT_SMALL.read_bytes()
    with socket.create_connection(("127.0.0.1", node.server.port), timeout=10) as sock:
        sock.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
                     f"Content-Length: {len(data) * 2}\r\n\r\n--{BOUNDARY}\r\n\r\n".encode() + data[:1000])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b")"):
            received = sock.recv(4096)
            if not received:
                break
            answer += received
    assert answer.startswith(b"HTTP/1.1 408") and b"no body bytes for 0.5 s (after" in answer, answer
    assert node.temp_files() == [] and node.spooled() == []
    with pytest.raises(ValueError, match="idle_timeout_s"):
        create_app(node.intake, idle_timeout_s=0)


def test_truncated_encapsulated_pixel_data_is_refused(start_node, tmp_path: Path) -> None:
    """A streamed part whose encapsulated Pixel Data lacks its end fails with 0xC000; the whole one is stored."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.compress(RLELossless)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    whole = out.getvalue()
    delimiter = whole.rindex(b"\xfe\xff\xdd\xe0")
    node = start_node()
    for cut in (delimiter, delimiter - 1000):
        status, _, raw = curl_post(f"{node.url}/studies", multipart_body([whole[:cut]]), tmp_path)
        failed = items(json.loads(raw), FAILED_SOP_SEQUENCE)
        assert status == 409 and failed[0][FAILURE_REASON]["Value"] == [0xC000], raw
    assert node.spooled() == [] and node.temp_files() == []
    status, _, raw = curl_post(f"{node.url}/studies", multipart_body([whole]), tmp_path)
    assert status == 200 and len(node.spooled()) == 1, raw


PASSWORD = "pässwörd-ü"  # not ASCII: compared as UTF-8 bytes (RFC 7617 charset="UTF-8")


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (b"Basic " + base64.b64encode(f"pacs:{PASSWORD}".encode()), 200),
        (b"Basic " + base64.b64encode(f"pacs:{PASSWORD}".encode("latin-1")), 401),
        ("Basic " + base64.b64encode(f"pacs:{PASSWORD}".encode()).decode() + "ä", 401),  # non-ASCII header
        (b"Basic not base64!", 401),
        (b"Basic " + base64.b64encode(b"pacs" + PASSWORD.encode()), 401),  # no colon
        (b"Basic " + base64.b64encode(b"\xff\xfe:\x00"), 401),
        (b"Bearer abc", 401),
        (b"Basic", 401),
        (None, 401),
    ],
    ids=["right", "latin-1", "non-ascii-header", "not-base64", "no-colon", "binary", "bearer", "no-token", "none"],
)
def test_basic_auth_answers_401_never_500(start_node, authorization: bytes | str | None, expected: int) -> None:
    node = start_node(credentials=("pacs", PASSWORD))
    headers: dict[str, str | bytes] = {} if authorization is None else {"Authorization": authorization}
    if isinstance(authorization, str):
        headers["Authorization"] = authorization.encode("utf-8")
    status, response_headers, raw = node.post("/studies", multipart_body([CT_SMALL.read_bytes()]), headers)
    assert status == expected, raw
    if expected == 401:
        assert response_headers["www-authenticate"].startswith("Basic")
        assert node.spooled() == []


def test_concurrency_limit_answers_503_with_retry_after(start_node) -> None:
    """Over max_concurrency requests in flight: 503 with Retry-After; a slot freed is taken again."""
    node = start_node(max_concurrency=1)
    with socket.create_connection(("127.0.0.1", node.server.port), timeout=10) as slow:
        slow.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
                     f"Content-Length: 100000\r\n\r\n--{BOUNDARY}\r\n".encode())
        status, headers, raw = wait_for(
            lambda: (answer := node.post("/studies", multipart_body([CT_SMALL.read_bytes()])))[0] == 503 and answer,
            10, 0.05, "a 503 while the slow request is in flight")
        assert int(headers["retry-after"]) > 0 and b"requests in flight" in raw
    status, _, raw = wait_for(
        lambda: (answer := node.post("/studies", multipart_body([CT_SMALL.read_bytes()])))[0] != 503 and answer,
        10, 0.05, "the slot freed")
    assert status == 200, raw
    assert node.temp_files() == []
    with pytest.raises(ValueError, match="max_concurrency"):
        create_app(node.intake, max_concurrency=0)
