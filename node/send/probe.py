"""The one check of a destination: C-ECHO for a DICOM peer, QIDO-RS for a DICOMweb one.

``pacs-ai-node echo``, ``pacs-ai-node peers test`` and the status page's
peer check all call :func:`probe_peer` (or :func:`echo_destination` /
:func:`query_dicomweb` directly), so a destination answers the same way
whichever asks, and every failure says why: refused connection, timeout, TLS
handshake, association rejection with its PS3.8 reason, HTTP status.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from node.config import DICOMWEB, ConfigError, Destination, NodeConfig
from node.send.connect import (
    AssociationWatch,
    client_ssl_context,
    dicomweb_session,
    host_port,
    without_source_line,
)

#: Verification SOP Class UID (PS3.4 Annex A.4), the abstract syntax of a C-ECHO.
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class PeerResult:
    """The answer of one destination.

    ``result`` is the short outcome (``"C-ECHO 0x0000"``, ``"HTTP 200"``, ``"no association"``...),
    ``error`` why it failed ("" on success). ``status`` is the C-ECHO status or the HTTP status code
    when the peer answered; ``rtt_ms`` the round trip of the C-ECHO or the QIDO-RS request;
    ``setup_ms`` how long the association request took (DICOM only, also when it failed).
    """

    destination: Destination
    ok: bool
    result: str
    rtt_ms: float | None = None
    error: str = ""
    status: int | None = None
    setup_ms: float | None = None


def echo_destination(destination: Destination, config: NodeConfig, timeout: float, *,
                     connect_timeout: float | None = None) -> PeerResult:
    """C-ECHO (PS3.7 9.1.5) a DICOM destination with the node's AE title, over TLS when configured.

    ``timeout`` bounds the association request, the C-ECHO and the network; ``connect_timeout``
    (default ``timeout``) the TCP connection.
    """
    from pynetdicom import AE

    connect_timeout = timeout if connect_timeout is None else connect_timeout
    try:
        tls = client_ssl_context(destination) if destination.tls else None
    except (OSError, ssl.SSLError) as exc:
        return PeerResult(destination, False, "not tried", error=f"TLS files cannot be loaded: {exc}")
    ae = AE(ae_title=config.ae_title)
    ae.connection_timeout = connect_timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.maximum_pdu_size = config.max_pdu_size
    ae.add_requested_context(VERIFICATION)
    watch = AssociationWatch()
    start = time.perf_counter()
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=watch.handlers(),
                             tls_args=(tls, destination.host) if tls is not None else None)
    except socket.gaierror as exc:  # raised before any connection attempt
        return PeerResult(destination, False, "no association", error=f"cannot resolve {destination.host}: {exc}",
                          setup_ms=(time.perf_counter() - start) * 1000)
    setup_ms = (time.perf_counter() - start) * 1000
    if not assoc.is_established:
        outcome, error = watch.failure(destination.host, destination.port, tls, connect_timeout, timeout)
        return PeerResult(destination, False, outcome, error=error, setup_ms=setup_ms)
    try:
        if not assoc.accepted_contexts:
            return PeerResult(destination, False, "no Verification", setup_ms=setup_ms,
                              error="the peer accepted the association but not the Verification SOP class")
        start = time.perf_counter()
        status = assoc.send_c_echo()
        rtt_ms = (time.perf_counter() - start) * 1000
        if not status or "Status" not in status:
            return PeerResult(destination, False, "no response", setup_ms=setup_ms,
                              error=f"no C-ECHO response within {timeout:g} s (or the association was aborted)")
        code = int(status.Status)
        return PeerResult(destination, code == 0, f"C-ECHO 0x{code:04X}", rtt_ms,
                          "" if code == 0 else "C-ECHO status is not success", status=code, setup_ms=setup_ms)
    finally:
        if assoc.is_established:
            assoc.release()


def query_dicomweb(destination: Destination, timeout: float) -> PeerResult:
    """QIDO-RS ``GET {url}/studies?limit=1`` (PS3.18 10.6) with the destination's credentials.

    Only the status line counts; the body of a success (a study, so patient
    names) is never read.
    """
    import requests

    try:
        session = dicomweb_session(destination)
    except ConfigError as exc:
        return PeerResult(destination, False, "not tried", error=str(exc))
    url = f"{destination.url.rstrip('/')}/studies"
    start = time.perf_counter()
    try:
        with session, session.get(url, params={"limit": "1"}, timeout=(timeout, timeout), stream=True,
                                  allow_redirects=False) as response:
            rtt_ms = (time.perf_counter() - start) * 1000
            code = response.status_code
            result = f"HTTP {code}"
            if code in (200, 204):
                return PeerResult(destination, True, result, rtt_ms, status=code)
            if code in (401, 403):
                error = "authentication refused (check username and password, or the bearer token)"
            else:
                detail = next(response.iter_content(120), b"").decode("utf-8", "replace").strip()
                error = f"QIDO-RS refused: {response.reason}" + (f": {' '.join(detail.split())}" if detail else "")
            return PeerResult(destination, False, result, rtt_ms, error, status=code)
    except requests.Timeout:
        return PeerResult(destination, False, "no answer", error=f"no answer from {url} within {timeout:g} s")
    except (requests.RequestException, OSError) as exc:
        return PeerResult(destination, False, "no answer", error=request_error(url, exc))


def request_error(url: str, exc: Exception) -> str:
    """The reason inside a requests error, without urllib3's retry wrapping."""
    text = str(exc)
    for pattern in (r"\[Errno -?\d+\][^'\")]*", r"\[SSL[^\]]*\][^'\")]*", r"certificate verify failed[^'\")]*"):
        match = re.search(pattern, text)
        if match:
            return f"cannot connect to {url}: {without_source_line(match.group(0))}"
    return f"{type(exc).__name__}: {text[:200]}"


def probe_peer(destination: Destination, config: NodeConfig, timeout: float) -> PeerResult:
    """C-ECHO or QIDO-RS ``destination`` as its kind says; an unexpected error is a failed result."""
    try:
        if destination.kind == DICOMWEB:
            return query_dicomweb(destination, timeout)
        return echo_destination(destination, config, timeout)
    except Exception as exc:  # one odd peer must not hide the others' answers
        return PeerResult(destination, False, "error", error=f"{type(exc).__name__}: {exc}")


def probe_peers(config: NodeConfig, timeout: float) -> list[PeerResult]:
    """Test every destination at once; results in the config's order."""
    if not config.destinations:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(config.destinations))) as pool:
        return list(pool.map(lambda d: probe_peer(d, config, timeout), config.destinations))


def peer_address(destination: Destination) -> str:
    """Where a destination is: its URL, or ``AET@host:port`` (`` TLS`` appended when it uses TLS)."""
    if destination.kind == DICOMWEB:
        return destination.url
    address = f"{destination.ae_title}@{host_port(destination.host, destination.port)}"
    return address + (" TLS" if destination.tls else "")


def peer_text(result: PeerResult) -> str:
    """One line for a page or a log: ``"C-ECHO 0x0000, round trip 2.1 ms"``, with ``": why"`` on failure;
    a DICOMweb result is prefixed ``"QIDO-RS "``."""
    text = ("QIDO-RS " if result.destination.kind == DICOMWEB else "") + result.result
    if result.rtt_ms is not None:
        text += f", round trip {result.rtt_ms:.1f} ms"
    return text + (f": {result.error}" if result.error else "")


__all__ = ["PeerResult", "echo_destination", "peer_address", "peer_text", "probe_peer", "probe_peers",
           "query_dicomweb", "request_error"]
