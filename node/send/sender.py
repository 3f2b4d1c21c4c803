"""Delivery of result objects from the durable outbox: C-STORE SCU and STOW-RS.

An item counts as delivered only when the destination answered with a
success or warning status (and, for a DICOMweb destination with
``confirm = true``, a QIDO-RS look-up finds it). Every other answer is a
failed attempt, recorded with its status and reason:

* a *permanent* refusal (the SOP class or its presentation context is not
  supported, not authorised, the data set does not match the SOP class or
  cannot be understood: PS3.4 B.2.3, PS3.7 C) puts the item in the dead
  letters at once;
* anything else (out of resources, processing failure, no association, a
  timeout, an HTTP error) is retried with exponential backoff and jitter
  until the destination's ``max_attempts`` or ``max_age_s`` is reached, and
  then the item is dead too.

``pacs-ai-node outbox retry`` brings dead items back. Each destination is
served by its own thread, so one that hangs until its connect or DIMSE
timeout delays only its own items. Nothing is lost across restarts: the
outbox lives in the state database, and an item interrupted mid-send is
sent again (result UIDs are deterministic, so the PACS replaces, not
duplicates).
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE

from node.config import DEFAULT_MAX_AGE_S, DICOMWEB, ConfigError, Destination, NodeConfig
from node.send.connect import AssociationWatch, client_ssl_context, dicomweb_session
from node.store.state import OutboxRow, StateStore

if TYPE_CHECKING:
    import requests

    from node.observe.audit import AuditTrail, TransferTally
    from node.observe.metrics import NodeMetrics

LOG = logging.getLogger(__name__)

#: Items per association (or per STOW-RS request, also capped by size).
BATCH_SIZE = 100
#: Largest STOW-RS request body the sender builds.
STOW_MAX_REQUEST_BYTES = 64 * 2**20

#: One STOW-RS part: the outbox item, its bytes, its study and series UIDs.
_StowPart = tuple[OutboxRow, bytes, str, str]

#: C-STORE statuses with their PS3.4 B.2.3 / PS3.7 C meaning.
_STATUS_TEXT = {
    0x0000: "success",
    0x0107: "warning: attribute list error",
    0x0116: "warning: attribute value out of range",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
    0x0110: "failure: processing failure",
    0x0117: "failure: invalid SOP instance",
    0x0122: "refused: SOP class not supported",
    0x0124: "refused: not authorized",
    0x0210: "failure: duplicate invocation",
    0x0211: "failure: unrecognized operation",
    0x0212: "failure: mistyped argument",
    0x0213: "failure: resource limitation",
}
#: Failures that a resend cannot cure: dead at once (PS3.4 B.2.3, PS3.7 C).
_PERMANENT = {0x0117, 0x0122, 0x0124, 0x0211, 0x0212}


def describe_status(code: int) -> str:
    """``0xA700 refused: out of resources``: the code and its meaning."""
    text = _STATUS_TEXT.get(code)
    if text is None:
        if code >> 8 == 0xA7:
            text = "refused: out of resources"
        elif code >> 8 == 0xA9:
            text = "error: data set does not match SOP class"
        elif code >> 12 == 0xC:
            text = "error: cannot understand"
        elif code >> 12 == 0xB:
            text = "warning"
        else:
            text = "failure"
    return f"0x{code:04X} {text}"


def is_stored(code: int) -> bool:
    """Success (0x0000) or a warning (0xBxxx, 0x0107, 0x0116): the destination has the object."""
    return code in (0x0000, 0x0107, 0x0116) or (code >> 12) == 0xB


def is_permanent(code: int) -> bool:
    """A refusal or error that resending the same object cannot cure."""
    return code in _PERMANENT or code >> 8 == 0xA9 or code >> 12 == 0xC


def retry_delay(attempts: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(maximum, initial * 2.0 ** max(attempts - 1, 0))
    jitter = rng.random() if rng is not None else random.random()
    return delay * (0.5 + 0.5 * jitter)


def proposed_transfer_syntaxes(destination: Destination) -> list[UID]:
    """The configured transfer syntax, then Implicit VR Little Endian as the fallback every
    SCP accepts (PS3.5 10.1); each goes in its own presentation context so that the peer
    can accept both and the stored bytes go out unchanged when it accepts the first."""
    configured = UID(destination.transfer_syntax)
    return [configured] if configured == ImplicitVRLittleEndian else [configured, ImplicitVRLittleEndian]


def encode_file(path: Path | str, transfer_syntax: str) -> bytes:
    """A result file's bytes in ``transfer_syntax`` (re-encoded by pydicom, losslessly, only when
    the file is in another uncompressed syntax)."""
    data = Path(path).read_bytes()
    ds = pydicom.dcmread(BytesIO(data))
    if ds.file_meta.TransferSyntaxUID == transfer_syntax:
        return data
    target = UID(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = target
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=target.is_implicit_VR, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _make_ae(config: NodeConfig) -> AE:
    ae = AE(ae_title=config.ae_title)
    ae.connection_timeout = config.send_connect_timeout_s
    ae.acse_timeout = config.send_dimse_timeout_s
    ae.dimse_timeout = config.send_dimse_timeout_s
    ae.network_timeout = config.send_dimse_timeout_s
    ae.maximum_pdu_size = config.max_pdu_size
    return ae


@dataclass(frozen=True)
class Failure:
    """One failed attempt: the peer's status (if it answered) and why."""

    status: str | None
    error: str
    permanent: bool = False
    retry_after: float = 0.0


