"""The DICOM listener: Verification and CT storage, durable before success.

A lean DICOM Upper Layer acceptor (PS3.8) built for one job: receive C-STOREs
fast. Association negotiation uses pynetdicom's PDU and primitive classes and
its presentation-context negotiation; the data path is ours: one thread per
association reading PDUs with blocking socket calls, P-DATA fragments written
straight into the spool file as they arrive, and the response sent as soon as
the instance is fsynced and recorded. pynetdicom's own association machinery
hands every PDU across three threads and polls with sleeps, which costs more
than the disk (see tests/benchmarks/intake_throughput.py).

What is accepted: Verification, and CT / Enhanced CT in every transfer syntax
the installed pydicom pixel-data plugins decode. Contexts for every other
storage SOP class are accepted too, so that a PACS pushing a whole study keeps
its association, and each such instance is then refused with 0x0122.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import uuid
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, StoragePresentationContexts, negotiate_as_acceptor

from node.config import NodeConfig
from node.receive.intake import (
    ACCEPTED_SOP_CLASSES,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SUCCESS,
    IncomingInstance,
    Intake,
    TempFile,
)

LOG = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# PDU types (PS3.8 9.3)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
#: Largest PDU read when the node announces "unlimited" (max_pdu_size = 0).
HARD_PDU_LIMIT = 64 * 1024 * 1024
# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATASET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211
# (result, source, diagnostic) of A-ASSOCIATE-RJ (PS3.8 9.3.4)
RJ_CALLED_AE = (1, 1, 7)
RJ_CALLING_AE = (1, 1, 3)
RJ_APPLICATION_CONTEXT = (1, 1, 2)
RJ_LOCAL_LIMIT = (2, 3, 2)
#: Verification SOP Class (PS3.4 Annex A.4): C-ECHO.
VERIFICATION = "1.2.840.10008.1.1"


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation of pydicom can decode."""
    from pydicom.pixels.decoders.base import get_decoder

    out = []
    for uid in ALL_TRANSFER_SYNTAXES:
        try:
            decoder = get_decoder(UID(uid))
        except NotImplementedError:
            continue
        if decoder.is_available:
            out.append(uid)
    return out


