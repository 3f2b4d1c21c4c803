"""Raw DICOM Upper Layer PDUs built with ``struct``, and a raw client that reads what the node answers.

Built by hand (not with pynetdicom's encoders) so that a test can send what no
conforming peer would: wrong lengths, unknown types, PDVs cut short, commands
in the middle of a dataset. Layouts follow PS3.8 section 9.3 (PDUs) and PS3.7
section 6.3.1 / Annex E (command sets, implicit VR little endian).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# PDU types (PS3.8 Table 9-11 ff.)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
#: PDV message control header bits (PS3.8 E.2): command (else dataset), last fragment.
COMMAND, LAST = 0x01, 0x02
# DIMSE command fields and data set type (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET, HAS_DATASET = 0x0101, 0x0000

#: One presentation context proposed: (context id, abstract syntax, transfer syntaxes).
Context = tuple[int, str, Sequence[str]]
DEFAULT_CONTEXTS: tuple[Context, ...] = (
    (1, VERIFICATION, (IMPLICIT_VR_LE,)),
    (3, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
    (5, CT_IMAGE_STORAGE, (RLE_LOSSLESS,)),
)


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """Any PDU: type, reserved byte, 4-byte big-endian length (the body's unless ``length`` says otherwise)."""
    return struct.pack(">BBI", pdu_type & 0xFF, 0, len(body) if length is None else length) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")[:16]


def associate_rq(
    called: str = "AINODE",
    calling: str = "FUZZER",
    contexts: Iterable[Context] = DEFAULT_CONTEXTS,
    max_pdu: int | None = 16384,
    application_context: str = APPLICATION_CONTEXT,
    implementation_class_uid: str = "1.2.826.0.1.3680043.10.1.99",
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2); ``max_pdu`` None leaves out the maximum length sub-item."""
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    body += _item(0x10, application_context.encode("ascii"))
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode("ascii")) + b"".join(_item(0x40, s.encode("ascii")) for s in syntaxes)
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = b"" if max_pdu is None else _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, implementation_class_uid.encode("ascii"))
    body += _item(0x50, user)
    return pdu(ASSOCIATE_RQ, body)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1): length, context id, message control header, data."""
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU holding the given PDV items (made with :func:`pdv`)."""
    return pdu(P_DATA_TF, b"".join(pdvs))


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, bytes(4))


def abort(source: int = 0, reason: int = 0) -> bytes:
    return pdu(ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def command_set(elements: dict[int, bytes]) -> bytes:
    """A command set (group 0000, implicit VR LE) with its group length, from element number -> raw value."""
    body = b"".join(_element(e, v) for e, v in sorted(elements.items()))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set({0x0002: _uid(VERIFICATION), 0x0100: struct.pack("<H", C_ECHO_RQ),
                        0x0110: struct.pack("<H", message_id), 0x0800: struct.pack("<H", NO_DATASET)})


def c_store_rq(sop_instance_uid: str, message_id: int = 1, sop_class_uid: str = CT_IMAGE_STORAGE) -> bytes:
    return command_set({0x0002: _uid(sop_class_uid), 0x0100: struct.pack("<H", C_STORE_RQ),
                        0x0110: struct.pack("<H", message_id), 0x0700: struct.pack("<H", 0),
                        0x0800: struct.pack("<H", HAS_DATASET), 0x1000: _uid(sop_instance_uid)})


def command_status(command: bytes) -> int | None:
    """The Status (0000,0900) of an implicit VR LE command set, None when it has none or is malformed."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if (group, element) == (0x0000, 0x0900) and length == 2 and offset + 10 <= len(command):
            status: int = struct.unpack_from("<H", command, offset + 8)[0]
            return status
        offset += 8 + length
    return None


def store_messages(context_id: int, command: bytes, dataset: bytes, max_pdu: int = 16384) -> list[bytes]:
    """A whole C-STORE as P-DATA-TF PDUs: the command, then the dataset in fragments that fit ``max_pdu``."""
    out = [p_data(pdv(context_id, COMMAND | LAST, command))]
    step = max(max_pdu - 12, 2) if max_pdu else len(dataset) or 1
    for start in range(0, max(len(dataset), 1), step):  # an empty dataset: one empty last fragment
        last = start + step >= len(dataset)
        out.append(p_data(pdv(context_id, LAST if last else 0, dataset[start:start + step])))
    return out


@dataclass
class Reply:
    """What came back on a raw connection: the PDUs read, and how it ended."""

    pdus: list[tuple[int, bytes]] = field(default_factory=list)
    #: "closed" (the node closed the connection), "timeout" (still open when we stopped reading),
    #: or "garbage" (bytes that are not a well-formed PDU).
    ended: str = "timeout"
    seconds: float = 0.0

    @property
    def types(self) -> list[int]:
        return [t for t, _ in self.pdus]

    def first(self, pdu_type: int) -> bytes | None:
        return next((body for t, body in self.pdus if t == pdu_type), None)

    @property
    def aborted(self) -> bool:
        return ABORT in self.types

    @property
    def rejected(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ, if one came."""
        body = self.first(ASSOCIATE_RJ)
        return None if body is None or len(body) < 4 else (body[1], body[2], body[3])

    @property
    def statuses(self) -> list[int]:
        """The Status of every DIMSE response command that came in P-DATA-TF (single-fragment commands)."""
        out = []
        for t, body in self.pdus:
            if t != P_DATA_TF:
                continue
            offset = 0
            while offset + 6 <= len(body):
                length = struct.unpack_from(">I", body, offset)[0]
                control = body[offset + 5]
                if control & COMMAND:
                    status = command_status(body[offset + 6:offset + 4 + length])
                    if status is not None:
                        out.append(status)
                offset += 4 + length
        return out


def announced_max_pdu(ac_body: bytes) -> int | None:
    """The Maximum Length Received (user information sub-item 0x51) an A-ASSOCIATE-AC announces."""
    offset = 68  # protocol version, reserved, two AE fields, 32 reserved bytes (PS3.8 9.3.3)
    while offset + 4 <= len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, offset)
        if item_type == 0x50:
            sub, end = offset + 4, offset + 4 + length
            while sub + 4 <= end:
                sub_type, _, sub_length = struct.unpack_from(">BBH", ac_body, sub)
                if sub_type == 0x51 and sub_length == 4:
                    value: int = struct.unpack_from(">I", ac_body, sub + 4)[0]
                    return value
                sub += 4 + sub_length
        offset += 4 + length
    return None


class RawClient:
    """A TCP connection to the node on loopback that sends raw bytes and parses the PDUs that come back."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        """Send bytes; False when the node has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def trickle(self, data: bytes, interval: float, until: float) -> int:
        """Send one byte every ``interval`` seconds until done, closed, or ``until`` seconds passed; bytes sent."""
        deadline = time.monotonic() + until
        for i in range(len(data)):
            if time.monotonic() > deadline or not self.send(data[i:i + 1]):
                return i
            readable, _, _ = select.select([self.sock], [], [], interval)
            if readable:  # the node answered (an A-ABORT) or closed: stop at once, so the time is exact
                return i + 1
        return len(data)

    def finish_sending(self) -> None:
        """Half-close: the node reads end-of-stream after what was sent."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_pdu(self, timeout: float) -> tuple[int, bytes] | str:
        """The next PDU, or "closed" / "timeout" / "garbage"."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= 6:
                pdu_type, length = self._buffer[0], struct.unpack_from(">I", self._buffer, 2)[0]
                if pdu_type not in range(1, 8) or length > 1 << 26:
                    return "garbage"
                if len(self._buffer) >= 6 + length:
                    body = bytes(self._buffer[6:6 + length])
                    del self._buffer[:6 + length]
                    return pdu_type, body
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return "timeout"
            except OSError:  # reset by the node
                return "closed"
            if not chunk:
                return "closed"
            self._buffer += chunk

    def read_until(self, timeout: float, stop_after: Iterable[int] = ()) -> Reply:
        """Read PDUs until the node closes, ``timeout`` passes, or a PDU of a type in ``stop_after`` came."""
        stop = set(stop_after)
        reply, started = Reply(), time.monotonic()
        while True:
            got = self.read_pdu(max(0.0, timeout - (time.monotonic() - started)))
            if isinstance(got, str):
                reply.ended = got
                break
            reply.pdus.append(got)
            if got[0] in stop:
                reply.ended = "stopped"
                break
        reply.seconds = time.monotonic() - started
        return reply

    def associate(self, called: str = "AINODE", calling: str = "FUZZER", timeout: float = 5.0) -> Reply:
        """Send an A-ASSOCIATE-RQ (:func:`associate_rq` with the default contexts) and read the answer."""
        self.send(associate_rq(called, calling))
        return self.read_until(timeout, stop_after=(ASSOCIATE_AC, ASSOCIATE_RJ, ABORT))

    def close(self) -> None:
        self.sock.close()


def outcome(reply: Reply) -> str:
    """How the node answered, in a few words: ``abort 2/6``, ``reject 1/1/7``, ``status 0xC000``, ``closed``."""
    for pdu_type, body in reversed(reply.pdus):
        if pdu_type == ABORT and len(body) >= 4:
            return f"abort {body[2]}/{body[3]}"
        if pdu_type == ASSOCIATE_RJ and len(body) >= 4:
            return f"reject {body[1]}/{body[2]}/{body[3]}"
    if reply.statuses:
        return f"status 0x{reply.statuses[-1]:04X}"
    if RELEASE_RP in reply.types:
        return "released"
    return reply.ended
