"""DICOMweb STOW-RS ingest (PS3.18 10.5): ``POST /studies`` into the same :class:`~node.intake.Intake`.

The HTTP side is thin glue around the one door for received instances: each
``application/dicom`` part of a ``multipart/related`` request body goes through
:meth:`Intake.accept_part10_file` (header check, durable write, state record) and
its DICOM status becomes an item of the Store Instances Response (PS3.18
Annex I). The response is sent only after every part has been handled, so an
instance listed in Referenced SOP Sequence is fsynced and recorded, the same
promise as a C-STORE success.

Routes (every base path in ``base_paths``; by default ``""`` and
``"/dicom-web"``, so both ``http://node:8080/studies`` and the
``http://node:8080/dicom-web`` base URL that most DICOMweb clients and PACS
use by default work):

- ``POST {base}/studies``
- ``POST {base}/studies/{StudyInstanceUID}``: an instance of another study
  is not stored and fails with :data:`STUDY_MISMATCH`.

Request bodies (PS3.18 10.5.1): ``multipart/related; type="application/dicom";
boundary=...`` whose parts are PS3.10 files (a part with no Content-Type of its
own is taken as ``application/dicom``), or, as a convenience for ``curl``, one
PS3.10 file sent as ``Content-Type: application/dicom``. Metadata and bulk
data STOW (``type="application/dicom+json"`` or ``+xml``) is refused with 415.
The body is parsed as it streams in (python-multipart): each part is written
to a temporary file in the spool as it arrives, like a C-STORE's P-DATA
fragments (only its first 64 KiB stay in memory, to name a refused instance),
so the memory a request takes does not grow with its parts; a complete part is
checked and stored while the next one arrives.

HTTP statuses (PS3.18 Table 10.5.3-1 and Section 8.5):

====  =====================================================================
200   every instance stored
202   some stored, some failed (Failed SOP Sequence says which and why)
400   bad syntax: no or bad boundary, broken multipart body, no part, a
      Study Instance UID in the path that is not a UID
406   the Accept header allows no ``application/dicom+json`` response
408   no body bytes for ``idle_timeout_s`` (the node's ``[node] network_timeout_s``)
409   nothing stored: every instance failed (unsupported SOP class, study
      mismatch, cannot be parsed, ...; the body says which and why)
413   ``Content-Length`` or the bytes received over ``max_request_bytes``
      (or a single-part body over ``max_part_bytes``); reading stops there
415   a Content-Type other than the two above
503   nothing stored because every failure was "out of resources" that may
      pass (free disk under the watermark, a write that failed); with
      ``Retry-After``, which DICOMweb clients honour by retrying. Also, before
      reading anything, for a request over ``[http] http_max_concurrency``
      in flight (:class:`node.http.server.ConcurrencyLimit`)
====  =====================================================================

Failure Reason values (PS3.18 Table I.2-2) are the intake's C-STORE statuses:
``0xA700`` out of resources (free disk under the watermark, a failed write, or
a part over ``max_part_bytes``), ``0xA900`` dataset does not match its SOP
class, ``0xC000`` cannot be parsed (no UIDs then, unless the header could be
read) or a part that is not ``application/dicom``, ``0x0122`` SOP class not
supported, ``0x0110`` processing failure (an unexpected error, logged with its
traceback), and ``0xA901`` (:data:`STUDY_MISMATCH`)
for an instance whose Study Instance UID differs from the one in the request
URL: PS3.18 names no code for this, A9xx is the table's "Data Set does not
match" range, and 0xA901 (43265) is the value Microsoft's DICOM service uses.
A duplicate (same SOP Instance UID as an earlier instance) replaces the earlier
copy and is a plain success, as for C-STORE, so it carries no Warning Reason.
When a request-level error (400, 413) stops reading after some parts were
stored, those stay stored and recorded (a resend replaces them); the text of
the error says how many.

A request that ends normally is the STOW-RS counterpart of a released
association: with ``complete_on_release`` set, a series it carried whole (and
gap-free) is queued at once (:meth:`Intake.association_ended`, keyed by a
per-request id passed to the intake as ``association``).

Retrieve URL (0008,1190) is sent empty (type 2): the node has no WADO-RS.
The client address in logs and in the state's ``calling_ae`` column
(``STOW-RS <ip>``) is the TCP peer's; X-Forwarded-For is not trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from node.receive.intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    STUDY_MISMATCH,
    SUCCESS,
    Intake,
    IntakeResult,
    TempFile,
)
from node.store.spool import SpoolError, check_uid

LOG = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
PROCESSING_FAILURE = 0x0110  # PS3.18 Table I.2-2: an unexpected error while storing
DEFAULT_MAX_PART_BYTES = 1024 * 2**20
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**30
DEFAULT_BASE_PATHS = ("", "/dicom-web")
RETRY_AFTER_S = 60  # for 503 when the disk is under the watermark
DEFAULT_IDLE_TIMEOUT_S = 60.0  # the longest wait for the next body bytes (408 after it)

_PREAMBLE_LIMIT = 64 * 1024  # RFC 2046 preamble (e.g. dicomweb-client's leading CRLF) kept at most
_MAX_HEADER_BYTES = 16 * 1024  # of one part header line (name or value): RFC 2046 sets none, we must
_HEAD_BYTES = 64 * 1024  # of each part, kept in memory: enough to name a refused instance in the response
_PEEK_TAGS = ["SOPClassUID", "SOPInstanceUID"]
_ACCEPTABLE = {"*/*", "application/*", DICOM_JSON, "application/json"}

# DICOM JSON tags (PS3.18 Annex F) of the Store Instances Response Module (PS3.18 Table I.1-1).
_RETRIEVE_URL = "00081190"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


class _RequestError(Exception):
    """A request-level failure: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Part:
    """One body part as received: its headers, its first bytes, and the rest in a temporary spool file."""

    headers: dict[str, str] = field(default_factory=dict)
    head: bytearray = field(default_factory=bytearray)
    temp: TempFile | None = None
    size: int = 0
    oversized: bool = False
    error: str | None = None  # the temporary file could not be made or written
    foreign: bool = False  # not application/dicom: refused when it ends

    def write(self, data: bytes | memoryview, max_bytes: int, new_temp: Callable[[], TempFile]) -> None:
        """Append ``data``: to the head, and to the temporary file while the part is an instance to store."""
        self.size += len(data)
        if len(self.head) < _HEAD_BYTES:
            self.head += data[:_HEAD_BYTES - len(self.head)]
        if self.oversized or self.error is not None or self.foreign:
            return  # refused when it ends: only the head is kept
        if self.size > max_bytes:
            self.oversized = True
            self.discard()
            return
        try:
            if self.temp is None:
                if not self.is_dicom:
                    self.foreign = True
                    return
                self.temp = new_temp()
            self.temp.file.write(data)
        except OSError as exc:
            self.error = f"cannot store: {exc}"
            self.discard()

    @property
    def is_dicom(self) -> bool:
        return _media_type(self.headers.get("content-type", "application/dicom"))[0] == "application/dicom"

    def discard(self) -> None:
        """Remove the temporary file, if any (idempotent)."""
        if self.temp is not None:
            self.temp.discard()
            self.temp = None