class Sender:
    """Delivers due outbox items: one thread per destination, one association (or
    STOW-RS request) per batch."""

    def __init__(self, config: NodeConfig, state: StateStore, *, metrics: NodeMetrics | None = None,
                 audit: AuditTrail | None = None) -> None:
        self.state = state
        self.metrics = metrics
        self.audit = audit
        self._batch = threading.local()  # the audit tally of the batch this thread sends
        self._workers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.reconfigure(config)

    def reconfigure(self, config: NodeConfig) -> None:
        """Take new destinations and timings (config reload). Everything is checked before anything
        changes; deliveries already running finish with the destination they started with."""
        ssl_contexts: dict[str, ssl.SSLContext] = {}
        for i, destination in enumerate(config.destinations):
            key = f"send.destinations[{i}]"
            try:
                destination.secret()  # an unset password_env / token_env stops the node now
                if destination.tls or (destination.kind == DICOMWEB and destination.tls_cert_file):
                    ssl_contexts[str(destination)] = client_ssl_context(destination)
            except ConfigError as exc:
                raise ConfigError(f"{key}.{exc}") from None
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{key}: TLS files cannot be loaded: {exc}") from None
            if destination.kind == DICOMWEB and destination.url.startswith("http:") and destination.secret():
                LOG.warning("%s: credentials sent over plain http to %s", key, destination.url)
        with self._lock:
            self.config = config
            self.destinations = {str(d): d for d in config.destinations}
            self._ssl = ssl_contexts

    # -- dispatch -------------------------------------------------------------

    def send_due(self, now: float | None = None) -> int:
        """Start a delivery thread for each destination with due items and none running.

        Returns at once with the number of threads started: a destination that
        hangs (connect or DIMSE timeout) holds only its own thread.
        """
        started = 0
        for name in self.state.due_destinations(now):
            destination = self.destinations.get(name)
            if destination is None:
                # Kept until its age runs out: the destination may come back in the config.
                self._fail_all(name, None, Failure(None, f"destination {name} is not configured"), now)
                continue
            with self._lock:
                running = self._workers.get(name)
                if running is not None and running.is_alive():
                    continue
                worker = threading.Thread(target=self._deliver_logged, args=(destination, now),
                                          name=f"send {name}", daemon=True)
                self._workers[name] = worker
                worker.start()
            started += 1
        return started

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for the delivery threads; True when none is running any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in workers)

    def _deliver_logged(self, destination: Destination, now: float | None) -> None:
        try:
            self.deliver_due(destination, now)
        except Exception:  # items stay pending; the next round tries again
            LOG.exception("delivery to %s failed with an internal error", destination)

    def deliver_due(self, destination: Destination, now: float | None = None) -> int:
        """Deliver every due item of ``destination`` in this thread, batch by batch; returns how
        many were delivered. Stops at the first batch that could not reach the destination."""
        delivered = 0
        woken = False
        tried: set[int] = set()
        session = self._http_session(destination) if destination.kind == DICOMWEB else None
        try:
            while True:
                items = [i for i in self.state.due_outbox(now, BATCH_SIZE, destination=str(destination))
                         if i.id not in tried]
                if not items:
                    return delivered
                tried.update(i.id for i in items)
                self._batch.tally = self._new_tally()
                if session is not None:
                    count, reachable = self._send_stow(destination, items, session, now)
                else:
                    count, reachable = self._send_dicom(destination, items, now)
                self._report_batch(destination)
                delivered += count
                if not reachable:
                    return delivered
                if count and not woken:
                    # It answers again: what waits out a backoff from the outage goes now, not
                    # one item at a time as each item's own timer runs out.
                    woken = True
                    brought = self.state.make_due(str(destination), now)
                    if brought:
                        LOG.info("%s answers again: %d waiting items are due now", destination, brought)
        finally:
            if session is not None:
                session.close()

    # -- outcomes -------------------------------------------------------------

    def _retry_at(self, destination: Destination | None, item: OutboxRow, failure: Failure,
                  now: float) -> float | None:
        """When to try again, or None when the item is dead."""
        attempts = item.attempts + 1
        max_attempts = destination.max_attempts if destination else 0
        max_age = destination.max_age_s if destination else DEFAULT_MAX_AGE_S
        if failure.permanent or (max_attempts and attempts >= max_attempts) or (
                max_age and now - item.age_from >= max_age):
            return None
        delay = retry_delay(attempts, self.config.send_retry_initial_s, self.config.send_retry_max_s)
        return now + max(delay, failure.retry_after)

    def _new_tally(self) -> TransferTally | None:
        if self.audit is None:
            return None
        from node.observe.audit import TransferTally

        return TransferTally()

    def _study_of(self, series_uid: str) -> str | None:
        """The study of a series, looked up once per batch (a batch is mostly one series)."""
        studies: dict[str, str | None] = self._batch.__dict__.setdefault("studies", {})
        if series_uid not in studies:
            row = self.state.get_series(series_uid)
            studies[series_uid] = row.study_uid if row else None
        return studies[series_uid]

    def _report_batch(self, destination: Destination) -> None:
        tally, self._batch.tally = getattr(self._batch, "tally", None), None
        self._batch.studies = {}
        if tally is None or not tally.studies:
            return
        address = destination.url if destination.kind == DICOMWEB else f"{destination.ae_title}"
        peer = destination.url if destination.kind == DICOMWEB else f"{destination.host}:{destination.port}"
        try:
            tally.report_sent(self.audit, destination_name=str(destination), destination_ae_or_url=address,
                              peer=peer)
        except Exception:  # the audit trail logs its own write errors; delivery goes on
            LOG.exception("could not audit the batch sent to %s", destination)

    def _sent(self, destination: Destination, item: OutboxRow, status: str, warning: bool) -> None:
        self.state.mark_sent(item.id, status)
        if self.metrics is not None:
            self.metrics.send_attempt(str(destination), "warning" if warning else "ok")
        tally = getattr(self._batch, "tally", None)
        if tally is not None:
            tally.stored(self._study_of(item.series_uid) or "unknown", item.sop_class_uid)
        LOG.log(logging.WARNING if warning else logging.INFO, "sent %s to %s (%s)", item.sop_instance_uid,
                destination, status, extra={"destination": str(destination), "series_uid": item.series_uid,
                                            "sop_instance_uid": item.sop_instance_uid})

    def _failed(self, destination: Destination, item: OutboxRow, failure: Failure) -> None:
        now = time.time()
        retry_at = self._retry_at(destination, item, failure, now)
        self.state.mark_failed([(item.id, failure.status, failure.error, retry_at)])
        if self.metrics is not None:
            self.metrics.send_attempt(str(destination), "failed", dead=retry_at is None)
        tally = getattr(self._batch, "tally", None)
        if tally is not None:
            tally.refused(self._study_of(item.series_uid), failure.status or "no status")
        self._log_failure(str(destination), item, failure, retry_at, now)

    def _fail_all(self, name: str, destination: Destination | None, failure: Failure, now: float | None) -> None:
        """The destination could not be reached: every item due for it has failed an attempt."""
        items = self.state.due_outbox(now, None, destination=name)
        moment = time.time()
        updates = [(i.id, failure.status, failure.error, self._retry_at(destination, i, failure, moment))
                   for i in items]
        self.state.mark_failed(updates)
        dead = [(i, u[3]) for i, u in zip(items, updates) if u[3] is None]
        if self.metrics is not None and items:
            if dead:
                self.metrics.send_attempt(name, "failed", dead=True, count=len(dead))
            if len(items) > len(dead):
                self.metrics.send_attempt(name, "failed", count=len(items) - len(dead))
        for item, _ in dead:
            self._log_failure(name, item, failure, None, moment)
        waiting = [u[3] for u in updates if u[3] is not None]
        if waiting:
            reason = f"{failure.status}: {failure.error}" if failure.status else failure.error
            LOG.warning("send of %d items to %s failed (next attempt in %.1f s or later): %s", len(waiting), name,
                        min(waiting) - moment, reason, extra={"destination": name})

    @staticmethod
    def _log_failure(name: str, item: OutboxRow, failure: Failure, retry_at: float | None, now: float) -> None:
        what = f"{failure.status}: {failure.error}" if failure.status else failure.error
        extra = {"destination": name, "series_uid": item.series_uid, "sop_instance_uid": item.sop_instance_uid}
        if retry_at is None:
            LOG.error("%s to %s is dead after %d attempts (%s); `pacs-ai-node outbox retry --id %d` resends it",
                      item.sop_instance_uid, name, item.attempts + 1, what, item.id, extra=extra)
        else:
            LOG.warning("send of %s to %s failed (attempt %d, retry in %.1f s): %s", item.sop_instance_uid, name,
                        item.attempts + 1, retry_at - now, what, extra=extra)

    # -- DICOM ----------------------------------------------------------------

    def _send_dicom(self, destination: Destination, items: list[OutboxRow], now: float | None) -> tuple[int, bool]:
        """One association for ``items``; returns (delivered, whether the destination was reached)."""
        ae = _make_ae(self.config)
        # Only the contexts this batch needs (a PACS may cap their number).
        for sop_class in sorted({item.sop_class_uid for item in items}):
            for syntax in proposed_transfer_syntaxes(destination):
                ae.add_requested_context(sop_class, [syntax])
        name = str(destination)
        tls = self._ssl.get(name)
        watch = AssociationWatch()
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=watch.handlers(),
            tls_args=(tls, destination.host) if tls is not None else None,
        )
        rejected_contexts = {str(cx.abstract_syntax): str(cx.status) for cx in assoc.rejected_contexts}
        if not assoc.is_established and not (rejected_contexts and not assoc.accepted_contexts):
            _, error = watch.failure(destination.host, destination.port, tls, self.config.send_connect_timeout_s,
                                     self.config.send_dimse_timeout_s)
            self._fail_all(name, destination, Failure(None, error), now)
            return 0, False
        delivered = 0
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        try:
            for item in items:
                if item.sop_class_uid not in accepted:
                    reason = rejected_contexts.get(item.sop_class_uid, "not accepted")
                    self._failed(destination, item, Failure(
                        f"presentation context rejected: {reason.lower()}",
                        f"{destination.ae_title} does not accept {UID(item.sop_class_uid).name}", permanent=True))
                    continue
                if not assoc.is_established:
                    self._failed(destination, item, Failure(None, "association lost"))
                    continue
                if not Path(item.path).is_file():
                    self._failed(destination, item, Failure(None, f"result file {item.path} is missing",
                                                            permanent=True))
                    continue
                try:
                    response = assoc.send_c_store(item.path)
                except Exception as exc:  # unreadable file, encoding or network error
                    self._failed(destination, item, Failure(None, f"{type(exc).__name__}: {exc}"))
                    continue
                code = int(response.Status) if response and "Status" in response else None
                if code is None:
                    self._failed(destination, item, Failure(
                        None, f"no response within {self.config.send_dimse_timeout_s:g} s (or the association was "
                              "aborted)"))
                elif is_stored(code):
                    self._sent(destination, item, describe_status(code), warning=code != 0)
                    delivered += 1
                else:
                    comment = str(response.get("ErrorComment", "") or "").strip()
                    refusal = f"refused by {destination.ae_title}" + (f": {comment}" if comment else "")
                    self._failed(destination, item, Failure(describe_status(code), refusal,
                                                            permanent=is_permanent(code)))
        finally:
            if assoc.is_established:
                assoc.release()
        return delivered, True

    # -- DICOMweb -------------------------------------------------------------

    def _http_session(self, destination: Destination) -> requests.Session:
        return dicomweb_session(destination)

    def _send_stow(self, destination: Destination, items: list[OutboxRow], session: requests.Session,
                   now: float | None) -> tuple[int, bool]:
        """STOW-RS requests for ``items`` (split by size); returns (delivered, reached)."""
        import requests

        parts: list[_StowPart] = []
        for item in items:
            try:
                data = encode_file(item.path, destination.transfer_syntax)
                header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True,
                                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
                parts.append((item, data, str(header.StudyInstanceUID), str(header.SeriesInstanceUID)))
            except FileNotFoundError:
                self._failed(destination, item, Failure(None, f"result file {item.path} is missing", permanent=True))
            except Exception as exc:  # a damaged result file: resending cannot help
                self._failed(destination, item, Failure(None, f"result file {item.path} cannot be read: {exc}",
                                                        permanent=True))
        delivered = 0
        for chunk in _chunks(parts, STOW_MAX_REQUEST_BYTES):
            boundary = uuid.uuid4().hex
            body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data)
                            for _, data, _, _ in chunk) + b"--%s--\r\n" % boundary.encode()
            try:
                response = session.post(
                    f"{destination.url.rstrip('/')}/studies",
                    data=body,
                    headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
                    timeout=(self.config.send_connect_timeout_s, self.config.send_dimse_timeout_s),
                )
            except requests.RequestException as exc:
                self._fail_all(str(destination), destination, Failure(None, f"STOW-RS: {type(exc).__name__}: {exc}"),
                               now)
                return delivered, False
            outcome = stow_outcomes(response.status_code, response.reason, response.headers.get("Retry-After"),
                                    response.content, [item.sop_instance_uid for item, _, _, _ in chunk])
            if isinstance(outcome, Failure):  # the request as a whole failed: so will the next
                self._fail_all(str(destination), destination, outcome, now)
                return delivered, False
            for item, _, study, series in chunk:
                result = outcome[item.sop_instance_uid]
                if isinstance(result, Failure):
                    self._failed(destination, item, result)
                    continue
                status, warning = result
                if destination.confirm:
                    missing = self._qido_missing(destination, session, study, series, item.sop_instance_uid)
                    if missing:
                        self._failed(destination, item, Failure(status, missing))
                        continue
                    status += ", confirmed by QIDO-RS"
                self._sent(destination, item, status, warning)
                delivered += 1
        return delivered, True

    def _qido_missing(self, destination: Destination, session: requests.Session, study: str, series: str,
                      sop_instance_uid: str) -> str | None:
        """None when QIDO-RS lists the instance; otherwise why it counts as not delivered."""
        import requests

        url = f"{destination.url.rstrip('/')}/studies/{study}/series/{series}/instances"
        try:
            response = session.get(url, params={"SOPInstanceUID": sop_instance_uid},
                                   timeout=(self.config.send_connect_timeout_s, self.config.send_dimse_timeout_s))
        except requests.RequestException as exc:
            return f"stored, but the QIDO-RS confirmation failed: {type(exc).__name__}: {exc}"
        if response.status_code == 200:
            try:
                found = response.json()
            except ValueError:
                found = []
            for dataset in found if isinstance(found, list) else []:
                if sop_instance_uid in _values(dataset, "00080018"):
                    return None
        elif response.status_code not in (204, 404):
            return f"stored, but the QIDO-RS confirmation failed: HTTP {response.status_code} {response.reason}"
        return "stored according to STOW-RS, but QIDO-RS does not find it"


