"""The DICOM Upper Layer framing the listener reads (PS3.8 9.3): PDU types, A-ABORT reasons,
a socket reader with deadlines whose buffer grows only with the bytes actually received,
and the DIMSE response command set it sends.
"""

from __future__ import annotations

import socket
import struct
import time

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
KNOWN_PDU_TYPES = frozenset(range(1, 8))
#: Largest A-ASSOCIATE-RQ read (header included): a few hundred presentation contexts fit.
MAX_ASSOCIATE_RQ = 64 * 1024
#: Largest A-RELEASE-RQ / A-ABORT body (4 bytes by PS3.8 9.3.6 and 9.3.8; some slack).
MAX_SMALL_PDU = 1024
#: Largest PDU accepted when ``max_pdu_size = 0``; also what the node then announces (finite).
HARD_PDU_LIMIT = 64 * 1024 * 1024
# A-ABORT source and reason (PS3.8 9.3.8, Table 9-26)
SERVICE_PROVIDER = 2
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0, 1, 2
UNRECOGNIZED_PDU_PARAMETER, UNEXPECTED_PDU_PARAMETER, INVALID_PDU_PARAMETER = 4, 5, 6
# DIMSE (PS3.7 E.1)
NO_DATASET = 0x0101


class AssociationClosed(Exception):
    """The peer closed the connection, aborted, or broke the protocol."""


class ProtocolError(AssociationClosed):
    """The peer broke PS3.7/PS3.8: answered with an A-ABORT (service provider, ``reason``) and a log line."""

    def __init__(self, message: str, reason: int = REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class DeadlineExpired(AssociationClosed):
    """A deadline (ARTIM, PDU/idle, instance) passed; ``which`` names it in the log line."""

    def __init__(self, which: str, seconds: float) -> None:
        super().__init__(f"{which} deadline of {seconds:.1f} s expired")
        self.which = which
        self.seconds = seconds


class SocketReader:
    """Buffered reads from a socket: one ``recv_into`` fetches many PDUs at once.

    :meth:`read` returns a memoryview into the buffer that stays valid only
    until the next call; callers copy what they keep. The buffer starts at
    ``size`` bytes and grows only as bytes arrive (a declared length never
    allocates anything), and shrinks back to ``size`` once a larger PDU is
    consumed. Every read must complete before ``deadline`` (``time.monotonic``):
    a peer that trickles bytes cannot hold the connection past it.
    """

    def __init__(self, sock: socket.socket, size: int = 16 * 1024) -> None:
        self.sock = sock
        self.size = size
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.deadline = float("inf")
        self.deadline_name = "network"
        self.deadline_s = 0.0
        #: Whether any byte arrived since the last :meth:`set_deadline` (log lines tell idle from slow).
        self.received = False
        self._timeout: float | None = None

    def set_deadline(self, name: str, seconds: float) -> None:
        """Reads from now on must complete within ``seconds`` (``name`` goes into the log line)."""
        self.deadline, self.deadline_name, self.deadline_s = time.monotonic() + seconds, name, seconds
        self.received = False

    def resize(self, size: int) -> None:
        """Change the resting buffer size (after the association is accepted: room for many PDUs)."""
        self.size = size
        self._replace(max(size, self.end - self.start))

    def buffered(self) -> int:
        return self.end - self.start

    def read(self, n: int) -> memoryview:
        if self.end - self.start < n:
            self._fill(n)
        out = self.view[self.start:self.start + n]
        self.start += n
        return out

    def _replace(self, size: int) -> None:
        have = self.end - self.start
        bigger = bytearray(size)
        bigger[:have] = self.view[self.start:self.end]
        self.view.release()
        self.buf, self.view = bigger, memoryview(bigger)
        self.start, self.end = 0, have

    def _fill(self, n: int) -> None:
        have = self.end - self.start
        if len(self.buf) > self.size and have <= self.size:  # a large PDU was consumed: give the memory back
            self._replace(self.size)
        elif self.start + n > len(self.buf):  # not enough room after the data: move it to the front
            self.buf[:have] = self.view[self.start:self.end]
            self.start, self.end = 0, have
        while self.end - self.start < n:
            if self.end == len(self.buf):  # grow with what arrived, never with what was announced
                self._replace(min(max(2 * len(self.buf), self.size), n))
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExpired(self.deadline_name, self.deadline_s)
            timeout = min(remaining, 3600.0)
            if self._timeout is None or abs(self._timeout - timeout) > 0.05 * timeout:
                self.sock.settimeout(timeout)  # a syscall: only when the deadline moved noticeably
                self._timeout = timeout
            try:
                k = self.sock.recv_into(self.view[self.end:], len(self.buf) - self.end)
            except TimeoutError:
                raise DeadlineExpired(self.deadline_name, self.deadline_s) from None
            if k == 0:
                raise AssociationClosed("connection closed by the peer")
            self.end += k
            self.received = True


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def response_command(
    field: int,
    message_id: int,
    status: int,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    comment: str | None = None,
) -> bytes:
    """A DIMSE response command set without a dataset (implicit VR little endian, PS3.7 E.1).

    Encoded directly (a test checks it against pydicom's reading): it is sent
    once per instance, and building a pydicom Dataset for it costs more than
    the rest of the response path.
    """
    parts = []
    if sop_class_uid:
        parts.append(_command_element(0x0002, _even(sop_class_uid.encode("ascii", "replace"), b"\0")))
    parts.append(_command_element(0x0100, struct.pack("<H", field)))
    parts.append(_command_element(0x0120, struct.pack("<H", message_id & 0xFFFF)))
    parts.append(_command_element(0x0800, struct.pack("<H", NO_DATASET)))
    parts.append(_command_element(0x0900, struct.pack("<H", status)))
    if comment:
        parts.append(_command_element(0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance_uid:
        parts.append(_command_element(0x1000, _even(sop_instance_uid.encode("ascii", "replace"), b"\0")))
    body = b"".join(parts)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body