@dataclass(frozen=True)
class _Outcome:
    """What happened to one part: the intake's status and UIDs, as far as they are known."""

    status: int
    reason: str | None
    sop_class_uid: str | None
    sop_instance_uid: str | None
    retryable: bool = False  # a failure that may pass on its own (disk watermark, write error)

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class _MultipartCollector:
    """Feeds body chunks to python-multipart and collects complete parts, bounded per part."""

    def __init__(self, boundary: bytes, max_part_bytes: int, new_temp: Callable[[], TempFile]) -> None:
        self.boundary = boundary
        self.max_part_bytes = max_part_bytes
        self.new_temp = new_temp
        self.completed: list[_Part] = []
        self.parts_seen = 0
        self.ended = False
        self._preamble: bytearray | None = bytearray()
        self._current: _Part | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._header_bytes(self._field, data, start, end),
                "on_header_value": lambda data, start, end: self._header_bytes(self._value, data, start, end),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse ``chunk``; raises MultipartParseError on bad syntax."""
        if self._preamble is not None:
            # python-multipart expects the first delimiter at offset 0; RFC 2046
            # allows a preamble before it (dicomweb-client sends a CRLF).
            self._preamble.extend(chunk)
            start = self._find_first_delimiter(self._preamble)
            if start is None:
                if len(self._preamble) > _PREAMBLE_LIMIT:
                    raise MultipartParseError(
                        f"no delimiter --{self.boundary.decode('latin-1')} in the first {_PREAMBLE_LIMIT} bytes"
                    )
                return
            chunk, self._preamble = bytes(self._preamble[start:]), None
        if not self.ended and chunk:
            self._parser.write(chunk)

    def _find_first_delimiter(self, data: bytearray) -> int | None:
        delimiter = b"--" + self.boundary
        if data.startswith(delimiter):
            return 0
        at = data.find(b"\r\n" + delimiter)
        return None if at < 0 else at + 2

    @staticmethod
    def _header_bytes(into: bytearray, data: bytes, start: int, end: int) -> None:
        into.extend(data[start:end])
        if len(into) > _MAX_HEADER_BYTES:
            raise MultipartParseError(f"a part header over {_MAX_HEADER_BYTES} bytes")

    def _part_begin(self) -> None:
        self._current = _Part()
        self.parts_seen += 1

    def _header_end(self) -> None:
        if self._current is not None:
            name = self._field.decode("latin-1").strip().lower()
            self._current.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(memoryview(data)[start:end], self.max_part_bytes, self.new_temp)

    def _part_end(self) -> None:
        if self._current is not None:
            self.completed.append(self._current)
        self._current = None

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        """Remove the temporary files of the parts not handed over (a request that stops early)."""
        for part in [*self.completed, *([self._current] if self._current is not None else [])]:
            part.discard()
        self.completed.clear()
        self._current = None


def _peek_uids(data: bytes) -> tuple[str | None, str | None]:
    """(SOP Class, SOP Instance) UIDs from a PS3.10 header, None where unreadable."""
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_PEEK_TAGS)
    except Exception:  # a header that cannot be read has no UIDs to report
        return None, None

    def uid(keyword: str) -> str | None:
        try:
            return check_uid(ds.get(keyword), keyword)
        except SpoolError:
            return None

    return uid("SOPClassUID"), uid("SOPInstanceUID")


def _media_type(value: str | None) -> tuple[str, dict[str, str]]:
    media, params = parse_options_header(value or "")
    return (
        media.decode("latin-1").strip().lower(),
        {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()},
    )


def _accepts_dicom_json(accept: str | None) -> bool:
    if not accept or not accept.strip():
        return True
    return any(_media_type(item)[0] in _ACCEPTABLE for item in accept.split(","))


def store_instances_response(outcomes: Sequence[_Outcome]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table I.1-1) in the DICOM JSON model."""

    def reference(outcome: _Outcome) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for tag, value in ((_REFERENCED_SOP_CLASS_UID, outcome.sop_class_uid),
                           (_REFERENCED_SOP_INSTANCE_UID, outcome.sop_instance_uid)):
            item[tag] = {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}
        return item

    body: dict[str, Any] = {_RETRIEVE_URL: {"vr": "UR"}}
    failed = [o for o in outcomes if not o.ok]
    stored = [o for o in outcomes if o.ok]
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
            {**reference(o), _FAILURE_REASON: {"vr": "US", "Value": [o.status]}} for o in failed
        ]}
    if stored:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
            {**reference(o), _RETRIEVE_URL: {"vr": "UR"}} for o in stored
        ]}
    return body