def _chunks(parts: list[_StowPart], max_bytes: int) -> list[list[_StowPart]]:
    """Consecutive groups of parts whose data stay under ``max_bytes`` (one part may exceed it alone)."""
    groups: list[list[_StowPart]] = []
    size = 0
    for part in parts:
        if not groups or size + len(part[1]) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += len(part[1])
    return groups


def _values(dataset: object, tag: str) -> list[Any]:
    """The Value list of ``tag`` in a DICOM JSON dataset (PS3.18 F.2), or []."""
    element = dataset.get(tag) if isinstance(dataset, dict) else None
    value = element.get("Value") if isinstance(element, dict) else None
    return value if isinstance(value, list) else []


def stow_outcomes(
    http_status: int, reason: str, retry_after: str | None, body: bytes, sop_instance_uids: list[str]
) -> Failure | dict[str, Failure | tuple[str, bool]]:
    """What a STOW-RS response (PS3.18 10.5.3) says about each instance sent.

    A Failure for the whole request (no instance stored: HTTP errors), or per SOP
    Instance UID either (status text, is a warning) or a Failure. An instance the
    response does not list as stored counts as not stored, even under HTTP 200.
    """
    if http_status not in (200, 202, 409):
        wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else 0.0
        detail = body[:200].decode("utf-8", "replace").strip()
        return Failure(f"HTTP {http_status} {reason}".strip(),
                       "STOW-RS request refused" + (f": {detail}" if detail else ""), retry_after=wait)
    try:
        document = json.loads(body) if body else None
    except ValueError:
        document = None
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not isinstance(document, dict):
        if http_status == 200:  # lenient: a server that says "all stored" without a body
            return {uid: (f"HTTP {http_status}", False) for uid in sop_instance_uids}
        return Failure(f"HTTP {http_status} {reason}".strip(), "STOW-RS response without a readable body")
    stored: dict[str, int | None] = {}
    for ref in _values(document, "00081199"):  # Referenced SOP Sequence
        for uid in _values(ref, "00081155"):
            warnings = _values(ref, "00081196")  # Warning Reason
            stored[uid] = int(warnings[0]) if warnings else None
    failed: dict[str, int] = {}
    for ref in _values(document, "00081198"):  # Failed SOP Sequence
        for uid in _values(ref, "00081155"):
            reasons = _values(ref, "00081197")  # Failure Reason
            failed[uid] = int(reasons[0]) if reasons else 0x0110
    out: dict[str, Failure | tuple[str, bool]] = {}
    for uid in sop_instance_uids:
        if uid in stored:
            warning = stored[uid]
            out[uid] = (f"HTTP {http_status}" + (f", {describe_status(warning)}" if warning is not None else ""),
                        warning is not None)
        elif uid in failed:
            out[uid] = Failure(f"HTTP {http_status}, {describe_status(failed[uid])}",
                               "refused in the STOW-RS response", permanent=is_permanent(failed[uid]))
        else:
            out[uid] = Failure(f"HTTP {http_status}", "not listed as stored in the STOW-RS response")
    return out
