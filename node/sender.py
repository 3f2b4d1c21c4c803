"""C-STORE SCU for result objects, driven by the durable outbox.

An item leaves the outbox only when the destination answered with a success
or warning status. A destination that is down keeps its items pending; they
are retried with exponential backoff and jitter, and nothing is lost across
restarts because the outbox lives in the state database.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from itertools import groupby

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import Destination, NodeConfig
from node.state import OutboxRow, StateStore

LOG = logging.getLogger(__name__)


def set_tcp_nodelay(event: evt.Event) -> None:
    """Disable Nagle's algorithm on the sending socket: without it every C-STORE
    to DCMTK or Orthanc stalls 45-90 ms waiting for a delayed ACK."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a socket closed under us: nothing to tune
            LOG.debug("TCP_NODELAY not set: %s", exc)


def is_stored(code: int) -> bool:
    """Success (0x0000) or a warning (0xBxxx, PS3.4 B.2.3): the destination has the object."""
    return code == 0x0000 or (code >> 12) == 0xB


def retry_delay(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(maximum, initial * (2 ** max(attempts - 1, 0)))
    return delay * (0.5 + 0.5 * (rng or random).random())


def _make_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    ae.connection_timeout = config.send_connect_timeout_s
    ae.acse_timeout = config.network_timeout_s
    ae.dimse_timeout = config.network_timeout_s
    ae.network_timeout = config.network_timeout_s
    ae.maximum_pdu_size = config.max_pdu_size
    return ae


class Sender:
    """Delivers due outbox items, one association per destination and batch."""

    def __init__(self, config: NodeConfig, state: StateStore) -> None:
        self.config = config
        self.state = state
        self.destinations = {str(d): d for d in config.destinations}

    def send_due(self, now: float | None = None) -> int:
        """Try every due item once; returns the number delivered."""
        due = self.state.due_outbox(now)
        delivered = 0
        for name, group in groupby(due, key=lambda row: row.destination):
            items = list(group)
            destination = self.destinations.get(name)
            if destination is None:
                # Kept pending: the destination may come back in the config.
                for item in items:
                    self._failed(item, None, f"destination {name} is not configured")
                continue
            delivered += self._send_batch(destination, items)
        return delivered

    def _failed(self, item: OutboxRow, status: str | None, error: str) -> None:
        delay = retry_delay(item.attempts + 1, self.config.send_retry_initial_s, self.config.send_retry_max_s)
        self.state.mark_attempt_failed(item.id, status, error, time.time() + delay)
        LOG.warning(
            "send of %s to %s failed (attempt %d, retry in %.0f s): %s",
            item.sop_instance_uid,
            item.destination,
            item.attempts + 1,
            delay,
            error,
        )

    def _send_batch(self, destination: Destination, items: list[OutboxRow]) -> int:
        ae = _make_ae(self.config)
        # Only the contexts this batch needs (a PACS may cap their number).
        for sop_class in sorted({item.sop_class_uid for item in items}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        )
        if not assoc.is_established:
            for item in items:
                self._failed(item, None, f"no association with {destination} (refused, rejected or unreachable)")
            return 0
        delivered = 0
        try:
            for item in items:
                if not assoc.is_established:
                    self._failed(item, None, "association lost")
                    continue
                try:
                    status = assoc.send_c_store(item.path)
                except Exception as exc:  # missing file, no accepted context, network error
                    self._failed(item, None, f"{type(exc).__name__}: {exc}")
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code >= 0 and is_stored(code):
                    self.state.mark_sent(item.id, f"0x{code:04X}")
                    delivered += 1
                    level = logging.INFO if code == 0 else logging.WARNING
                    LOG.log(level, "sent %s to %s (status 0x%04X)", item.sop_instance_uid, destination, code)
                elif code == -1:
                    self._failed(item, None, "no response (timeout or aborted association)")
                else:
                    self._failed(item, f"0x{code:04X}", f"refused with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered


def echo(destination: Destination, config: NodeConfig) -> tuple[int | None, float, float]:
    """C-ECHO ``destination``.

    Returns (status or None when no association, association set-up seconds,
    C-ECHO round-trip seconds).
    """
    ae = _make_ae(config)
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    setup = time.perf_counter() - start
    if not assoc.is_established:
        return None, setup, 0.0
    try:
        start = time.perf_counter()
        status = assoc.send_c_echo()
        rtt = time.perf_counter() - start
        return (int(status.Status) if status else None), setup, rtt
    finally:
        assoc.release()