def supported_contexts() -> list[PresentationContext]:
    """What the node accepts at negotiation (first acceptable proposed transfer syntax wins)."""
    contexts = []

    def add(abstract: str, syntaxes: list[str]) -> None:
        cx = PresentationContext()
        cx.abstract_syntax = UID(abstract)
        cx.transfer_syntax = [UID(s) for s in syntaxes]
        contexts.append(cx)

    add(VERIFICATION, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    ct_syntaxes = decodable_transfer_syntaxes()
    for uid in sorted(ACCEPTED_SOP_CLASSES):
        add(uid, ct_syntaxes)
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None and context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
            add(context.abstract_syntax, list(ALL_TRANSFER_SYNTAXES))
    return contexts


class AssociationClosed(Exception):
    """The peer closed the connection, aborted, or broke the protocol."""


class SocketReader:
    """Buffered reads from a socket: one ``recv_into`` fetches many PDUs at once.

    :meth:`read` returns a memoryview into the buffer that stays valid only
    until the next call; callers copy what they keep.
    """

    def __init__(self, sock: socket.socket, size: int = 1 << 20) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def read(self, n: int) -> memoryview:
        if self.end - self.start < n:
            self._fill(n)
        out = self.view[self.start:self.start + n]
        self.start += n
        return out

    def _fill(self, n: int) -> None:
        have = self.end - self.start
        if n > len(self.buf):  # a PDU larger than the buffer: a bigger buffer
            bigger = bytearray(n)
            bigger[:have] = self.view[self.start:self.end]
            self.buf, self.view = bigger, memoryview(bigger)
            self.start, self.end = 0, have
        elif self.start + n > len(self.buf):  # not enough room after the data: move it to the front
            self.buf[:have] = self.view[self.start:self.end]
            self.start, self.end = 0, have
        while self.end - self.start < n:
            k = self.sock.recv_into(self.view[self.end:], len(self.buf) - self.end)
            if k == 0:
                raise AssociationClosed("connection closed by the peer")
            self.end += k


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
        parts.append(_command_element(0x0002, _even(sop_class_uid.encode("ascii"), b"\0")))
    parts.append(_command_element(0x0100, struct.pack("<H", field)))
    parts.append(_command_element(0x0120, struct.pack("<H", message_id)))
    parts.append(_command_element(0x0800, struct.pack("<H", NO_DATASET)))
    parts.append(_command_element(0x0900, struct.pack("<H", status)))
    if comment:
        parts.append(_command_element(0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance_uid:
        parts.append(_command_element(0x1000, _even(sop_instance_uid.encode("ascii"), b"\0")))
    body = b"".join(parts)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


class Association(threading.Thread):
    """One accepted connection: negotiation, then C-STOREs and C-ECHOs until release or abort."""

    def __init__(self, server: DicomServer, sock: socket.socket, address: tuple[str, int]) -> None:
        super().__init__(name=f"assoc-{address[0]}:{address[1]}", daemon=True)
        self.server = server
        self.config = server.config
        self.sock = sock
        self.address = address
        self.id = uuid.uuid4().hex  # the state store's ``association`` column
        #: The short id log lines carry (``association_id``): the first characters of :attr:`id`.
        self.log_id = self.id[:8]
        self.calling_ae = "?"
        self.established = False
        #: Counted against ``max_associations`` (set by :meth:`DicomServer.admit`).
        self.admitted = False
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.stored = self.refused = 0
        self._incoming: IncomingInstance | None = None
        self._spare: TempFile | None = None  # the next instance's spool file, made while waiting for it
        self._command = bytearray()
        self._request: Dataset | None = None
        self._dataset_context = 0

    @property
    def log_extra(self) -> dict[str, str]:
        """The structured fields of this association's log lines (``extra=``)."""
        return {"association_id": self.log_id, "calling_ae": self.calling_ae}

    # -- socket ---------------------------------------------------------------

    def _read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU's type and body (header included for A-ASSOCIATE-RQ), valid until the next read."""
        head = self.reader.read(6)
        pdu_type, length = head[0], struct.unpack_from(">I", head, 2)[0]
        limit = self.config.max_pdu_size + 6 if self.config.max_pdu_size and self.established else HARD_PDU_LIMIT
        if length > limit:
            self._abort(2, 6)  # invalid PDU parameter value
            raise AssociationClosed(f"PDU of {length} bytes exceeds the limit of {limit}")
        if pdu_type == ASSOCIATE_RQ:
            header = bytes(head)
            return pdu_type, memoryview(header + bytes(self.reader.read(length)))
        return pdu_type, self.reader.read(length)

    def _abort(self, source: int = 2, reason: int = 0) -> None:
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, source, reason))
        except OSError:
            pass

    def abort(self) -> None:
        """Abort from another thread (shutdown): A-ABORT, then close the socket."""
        self._abort(0, 0)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_message(self, context_id: int, command: bytes) -> None:
        """Send a command-only DIMSE message in as many P-DATA-TF PDUs as the peer's maximum allows."""
        step = self.peer_max_pdu - 6 if self.peer_max_pdu else len(command)
        step = max(step, 1)
        out = bytearray()
        for start in range(0, len(command), step):
            fragment = command[start:start + step]
            last = start + step >= len(command)
            out += struct.pack(">BBIIBB", P_DATA_TF, 0, len(fragment) + 6, len(fragment) + 2, context_id,
                               0x03 if last else 0x01)
            out += fragment
        self.sock.sendall(out)

    # -- life cycle -----------------------------------------------------------

    def run(self) -> None:
        released = False
        started = time.monotonic()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.config.network_timeout_s)
            if self.server.ssl_context is not None:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            self.reader = SocketReader(self.sock)
            if self._negotiate():
                released = self._serve()
        except TimeoutError:
            self._abort(2, 0)  # ARTIM / idle timer expired: tell the peer before closing
            LOG.warning("association from %s (%s) aborted: nothing received for %.0f s", self.calling_ae,
                        self.address[0], self.config.network_timeout_s, extra=self.log_extra)
        except (AssociationClosed, OSError, ssl.SSLError) as exc:
            if self.established:
                LOG.warning("association from %s (%s) ended abnormally: %s", self.calling_ae, self.address[0], exc,
                            extra=self.log_extra)
            else:
                LOG.info("connection from %s closed before an association: %s", self.address[0], exc,
                         extra=self.log_extra)
        except Exception:  # a bug must cost one association, not the listener
            LOG.exception("association from %s failed with an internal error", self.calling_ae, extra=self.log_extra)
            self._abort(2, 0)
        finally:
            if self._incoming is not None:
                self._incoming.discard()
            if self._spare is not None:
                self._spare.discard()
            try:
                self.sock.close()
            except OSError:
                pass
            if self.established:
                LOG.info(
                    "association from %s (%s) %s after %.1f s: %d instances stored, %d refused",
                    self.calling_ae, self.address[0], "released" if released else "aborted",
                    time.monotonic() - started, self.stored, self.refused,
                    extra={**self.log_extra, "duration_s": round(time.monotonic() - started, 3)},
                )
                try:
                    self.server.intake.association_ended(self.id, released)
                except Exception:  # the quiet timer remains the fallback
                    LOG.exception("could not evaluate the series of association %s", self.id, extra=self.log_extra)
                try:
                    self.server.intake.transfer_finished(self.id, calling_ae=self.calling_ae,
                                                         peer_ip=self.address[0], via="DICOM")
                except Exception:  # the audit trail logs its own write errors; never break the listener
                    LOG.exception("could not audit association %s", self.id, extra=self.log_extra)
            self.server.forget(self)

    def _reject(self, verdict: tuple[int, int, int], rq: A_ASSOCIATE, why: str) -> None:
        result, source, diagnostic = verdict
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = result, source, diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        LOG.warning(
            "association from %s (calling AE %s, called AE %s) rejected: %s",
            self.address[0], rq.calling_ae_title, rq.called_ae_title, why,
            extra={"association_id": self.log_id, "calling_ae": str(rq.calling_ae_title).strip()},
        )
        intake = self.server.intake
        if intake.metrics is not None:
            intake.metrics.association("rejected")
        if intake.audit is not None and verdict != RJ_LOCAL_LIMIT:  # busy is not a security event
            intake.audit.association_rejected(str(rq.calling_ae_title).strip(), self.address[0], why)

    def _negotiate(self) -> bool:
        pdu_type, data = self._read_pdu()
        if pdu_type != ASSOCIATE_RQ:
            self._abort(2, 2)  # unexpected PDU
            raise AssociationClosed(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(bytes(data))
        rq = pdu.to_primitive()
        self.calling_ae = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        if rq.application_context_name != APPLICATION_CONTEXT:
            self._reject(RJ_APPLICATION_CONTEXT, rq, f"application context {rq.application_context_name}")
            return False
        if called != self.config.ae_title:
            self._reject(RJ_CALLED_AE, rq, f"called AE title is not {self.config.ae_title}")
            return False
        allowed = self.config.allowed_calling_ae_titles
        if allowed and self.calling_ae not in allowed:
            self._reject(RJ_CALLING_AE, rq, "calling AE title not in the allow-list")
            return False
        if not self.server.admit(self):
            self._reject(RJ_LOCAL_LIMIT, rq, f"{self.config.max_associations} associations already active")
            return False
        self.peer_max_pdu = rq.maximum_length_received or 0
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in rq.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, role_items = negotiate_as_acceptor(
            rq.presentation_context_definition_list, self.server.contexts, roles or None
        )
        for cx in results:
            if cx.result == 0 and cx.context_id is not None:
                self.contexts[cx.context_id] = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.config.max_pdu_size
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, class_uid, version, *role_items]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self.sock.sendall(out.encode())
        self.established = True
        if self.server.intake.metrics is not None:
            self.server.intake.metrics.association("accepted")
        self._prepare_spare()
        LOG.debug("association %s from %s accepted with %d contexts", self.id, self.calling_ae, len(self.contexts),
                  extra=self.log_extra)
        return True

    def _serve(self) -> bool:
        """Handle PDUs until release (True) or abort (raises / False)."""
        while True:
            pdu_type, data = self._read_pdu()
            if pdu_type == P_DATA_TF:
                self._p_data(data)
            elif pdu_type == RELEASE_RQ:
                self.sock.sendall(struct.pack(">BBII", RELEASE_RP, 0, 4, 0))
                return True
            elif pdu_type == ABORT:
                raise AssociationClosed("aborted by the peer")
            else:
                self._abort(2, 2)
                raise AssociationClosed(f"unexpected PDU type {pdu_type}")

    # -- DIMSE ----------------------------------------------------------------

    def _p_data(self, data: memoryview) -> None:
        view = data
        offset, end = 0, len(data)
        while offset < end:
            length = struct.unpack_from(">I", data, offset)[0]
            if length < 2 or offset + 4 + length > end:
                self._abort(2, 6)
                raise AssociationClosed("malformed presentation data value item")
            context_id, control = data[offset + 4], data[offset + 5]
            fragment = view[offset + 6:offset + 4 + length]
            offset += 4 + length
            if context_id not in self.contexts:
                self._abort(2, 6)
                raise AssociationClosed(f"data on presentation context {context_id}, which was not accepted")
            if control & 0x01:
                self._command += fragment
                if control & 0x02:
                    self._on_command(context_id)
            else:
                self._on_dataset_fragment(context_id, fragment, last=bool(control & 0x02))

    def _on_command(self, context_id: int) -> None:
        request = decode(BytesIO(bytes(self._command)), True, True)
        self._command.clear()
        field = int(request.get("CommandField", 0))
        has_dataset = int(request.get("CommandDataSetType", NO_DATASET)) != NO_DATASET
        if field == C_ECHO_RQ:
            self._respond(context_id, request, 0x8030, SUCCESS)
        elif field == C_STORE_RQ and has_dataset:
            abstract, syntax = self.contexts[context_id]
            sop_class = str(request.get("AffectedSOPClassUID", "")).rstrip("\0 ")
            if sop_class != abstract:
                LOG.warning("C-STORE on context %d names SOP class %s, the context %s", context_id, sop_class, abstract,
                            extra=self.log_extra)
            self._request, self._dataset_context = request, context_id
            spare, self._spare = self._spare, None
            self._incoming = self.server.intake.begin(
                sop_class_uid=abstract,
                sop_instance_uid=str(request.get("AffectedSOPInstanceUID", "")).rstrip("\0 "),
                transfer_syntax=syntax,
                source=self.calling_ae,
                association=self.id,
                spare=spare,
            )
        elif has_dataset:  # an operation we do not offer: read its dataset, then answer
            self._request, self._dataset_context = request, context_id
            self._incoming = None
        else:
            LOG.warning("unsupported DIMSE command 0x%04X from %s", field, self.calling_ae, extra=self.log_extra)
            self._respond(context_id, request, field | 0x8000, UNRECOGNIZED_OPERATION)

    def _on_dataset_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._request is None or context_id != self._dataset_context:
            self._abort(2, 2)
            raise AssociationClosed("dataset fragment without a command")
        if self._incoming is not None:
            self._incoming.write(fragment)
        if not last:
            return
        request, incoming = self._request, self._incoming
        self._request = self._incoming = None
        field = int(request.get("CommandField", 0))
        if incoming is None:
            LOG.warning("unsupported DIMSE command 0x%04X from %s", field, self.calling_ae, extra=self.log_extra)
            self._respond(context_id, request, field | 0x8000, UNRECOGNIZED_OPERATION)
            return
        result = incoming.finish()
        if result.ok:
            self.stored += 1
        else:
            self.refused += 1
        self._respond(context_id, request, 0x8001, result.status, result.reason)
        self._prepare_spare()

    def _prepare_spare(self) -> None:
        """Create the next instance's spool file now, while the peer prepares its next request."""
        if self._spare is None:
            try:
                self._spare = self.server.intake.new_temp()
            except OSError as exc:  # begin() will try again and refuse with the reason
                LOG.debug("no spare spool file: %s", exc)

    def _respond(self, context_id: int, request: Dataset, field: int, status: int, comment: str | None = None) -> None:
        self._send_message(context_id, response_command(
            field,
            int(request.get("MessageID", 0)),
            status,
            str(request.AffectedSOPClassUID).rstrip("\0 ") if "AffectedSOPClassUID" in request else None,
            str(request.AffectedSOPInstanceUID).rstrip("\0 ") if "AffectedSOPInstanceUID" in request else None,
            comment if status != SUCCESS else None,
        ))


