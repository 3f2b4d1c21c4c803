"""The DICOM listener: Verification and CT storage, durable before success.

A lean DICOM Upper Layer acceptor (PS3.8) built for one job: receive C-STOREs
fast. Association negotiation uses pynetdicom's PDU and primitive classes and
its presentation-context negotiation; the data path is ours: one thread per
connection (at most ``max_connections``, ``max_connections_per_address`` from
one address, counted before anything is read), deadlines on every read (ARTIM
for set-up and release, a whole-PDU DIMSE deadline, an instance deadline
relative to its size), PDU types and lengths checked before a body is read
(:mod:`node.receive.pdu`), malformed input answered with an A-ABORT and one
log line, P-DATA fragments written
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

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
import uuid
from io import BytesIO
from typing import NamedTuple

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
from node.receive.pdu import (
    ABORT,
    ASSOCIATE_RQ,
    HARD_PDU_LIMIT,
    INVALID_PDU_PARAMETER,
    KNOWN_PDU_TYPES,
    MAX_ASSOCIATE_RQ,
    MAX_SMALL_PDU,
    NO_DATASET,
    P_DATA_TF,
    REASON_NOT_SPECIFIED,
    RELEASE_RP,
    RELEASE_RQ,
    SERVICE_PROVIDER,
    UNEXPECTED_PDU,
    UNEXPECTED_PDU_PARAMETER,
    UNRECOGNIZED_PDU,
    AssociationClosed,
    DeadlineExpired,
    ProtocolError,
    SocketReader,
    response_command,
)

LOG = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
#: Largest command set accepted (a C-STORE-RQ is a few hundred bytes).
MAX_COMMAND_SET = 64 * 1024
#: Slowest average rate an instance may arrive at, in bytes/s, after ``network_timeout_s`` of grace.
MIN_INSTANCE_RATE = 1_000_000
#: Connections closed to make room whose threads may still be ending: beyond this many, refuse instead.
MAX_EVICTING = 16
#: Receive buffer of an accepted association: room for many PDUs per ``recv``.
ESTABLISHED_BUFFER = 1 << 20
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


class Command(NamedTuple):
    """The fields of a DIMSE request command set (PS3.7 E.1) the listener uses."""

    field: int
    message_id: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    has_dataset: bool


def _parse_command(raw: bytes) -> Command:
    """Decode a command set; ValueError when it cannot be read (a protocol event, not a bug)."""
    try:
        request = decode(BytesIO(raw), True, True)
        field = int(request.get("CommandField", 0))
        message_id = int(request.get("MessageID", 0))
        has_dataset = int(request.get("CommandDataSetType", NO_DATASET)) != NO_DATASET
        sop_class = str(request.AffectedSOPClassUID).rstrip("\0 ") if "AffectedSOPClassUID" in request else None
        sop_instance = (str(request.AffectedSOPInstanceUID).rstrip("\0 ")
                        if "AffectedSOPInstanceUID" in request else None)
    except Exception as exc:  # pydicom raises many types on garbage: all mean "cannot be read"
        raise ValueError(f"command set cannot be decoded: {type(exc).__name__}: {exc}") from None
    if not 0 <= field <= 0xFFFF:
        raise ValueError(f"command field {field} out of range")
    return Command(field, message_id, sop_class, sop_instance, has_dataset)


def _ae_text(raw: bytes) -> str:
    """An AE title field as printable text for comparisons and log lines (never raises)."""
    text = raw.decode("ascii", "replace").strip(" \0")
    return "".join(c if c.isprintable() else "?" for c in text)


def address_allowed(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether a peer address lies in one of ``networks`` (an IPv4-mapped IPv6 address counts as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class Association(threading.Thread):
    """One accepted connection: negotiation, then C-STOREs and C-ECHOs until release or abort."""

    def __init__(self, server: DicomServer, sock: socket.socket, address: tuple[str, int]) -> None:
        super().__init__(name=f"assoc-{address[0]}:{address[1]}", daemon=True)
        self.server = server
        self.config = server.config
        self.sock = sock
        self.address = address
        self.accepted_at = time.monotonic()
        self.id = uuid.uuid4().hex  # the state store's ``association`` column
        #: The short id log lines carry (``association_id``): the first characters of :attr:`id`.
        self.log_id = self.id[:8]
        self.calling_ae = "?"
        self.established = False
        #: Counted against ``max_associations`` (set by :meth:`DicomServer.admit`).
        self.admitted = False
        self.peer_max_pdu = 0
        #: The largest P-DATA-TF PDU accepted: what the A-ASSOCIATE-AC announces (PS3.8 D.1).
        self.max_pdu = self.config.max_pdu_size or HARD_PDU_LIMIT
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract syntax, transfer syntax)
        self.stored = self.refused = 0
        self.reader = SocketReader(sock)
        self._incoming: IncomingInstance | None = None
        self._spare: TempFile | None = None  # the next instance's spool file, made while waiting for it
        self._command = bytearray()
        self._request: Command | None = None
        self._dataset_context = 0
        self._instance_started = 0.0
        self._instance_bytes = 0

    @property
    def log_extra(self) -> dict[str, str]:
        """The structured fields of this association's log lines (``extra=``)."""
        return {"association_id": self.log_id, "calling_ae": self.calling_ae}

    # -- socket ---------------------------------------------------------------

    def _read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU's type and body (header included for A-ASSOCIATE-RQ), valid until the next read.

        The type and length are checked before any of the body is read (PS3.8 9.3.1, 9.3.8).
        """
        head = self.reader.read(6)
        pdu_type, length = head[0], struct.unpack_from(">I", head, 2)[0]
        if pdu_type not in KNOWN_PDU_TYPES:
            raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)
        if pdu_type == ABORT and length <= MAX_SMALL_PDU:
            raise AssociationClosed("aborted by the peer")
        if not self.established:
            if pdu_type != ASSOCIATE_RQ:
                raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type}", UNEXPECTED_PDU)
            if length + 6 > MAX_ASSOCIATE_RQ:
                raise ProtocolError(f"A-ASSOCIATE-RQ of {length + 6} bytes exceeds the limit of {MAX_ASSOCIATE_RQ}",
                                    INVALID_PDU_PARAMETER)
            header = bytes(head)
            return pdu_type, memoryview(header + bytes(self.reader.read(length)))
        if pdu_type == P_DATA_TF:
            limit = self.max_pdu
        elif pdu_type in (RELEASE_RQ, ABORT):
            limit = MAX_SMALL_PDU
        else:
            raise ProtocolError(f"unexpected PDU type {pdu_type} on an established association", UNEXPECTED_PDU)
        if length > limit:
            raise ProtocolError(f"PDU of type {pdu_type} and {length} bytes exceeds the maximum of {limit}",
                                INVALID_PDU_PARAMETER)
        return pdu_type, self.reader.read(length)

    def _abort(self, source: int = SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> None:
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, source, reason))
        except OSError:
            pass

    def evict(self) -> None:
        """Close a connection that has no association yet from another thread (to make room for a new one)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
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
        started = self.accepted_at
        peer = self.address[0]
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # ARTIM (PS3.8 9.1.5): from the accept until the A-ASSOCIATE-RQ is complete, TLS included.
            artim = self.config.artim_timeout_s
            self.reader.set_deadline("ARTIM (association request)", artim - (time.monotonic() - started))
            self.reader.deadline_s = artim
            if self.server.ssl_context is not None:
                self.sock.settimeout(max(self.reader.deadline - time.monotonic(), 0.01))
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
                self.reader.sock = self.sock
                self.reader._timeout = None
            if self._negotiate():
                released = self._serve()
        except DeadlineExpired as exc:
            if self.established:  # PS3.8 9.1.5: ARTIM expiry before the association only closes
                self._abort(SERVICE_PROVIDER, REASON_NOT_SPECIFIED)
            idle = "" if self.reader.received else f" (nothing received for {exc.seconds:.0f} s)"
            LOG.warning("%s from %s (%s) %s: %s%s", "association" if self.established else "connection",
                        self.calling_ae, peer, "aborted" if self.established else "closed", exc, idle,
                        extra=self.log_extra)
        except ProtocolError as exc:
            self._abort(SERVICE_PROVIDER, exc.reason)
            LOG.warning("%s from %s (%s) aborted (A-ABORT reason %d): %s",
                        "association" if self.established else "connection", self.calling_ae, peer, exc.reason, exc,
                        extra=self.log_extra)
        except (AssociationClosed, OSError) as exc:  # ssl.SSLError is an OSError
            if self.established:
                LOG.warning("association from %s (%s) ended abnormally: %s", self.calling_ae, peer, exc,
                            extra=self.log_extra)
            else:
                LOG.info("connection from %s closed before an association: %s", peer, exc, extra=self.log_extra)
        except Exception:  # a bug must cost one association, not the listener
            LOG.exception("association from %s failed with an internal error", self.calling_ae, extra=self.log_extra)
            self._abort(SERVICE_PROVIDER, REASON_NOT_SPECIFIED)
        finally:
            if self._incoming is not None:
                self._incoming.discard()
                self._incoming = None
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            try:
                self.sock.close()
            except OSError:
                pass
            self.reader = SocketReader(self.sock, 0)  # the buffer goes now, not when the thread object does
            if self.established:
                LOG.info(
                    "association from %s (%s) %s after %.1f s: %d instances stored, %d refused",
                    self.calling_ae, peer, "released" if released else "aborted",
                    time.monotonic() - started, self.stored, self.refused,
                    extra={**self.log_extra, "duration_s": round(time.monotonic() - started, 3)},
                )
                try:
                    self.server.intake.association_ended(self.id, released)
                except Exception:  # the quiet timer remains the fallback
                    LOG.exception("could not evaluate the series of association %s", self.id, extra=self.log_extra)
                try:
                    self.server.intake.transfer_finished(self.id, calling_ae=self.calling_ae,
                                                         peer_ip=peer, via="DICOM")
                except Exception:  # the audit trail logs its own write errors; never break the listener
                    LOG.exception("could not audit association %s", self.id, extra=self.log_extra)
            self.server.forget(self)

    def _reject(self, verdict: tuple[int, int, int], calling: str, called: str, why: str) -> None:
        result, source, diagnostic = verdict
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = result, source, diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.sock.sendall(pdu.encode())
        LOG.warning(
            "association from %s (calling AE %s, called AE %s) rejected: %s", self.address[0], calling, called, why,
            extra={"association_id": self.log_id, "calling_ae": calling},
        )
        intake = self.server.intake
        if intake.metrics is not None:
            intake.metrics.association("rejected")
        if intake.audit is not None and verdict != RJ_LOCAL_LIMIT:  # busy is not a security event
            intake.audit.association_rejected(calling, self.address[0], why)

    def _negotiate(self) -> bool:
        _, data = self._read_pdu()
        raw = bytes(data)
        if len(raw) < 74:  # header, version, reserved, AE titles, reserved (PS3.8 Table 9-11)
            raise ProtocolError(f"A-ASSOCIATE-RQ of {len(raw)} bytes is shorter than its fixed fields",
                                INVALID_PDU_PARAMETER)
        called, self.calling_ae = _ae_text(raw[10:26]), _ae_text(raw[26:42]) or "?"
        if called != self.config.ae_title:  # blank or invalid included: PS3.8 9.3.4 diagnostic 7
            self._reject(RJ_CALLED_AE, self.calling_ae, called, f"called AE title {called!r} is not "
                         f"{self.config.ae_title}")
            return False
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(raw)
            rq = pdu.to_primitive()
            context_name = str(rq.application_context_name)
        except Exception as exc:  # pynetdicom raises many types on malformed items
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}: {exc}",
                                INVALID_PDU_PARAMETER) from None
        if context_name != APPLICATION_CONTEXT:
            self._reject(RJ_APPLICATION_CONTEXT, self.calling_ae, called, f"application context {context_name}")
            return False
        allowed = self.config.allowed_calling_ae_titles
        if allowed and self.calling_ae not in allowed:
            self._reject(RJ_CALLING_AE, self.calling_ae, called, "calling AE title not in the allow-list")
            return False
        networks = self.server.calling_networks.get(self.calling_ae)
        if networks is not None and not address_allowed(self.address[0], networks):
            self._reject(RJ_CALLING_AE, self.calling_ae, called,
                         f"calling AE title {self.calling_ae} is not allowed from address {self.address[0]} "
                         "(calling_ae_addresses)")
            return False
        if not self.server.admit(self):
            self._reject(RJ_LOCAL_LIMIT, self.calling_ae, called,
                         f"{self.config.max_associations} associations already active")
            return False
        self.peer_max_pdu = rq.maximum_length_received or 0
        try:
            roles = {
                item.sop_class_uid: (item.scu_role, item.scp_role)
                for item in rq.user_information
                if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
            }
            results, role_items = negotiate_as_acceptor(
                rq.presentation_context_definition_list, self.server.contexts, roles or None
            )
        except Exception as exc:  # malformed presentation context or role items
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ items: {type(exc).__name__}: {exc}",
                                INVALID_PDU_PARAMETER) from None
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
        max_length.maximum_length_received = self.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, class_uid, version, *role_items]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self.sock.sendall(out.encode())
        self.established = True
        self.reader.resize(ESTABLISHED_BUFFER)
        if self.server.intake.metrics is not None:
            self.server.intake.metrics.association("accepted")
        self._prepare_spare()
        LOG.debug("association %s from %s accepted with %d contexts", self.id, self.calling_ae, len(self.contexts),
                  extra=self.log_extra)
        return True

    def _set_pdu_deadline(self) -> None:
        """The next PDU must arrive whole within ``network_timeout_s`` (DIMSE/idle), or sooner if an
        instance in progress is slower than :data:`MIN_INSTANCE_RATE` after its grace period."""
        timeout = self.config.network_timeout_s
        if self._request is not None:
            allowed = timeout + (self._instance_bytes + self.max_pdu) / MIN_INSTANCE_RATE
            remaining = self._instance_started + allowed - time.monotonic()
            if remaining < timeout:
                self.reader.set_deadline("instance", remaining)
                self.reader.deadline_s = allowed
                return
        self.reader.set_deadline("DIMSE/idle (network_timeout_s)", timeout)

    def _serve(self) -> bool:
        """Handle PDUs until release (True) or abort (raises / False)."""
        while True:
            self._set_pdu_deadline()
            pdu_type, data = self._read_pdu()
            if pdu_type == P_DATA_TF:
                self._p_data(data)
            elif pdu_type == RELEASE_RQ:
                self.sock.sendall(struct.pack(">BBII", RELEASE_RP, 0, 4, 0))
                self._await_close()
                return True
            else:  # _read_pdu lets only these three types through
                raise ProtocolError(f"unexpected PDU type {pdu_type}", UNEXPECTED_PDU)

    def _await_close(self) -> None:
        """ARTIM after A-RELEASE-RP (PS3.8 9.1.5, Sta13): the requestor closes the connection."""
        self.reader.set_deadline("ARTIM (release)", self.config.artim_timeout_s)
        try:
            while True:
                self.reader.read(self.reader.buffered() or 1)  # anything after the release is ignored
        except DeadlineExpired as exc:
            LOG.warning("association from %s (%s) closed by the node: %s", self.calling_ae, self.address[0], exc,
                        extra=self.log_extra)
        except (AssociationClosed, OSError):
            pass

    # -- DIMSE ----------------------------------------------------------------

    def _p_data(self, data: memoryview) -> None:
        offset, end = 0, len(data)
        while offset < end:
            if end - offset < 6:  # item length (4), context id, control header (PS3.8 9.3.5.1)
                raise ProtocolError(f"presentation data value item of {end - offset} bytes", INVALID_PDU_PARAMETER)
            length = struct.unpack_from(">I", data, offset)[0]
            if length < 2 or offset + 4 + length > end:
                raise ProtocolError(f"presentation data value item length {length} does not fit its PDU",
                                    INVALID_PDU_PARAMETER)
            context_id, control = data[offset + 4], data[offset + 5]
            fragment = data[offset + 6:offset + 4 + length]
            offset += 4 + length
            if context_id not in self.contexts:
                raise ProtocolError(f"data on presentation context {context_id}, which was not accepted",
                                    INVALID_PDU_PARAMETER)
            if control & 0x01:
                if self._request is not None:
                    raise ProtocolError("a command arrived before the dataset of the previous one was complete",
                                        UNEXPECTED_PDU_PARAMETER)
                self._command += fragment
                if len(self._command) > MAX_COMMAND_SET:
                    raise ProtocolError(f"command set longer than {MAX_COMMAND_SET} bytes", INVALID_PDU_PARAMETER)
                if control & 0x02:
                    self._on_command(context_id)
            else:
                self._on_dataset_fragment(context_id, fragment, last=bool(control & 0x02))

    def _on_command(self, context_id: int) -> None:
        try:
            request = _parse_command(bytes(self._command))
        except ValueError as exc:
            raise ProtocolError(str(exc), INVALID_PDU_PARAMETER) from None
        finally:
            self._command.clear()
        if request.field == C_ECHO_RQ:
            self._respond(context_id, request, 0x8030, SUCCESS)
        elif request.field == C_STORE_RQ and request.has_dataset:
            abstract, syntax = self.contexts[context_id]
            sop_class = request.sop_class_uid or ""
            if sop_class != abstract:
                LOG.warning("C-STORE on context %d names SOP class %s, the context %s", context_id, sop_class, abstract,
                            extra=self.log_extra)
            self._start_dataset(request, context_id)
            spare, self._spare = self._spare, None
            self._incoming = self.server.intake.begin(
                sop_class_uid=abstract,
                sop_instance_uid=request.sop_instance_uid or "",
                transfer_syntax=syntax,
                source=self.calling_ae,
                association=self.id,
                spare=spare,
            )
        elif request.has_dataset:  # an operation we do not offer: read its dataset, then answer
            self._start_dataset(request, context_id)
            self._incoming = None
        else:
            LOG.warning("unsupported DIMSE command 0x%04X from %s", request.field, self.calling_ae,
                        extra=self.log_extra)
            self._respond(context_id, request, (request.field | 0x8000) & 0xFFFF, UNRECOGNIZED_OPERATION)

    def _start_dataset(self, request: Command, context_id: int) -> None:
        self._request, self._dataset_context = request, context_id
        self._instance_started, self._instance_bytes = time.monotonic(), 0

    def _on_dataset_fragment(self, context_id: int, fragment: memoryview, last: bool) -> None:
        if self._request is None or context_id != self._dataset_context:
            raise ProtocolError("dataset fragment without a command", UNEXPECTED_PDU_PARAMETER)
        self._instance_bytes += len(fragment)
        if self._incoming is not None:
            self._incoming.write(fragment)
        if not last:
            return
        request, incoming = self._request, self._incoming
        self._request = self._incoming = None
        if incoming is None:
            LOG.warning("unsupported DIMSE command 0x%04X from %s", request.field, self.calling_ae,
                        extra=self.log_extra)
            self._respond(context_id, request, (request.field | 0x8000) & 0xFFFF, UNRECOGNIZED_OPERATION)
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

    def _respond(self, context_id: int, request: Command, field: int, status: int, comment: str | None = None) -> None:
        self._send_message(context_id, response_command(
            field, request.message_id, status, request.sop_class_uid, request.sop_instance_uid,
            comment if status != SUCCESS else None,
        ))