def response_status(outcomes: Sequence[_Outcome]) -> int:
    """HTTP status of a Store Instances response (PS3.18 Table 10.5.3-1); see the module docstring."""
    stored = sum(o.ok for o in outcomes)
    if stored == len(outcomes):
        return 200
    if stored:
        return 202
    if all(o.retryable for o in outcomes):
        return 503
    return 409


@dataclass
class _StowRequest:
    """What one request has done so far (for the response and the log line)."""

    client: str
    expected_study: str | None
    request_id: str = field(default_factory=lambda: f"stow-{uuid.uuid4().hex[:12]}")
    outcomes: list[_Outcome] = field(default_factory=list)
    received: int = 0

    @property
    def source(self) -> str:
        return f"STOW-RS {self.client}"

    @property
    def stored(self) -> int:
        return sum(o.ok for o in self.outcomes)


class StowService:
    """The STOW-RS endpoint: streams parts out of a request into the intake."""

    def __init__(self, intake: Intake, *, max_part_bytes: int, max_request_bytes: int,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.intake = intake
        self.max_part_bytes = max_part_bytes
        self.max_request_bytes = max_request_bytes
        self.idle_timeout_s = idle_timeout_s

    async def store(self, request: Request) -> Response:
        """``POST {base}/studies[/{study}]``: the Store Instances transaction (PS3.18 10.5)."""
        started = time.monotonic()
        stow = _StowRequest(client=request.client.host if request.client else "unknown", expected_study=None)
        try:
            stow.expected_study = self._expected_study(request)
            if not _accepts_dicom_json(request.headers.get("accept")):
                raise _RequestError(406, f"the response is {DICOM_JSON}; Accept allows only "
                                         f"{request.headers.get('accept')!r}")
            media, params = _media_type(request.headers.get("content-type"))
            if media not in ("multipart/related", "application/dicom"):
                raise _RequestError(415, f"Content-Type {media or '(none)'!r} is not supported: send "
                                         'multipart/related; type="application/dicom" (or one application/dicom file)')
            self._check_length(request, media)
            if media == "multipart/related":
                await self._store_multipart(request, params, stow)
            else:
                await self._store_single(request, stow)
        except _RequestError as exc:
            message = exc.message + (f" ({stow.stored} instances before this were stored)" if stow.stored else "")
            LOG.warning("STOW-RS %s from %s refused (HTTP %d): %s", stow.request_id, stow.client, exc.status, message)
            return PlainTextResponse(message + "\n", status_code=exc.status)
        except ClientDisconnect:
            LOG.warning("STOW-RS %s from %s: client disconnected after %d bytes (%d instances stored)",
                        stow.request_id, stow.client, stow.received, stow.stored)
            return Response(status_code=400)  # nobody reads it
        if stow.stored:
            # The request is the STOW-RS counterpart of a released association: a
            # series it carried whole is complete now, not after the quiet period.
            try:
                await run_in_threadpool(self.intake.association_ended, stow.request_id, True,
                                        "STOW-RS request completed")
            except Exception:  # the instances are stored; the quiet timer completes their series
                LOG.exception("could not evaluate the series of STOW-RS request %s", stow.request_id)
        try:
            await run_in_threadpool(self.intake.transfer_finished, stow.request_id, calling_ae=stow.source,
                                    peer_ip=stow.client, via="STOW-RS")
        except Exception:  # the audit trail logs its own write errors; the response must still go out
            LOG.exception("could not audit STOW-RS request %s", stow.request_id)
        status = response_status(stow.outcomes)
        failed = [o for o in stow.outcomes if not o.ok]
        reasons = "; ".join(sorted({f"0x{o.status:04X} {o.reason}" for o in failed}))
        LOG.info("STOW-RS %s from %s: %d stored, %d failed, %.1f MB in %.2f s (HTTP %d)%s", stow.request_id,
                 stow.client, stow.stored, len(failed), stow.received / 1e6, time.monotonic() - started, status,
                 f"; {reasons[:2000]}" if failed else "")
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(store_instances_response(stow.outcomes), status_code=status, media_type=DICOM_JSON,
                            headers=headers)

    def _expected_study(self, request: Request) -> str | None:
        study = request.path_params.get("study")
        if study is None:
            return None
        try:
            return check_uid(study, "Study Instance UID")
        except SpoolError as exc:
            raise _RequestError(400, f"the request URL's {exc}") from None

    def _check_length(self, request: Request, media: str) -> None:
        length = request.headers.get("content-length")
        if length is None:
            return
        try:
            size = int(length)
        except ValueError:
            raise _RequestError(400, f"Content-Length {length!r} is not a number") from None
        limit = self.max_part_bytes if media == "application/dicom" else self.max_request_bytes
        if size > limit:
            raise _RequestError(413, f"request body of {size} bytes is over the {limit} bytes limit")

    async def _chunks(self, request: Request, stow: _StowRequest, limit: int) -> AsyncIterator[bytes]:
        stream = request.stream()
        while True:
            # A body that stalls would hold a request slot (http_max_concurrency) for ever.
            try:
                chunk = await asyncio.wait_for(anext(stream), self.idle_timeout_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _RequestError(408, f"no body bytes for {self.idle_timeout_s:g} s (after {stow.received} "
                                         "bytes)") from None
            if not chunk:
                continue
            allowed = limit - stow.received
            stow.received += len(chunk)
            if len(chunk) > allowed:
                if allowed > 0:
                    yield chunk[:allowed]  # the parts that end within the limit are stored whatever the chunking
                raise _RequestError(413, f"request body over the {limit} bytes limit")
            yield chunk

    async def _store_multipart(self, request: Request, params: dict[str, str], stow: _StowRequest) -> None:
        part_type = params.get("type", "application/dicom").strip().lower()
        if part_type != "application/dicom":
            raise _RequestError(415, f'multipart/related type "{part_type}" is not supported: only '
                                     'application/dicom parts (no metadata and bulk data STOW)')
        boundary = params.get("boundary")
        if not boundary:
            raise _RequestError(400, "multipart/related Content-Type without a boundary parameter")
        collector = _MultipartCollector(boundary.encode("latin-1"), self.max_part_bytes, self.intake.new_temp)
        pending: asyncio.Future[_Outcome] | None = None
        try:
            async for chunk in self._chunks(request, stow, self.max_request_bytes):
                try:
                    collector.feed(chunk)
                except MultipartParseError as exc:
                    raise _RequestError(400, f"malformed multipart/related body: {exc}") from None
                # Store one part while the next is received; at most one store in flight.
                for part in collector.completed:
                    if pending is not None:
                        stow.outcomes.append(await pending)
                    pending = asyncio.ensure_future(run_in_threadpool(self._store_part, part, stow))
                collector.completed.clear()
            if collector.parts_seen == 0 and not collector.ended:
                raise _RequestError(400, f"malformed multipart/related body: no delimiter --{boundary} in it")
            if not collector.ended:
                raise _RequestError(400, f"malformed multipart/related body: it ends before the closing delimiter "
                                         f"--{boundary}-- (after {collector.parts_seen} parts)")
            if collector.parts_seen == 0:
                raise _RequestError(400, "multipart/related body without any part")
        finally:
            collector.discard()
            if pending is not None:
                stow.outcomes.append(await pending)

    async def _store_single(self, request: Request, stow: _StowRequest) -> None:
        part = _Part(headers={"content-type": "application/dicom"})
        try:
            async for chunk in self._chunks(request, stow, self.max_part_bytes):
                part.write(chunk, self.max_part_bytes, self.intake.new_temp)
            if not part.size:
                raise _RequestError(400, "empty application/dicom body")
            handed_over, part = part, _Part()
            stow.outcomes.append(await run_in_threadpool(self._store_part, handed_over, stow))
        finally:
            part.discard()

    def _store_part(self, part: _Part, stow: _StowRequest) -> _Outcome:
        """Check one part and hand it to the intake (blocking: runs in a worker thread)."""
        head = bytes(part.head)
        media, _ = _media_type(part.headers.get("content-type", "application/dicom"))
        try:
            if media != "application/dicom":
                return self._refuse(CANNOT_UNDERSTAND, f"part Content-Type {media!r} is not application/dicom",
                                    stow, head)
            if part.oversized:
                return self._refuse(OUT_OF_RESOURCES, f"part of {part.size} bytes is over the "
                                                      f"{self.max_part_bytes} bytes limit", stow, head)
            if part.error is not None:
                return self._refuse(OUT_OF_RESOURCES, part.error, stow, head)
            if part.temp is None:
                return self._refuse(CANNOT_UNDERSTAND, "empty part", stow, head)
            temp, part.temp = part.temp, None  # the intake consumes it (renames or removes it)
            try:
                result: IntakeResult = self.intake.accept_part10_file(
                    temp, source=stow.source, association=stow.request_id, expected_study=stow.expected_study)
            finally:
                if temp.path.parent == self.intake.spool.incoming_dir:
                    temp.discard()  # not consumed (an error before the intake took it)
        except Exception as exc:  # a bug or an unmapped error must not lose the other parts' outcomes
            LOG.exception("STOW-RS %s: instance from %s could not be processed", stow.request_id, stow.client)
            return self._refuse(PROCESSING_FAILURE, f"processing failure: {exc}", stow, head)
        finally:
            part.discard()
        sop_class, sop_instance = result.sop_class_uid, result.sop_instance_uid
        if not result.ok and (sop_class is None or sop_instance is None):
            # The intake refuses some instances before reading them (disk watermark).
            peeked_class, peeked_instance = _peek_uids(head)
            sop_class, sop_instance = sop_class or peeked_class, sop_instance or peeked_instance
        return _Outcome(result.status, result.reason, sop_class, sop_instance,
                        retryable=result.status == OUT_OF_RESOURCES)

    def _refuse(self, status: int, reason: str, stow: _StowRequest, data: bytes) -> _Outcome:
        LOG.warning("instance refused (0x%04X) from %s: %s", status, stow.source, reason)
        sop_class, sop_instance = _peek_uids(data)
        return _Outcome(status, reason, sop_class, sop_instance)


def stow_routes(
    intake: Intake,
    *,
    base_paths: Sequence[str] = DEFAULT_BASE_PATHS,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> tuple[StowService, list[Route]]:
    """The STOW-RS service and its ``POST {base}/studies[/{study}]`` routes under each of ``base_paths``.

    ``max_part_bytes`` bounds the memory one instance may take (a larger part
    fails with 0xA700); ``max_request_bytes`` bounds a request body (413).
    """
    if not isinstance(intake, Intake):
        raise TypeError(f"intake: expected an Intake, got {type(intake).__name__}")
    for name, value in (("max_part_bytes", max_part_bytes), ("max_request_bytes", max_request_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a positive number of bytes, got {value!r}")
    if isinstance(base_paths, str) or not base_paths:
        raise ValueError(f"base_paths: expected a non-empty sequence of paths, got {base_paths!r}")
    for base in base_paths:
        if not isinstance(base, str) or (base and (not base.startswith("/") or base.endswith("/"))):
            raise ValueError(f"base_paths: {base!r} must be '' or start with '/' and not end with '/'")
    if len(set(base_paths)) != len(base_paths):
        raise ValueError(f"base_paths: {list(base_paths)!r} has duplicates")
    if isinstance(idle_timeout_s, bool) or not isinstance(idle_timeout_s, (int, float)) or not idle_timeout_s > 0:
        raise ValueError(f"idle_timeout_s: expected a number of seconds > 0, got {idle_timeout_s!r}")
    service = StowService(intake, max_part_bytes=max_part_bytes, max_request_bytes=max_request_bytes,
                          idle_timeout_s=idle_timeout_s)
    routes = []
    for base in base_paths:
        routes.append(Route(f"{base}/studies", service.store, methods=["POST"]))
        routes.append(Route(f"{base}/studies/{{study}}", service.store, methods=["POST"]))
    return service, routes


__all__ = ["DEFAULT_BASE_PATHS", "DEFAULT_IDLE_TIMEOUT_S", "DEFAULT_MAX_PART_BYTES", "DEFAULT_MAX_REQUEST_BYTES",
           "PROCESSING_FAILURE", "STUDY_MISMATCH", "StowService", "response_status", "store_instances_response",
           "stow_routes"]