class DicomServer:
    """The node's DICOM SCP: an accept loop and one :class:`Association` thread per connection."""

    def __init__(
        self,
        config: NodeConfig,
        intake: Intake,
        ssl_context: ssl.SSLContext | None = None,
        port: int | None = None,
    ) -> None:
        self.config = config
        self.intake = intake
        self.ssl_context = ssl_context
        self.port = config.port if port is None else port
        self.contexts = supported_contexts()
        self._lock = threading.Lock()
        self._associations: set[Association] = set()
        self._admitted = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.bind_address, self.port))
        sock.listen(64)
        sock.settimeout(0.5)  # so that stop() is noticed
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()
        LOG.info(
            "listening as %s on %s:%d%s (calling AE allow-list: %s)",
            self.config.ae_title,
            self.config.bind_address,
            self.port,
            " with TLS" if self.ssl_context else "",
            ", ".join(self.config.allowed_calling_ae_titles) or "any",
        )

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    break
                LOG.exception("accept failed")
                time.sleep(0.1)
                continue
            conn.settimeout(self.config.network_timeout_s)
            assoc = Association(self, conn, address[:2])
            with self._lock:
                self._associations.add(assoc)
            assoc.start()

    def admit(self, assoc: Association) -> bool:
        """Count an association against ``max_associations``; False when the limit is reached."""
        with self._lock:
            if self._admitted >= self.config.max_associations:
                return False
            self._admitted += 1
            assoc.admitted = True
            return True

    def forget(self, assoc: Association) -> None:
        with self._lock:
            self._associations.discard(assoc)
            if assoc.admitted:
                self._admitted -= 1

    def established(self) -> list[Association]:
        with self._lock:
            return [a for a in self._associations if a.established and a.is_alive()]

    def close(self) -> None:
        """Stop accepting new connections (associations in progress go on)."""
        self._closing.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Stop accepting, let established associations finish (bounded), abort the rest."""
        self.close()
        deadline = time.monotonic() + drain_seconds
        while self.established() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._associations)
        for assoc in remaining:
            if assoc.established:
                LOG.warning("aborting association from %s still open at shutdown", assoc.calling_ae,
                            extra=assoc.log_extra)
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=5)
