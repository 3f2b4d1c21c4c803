"""Reaching a destination: TLS context, socket tuning, DICOMweb session, and why a connection failed.

Shared by the sender (:mod:`node.send.sender`) and the peer probe
(:mod:`node.send.probe`), so that a delivery and a check of the same
destination connect the same way and explain a failure in the same words.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING

from pynetdicom import evt
from pynetdicom.pdu_primitives import A_ASSOCIATE

from node.config import Destination

if TYPE_CHECKING:
    import requests

LOG = logging.getLogger(__name__)


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:104``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def set_tcp_nodelay(event: evt.Event) -> None:
    """Disable Nagle's algorithm on the sending socket: without it every C-STORE
    to DCMTK or Orthanc stalls 45-90 ms waiting for a delayed ACK."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a socket closed under us: nothing to tune
            LOG.debug("TCP_NODELAY not set: %s", exc)


def client_ssl_context(destination: Destination) -> ssl.SSLContext:
    """TLS 1.2 or later; the server's certificate checked against ``tls_ca_file`` (or the
    system CAs) unless ``tls_verify = false``; a client certificate when configured."""
    context = ssl.create_default_context(cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not destination.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if destination.tls_cert_file is not None:
        context.load_cert_chain(str(destination.tls_cert_file),
                                str(destination.tls_key_file) if destination.tls_key_file else None)
    return context


def dicomweb_session(destination: Destination) -> requests.Session:
    """A requests session that authenticates and checks certificates for ``destination`` (STOW-RS,
    QIDO-RS confirmation, ``peers test`` and the status page's check all use it).

    Raises ConfigError when ``password_env`` / ``token_env`` is unset.
    """
    import requests

    session = requests.Session()
    secret = destination.secret()
    if secret is not None and secret[0] == "basic":
        session.auth = (destination.username, secret[1])
    elif secret is not None:
        session.headers["Authorization"] = f"Bearer {secret[1]}"
    session.verify = str(destination.tls_ca_file) if destination.tls_ca_file and destination.tls_verify \
        else destination.tls_verify
    if destination.tls_cert_file is not None:
        session.cert = (str(destination.tls_cert_file), str(destination.tls_key_file)) \
            if destination.tls_key_file else str(destination.tls_cert_file)
    session.headers["Accept"] = "application/dicom+json"
    return session


def connect_error(host: str, port: int, tls: ssl.SSLContext | None, timeout: float, elapsed: float) -> str:
    """Why no connection was made to ``host:port`` after ``elapsed`` of ``timeout`` seconds.

    pynetdicom logs the reason but does not return it: a timeout says so, else a
    second, plain connection attempt (and TLS handshake) tells what went wrong.
    """
    where = host_port(host, port)
    if elapsed >= 0.9 * timeout:
        return f"cannot connect to {where}: no answer within {timeout:g} s"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if tls is not None:
                with tls.wrap_socket(sock, server_hostname=host):
                    pass
    except OSError as exc:  # ssl.SSLError included: certificate problems are named
        return f"cannot connect to {where}: {without_source_line(str(exc))}"
    return f"cannot connect to {where} (a second attempt could)"


class AssociationWatch:
    """What pynetdicom does not return when an association fails: whether the TCP connection was
    made, and the reason of an A-ASSOCIATE-RJ. Pass :meth:`handlers` to ``AE.associate`` (with
    TCP_NODELAY set on the new socket); after a failure :meth:`failure` says why in one sentence."""

    def __init__(self) -> None:
        self.connected = False
        self.rejection = ""
        self.started = time.monotonic()

    def handlers(self) -> list[evt.EventHandlerType]:
        """Event handlers for ``AE.associate(evt_handlers=...)``; also restarts the clock."""
        self.started = time.monotonic()
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_ACSE_RECV, self._on_acse)]

    def _on_open(self, event: evt.Event) -> None:
        self.connected = True
        set_tcp_nodelay(event)

    def _on_acse(self, event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):  # A-ASSOCIATE-RJ, PS3.8 9.3.4
            lasting = "permanent" if primitive.result == 0x01 else "transient"
            self.rejection = f"by the {primitive.source_str.lower()} ({lasting}): {primitive.reason_str}"

    def failure(self, host: str, port: int, tls: ssl.SSLContext | None, connect_timeout: float,
                answer_timeout: float) -> tuple[str, str]:
        """(outcome, error) of an association that was not established: ``"rejected"`` with the
        peer's reason, ``"no association"`` (no connection, or no answer within ``answer_timeout``),
        or ``"aborted"`` (the peer closed the connection before accepting)."""
        elapsed = time.monotonic() - self.started
        if self.rejection:
            return "rejected", f"association rejected {self.rejection}"
        if not self.connected:
            return "no association", connect_error(host, port, tls, connect_timeout, elapsed)
        if elapsed >= 0.9 * answer_timeout:
            return "no association", f"no answer to the association request within {answer_timeout:g} s"
        return "aborted", ("the peer closed the connection before accepting the association"
                           + (" (TLS: does it accept the client certificate?)" if tls is not None else ""))


def without_source_line(text: str) -> str:
    """An OpenSSL message without its ``(_ssl.c:1006)`` suffix."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)?", "", text).strip()


__all__ = ["AssociationWatch", "client_ssl_context", "connect_error", "dicomweb_session", "host_port",
           "set_tcp_nodelay", "without_source_line"]