class DicomServer:
    """The node's DICOM SCP: an accept loop and one :class:`Association` thread per connection.

    Admission comes before any allocation: over ``max_connections`` open
    connections in all, or ``max_connections_per_address`` from one address, a
    new connection is closed at once, without a thread or a buffer.
    """

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
        self.calling_networks = {
            aet: tuple(ipaddress.ip_network(n, strict=False) for n in networks)
            for aet, networks in config.calling_ae_addresses
        }
        self._lock = threading.Lock()
        self._associations: set[Association] = set()
        self._per_address: dict[str, int] = {}
        self._evicting: set[Association] = set()  # closed to make room, their threads ending
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
            host = address[0]
            victim: Association | None = None
            with self._lock:
                total = len(self._associations) - len(self._evicting)
                mine = self._per_address.get(host, 0) - sum(1 for a in self._evicting if a.address[0] == host)
                refused = (f"{total} connections open (max_connections)" if total >= self.config.max_connections
                           else f"{mine} connections open from this address (max_connections_per_address)"
                           if mine >= self.config.max_connections_per_address else None)
                if refused is not None and len(self._evicting) < MAX_EVICTING:
                    # The oldest connection still without an association (of this address, when its own cap
                    # is reached) makes room: a flood of idle connections cannot lock out a real peer.
                    victim = min((a for a in self._associations if not a.established and a not in self._evicting
                                  and (mine < self.config.max_connections_per_address or a.address[0] == host)),
                                 key=lambda a: a.accepted_at, default=None)
                    if victim is not None:
                        self._evicting.add(victim)
                        refused = None
                if refused is None:
                    assoc = Association(self, conn, address[:2])
                    self._associations.add(assoc)
                    self._per_address[host] = self._per_address.get(host, 0) + 1
            if victim is not None:
                LOG.warning("connection from %s closed before an association: making room for %s (%s)",
                            victim.address[0], host, "max_connections" if total >= self.config.max_connections
                            else "max_connections_per_address")
                victim.evict()
            if refused is not None:
                LOG.warning("connection from %s refused: %s", host, refused)
                try:
                    conn.close()
                except OSError:
                    pass
                continue
            assoc.start()

    def connections(self) -> int:
        """Open connections, associated or not (each has one thread)."""
        with self._lock:
            return len(self._associations)

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
            self._evicting.discard(assoc)
            if assoc in self._associations:
                self._associations.discard(assoc)
                host = assoc.address[0]
                left = self._per_address.get(host, 1) - 1
                if left > 0:
                    self._per_address[host] = left
                else:
                    self._per_address.pop(host, None)
            if assoc.admitted:
                assoc.admitted = False
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
