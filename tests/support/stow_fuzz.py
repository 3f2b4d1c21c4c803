"""Malformed STOW-RS requests for fuzzing: Hypothesis strategies and a node to send them to.

Used by ``tests/integration/test_stow_fuzz.py`` (a bounded, derandomized run in
CI) and ``tests/soak_stow.py`` (a long run beside good requests).
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

from hypothesis import strategies as st

from node.config import NodeConfig
from node.http.server import HttpServer, create_app
from node.receive.intake import Intake
from node.store.spool import Spool
from node.store.state import StateStore
from support.data import DATA
from support.processes import free_port

CT_SMALL = (DATA / "single-slices" / "CT_small.dcm").read_bytes()
BOUNDARY = "fuzz-boundary-3f9a"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MAX_PART = len(CT_SMALL) + 4096
MAX_REQUEST = 8 * len(CT_SMALL)

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"


class StowFuzzNode:
    """An Intake with its spool and state behind the HTTP app (uvicorn in a thread); small limits, so that
    fuzzing reaches them."""

    def __init__(self, root: Path) -> None:
        self.config = NodeConfig(data_dir=root, min_free_disk_mb=1)
        self.spool = Spool(self.config.spool_dir)
        self.state = StateStore(self.config.state_path)
        self.intake = Intake(self.config, self.spool, self.state)
        app = create_app(self.intake, max_part_bytes=MAX_PART, max_request_bytes=MAX_REQUEST)
        self.server = HttpServer(app, "127.0.0.1", free_port(), graceful_timeout_s=5)
        self.server.start()

    def post(self, path: str, body: bytes, content_type: str = MULTIPART) -> tuple[int, dict[str, str], bytes]:
        """POST ``body``; (HTTP status, headers with lower-case names, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": content_type,
                                                                 "Accept": "application/dicom+json"})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def temp_files(self) -> list[Path]:
        return sorted(self.spool.incoming_dir.iterdir())

    def stop(self) -> None:
        self.server.stop()
        self.state.close()


def answer_problem(status: int, headers: dict[str, str], raw: bytes) -> str | None:
    """Why an answer to a malformed request is wrong (500, no reason, a failed SOP without a Failure
    Reason...), or None when it is a proper 4xx with a reason or Store Instances response."""
    if status not in (200, 202, 400, 409, 413, 415):
        return f"HTTP {status}: {raw[:300]!r}"
    if status in (400, 413, 415):
        if not headers.get("content-type", "").startswith("text/plain") or not raw.strip():
            return f"HTTP {status} without a reason"
        return None
    try:
        response = json.loads(raw)
    except ValueError:
        return f"HTTP {status} with a body that is not JSON: {raw[:300]!r}"
    failed = response.get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    if not all(item.get(FAILURE_REASON, {}).get("Value", [0])[0] > 0 for item in failed):
        return "a failed instance without a Failure Reason"
    if (status == 200) != (not failed):
        return f"HTTP {status} with {len(failed)} failed instances"
    return None


def reason_of(status: int, raw: bytes) -> str:
    """A short label of an answer, to count them: HTTP status and the reason (or Failure Reasons)."""
    if status in (400, 413, 415):
        return f"{status} {re.sub(r'[0-9]+', 'N', raw.decode(errors='replace').split(':')[0].strip()[:60])}"
    failed = json.loads(raw).get(FAILED_SOP_SEQUENCE, {}).get("Value", [])
    return f"{status} " + ",".join(sorted({f"0x{item[FAILURE_REASON]['Value'][0]:04X}" for item in failed}))


def _flip(data: bytes, at: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


#: One part's content: a good instance, or one of the ways it can be broken.
contents = st.one_of(
    st.just(CT_SMALL),
    st.integers(0, len(CT_SMALL) - 1).map(lambda n: CT_SMALL[:n]),  # truncated DICOM
    st.integers(128, len(CT_SMALL) - 1).map(lambda n: _flip(CT_SMALL, n)),  # a corrupted byte
    st.binary(max_size=512),  # garbage
    st.integers(MAX_PART - 4096, MAX_PART * 2).map(lambda n: (CT_SMALL * 3)[:n]),  # about the part limit
    st.just(b"\0" * 128 + b"DICM" + b"\xff" * 64),  # a preamble and prefix, then garbage
)
#: One part's header lines: good, missing, wrong types, malformed, huge, not ASCII.
part_headers = st.sampled_from([
    "Content-Type: application/dicom\r\n", "", "Content-Type: text/plain\r\n",
    "Content-Type: application/dicom+json\r\n", "Content-Type: \r\n", "Content-Type: application/dicom; x=\"\r\n",
    "X-Huge: " + "h" * 20_000 + "\r\n", "Content-Type application/dicom\r\n", "\xe4: \xff\r\n",
])
#: The request's Content-Type: good, without type or boundary, quoted, doubled, other media types.
request_types = st.sampled_from([
    MULTIPART,
    f"multipart/related; boundary={BOUNDARY}",
    f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
    'multipart/related; type="application/dicom"',
    f"{MULTIPART}; boundary=other",
    "application/dicom", "text/plain", 'multipart/related; type="application/dicom"; boundary="',
])


@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(request Content-Type, body): a multipart/related body, more or less broken (bad boundaries,
    missing or extra CRLF, preambles, missing closing delimiter, truncated anywhere)."""
    boundary = draw(st.sampled_from([BOUNDARY, BOUNDARY + "x", "a", "-" * 70]))
    newline = draw(st.sampled_from(["\r\n", "\r\n", "\n", "", "\r\n\r\n"]))
    body = draw(st.sampled_from([b"", b"\r\n", b"preamble\r\n"]))
    for _ in range(draw(st.integers(0, 4))):
        body += f"--{boundary}{newline}{draw(part_headers)}{newline}".encode("latin-1")
        body += draw(contents) + newline.encode()
    body += draw(st.sampled_from([f"--{boundary}--\r\n", f"--{boundary}--", f"--{boundary}", "", "--"])).encode()
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(body) - 1))))
    if cut is not None:
        body = body[:cut]
    return draw(request_types), body


def good_body(data: bytes) -> bytes:
    """A well-formed request body with one instance."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()
