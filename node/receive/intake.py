"""One door for every received instance, whatever carried it (DIMSE or STOW-RS).

:meth:`Intake.accept` checks an instance's header, writes the received bytes
durably to the spool, records it in the state store and returns a DICOM status
(PS3.4 Table B.2-1) with a reason. Only the header is parsed; pixel data is
kept byte for byte as received and decoded later, in the pipeline.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from node import __version__
from node.config import NodeConfig
from node.store.header import HEADER_TAGS, InstanceHeader, read_header
from node.store.spool import Spool, SpoolError, check_uid, fsync_dir
from node.store.state import StateStore
from pipelines.volume.ct import CT_SOP_CLASSES

if TYPE_CHECKING:
    from node.observe.audit import AuditTrail, TransferTally
    from node.observe.metrics import NodeMetrics

LOG = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = frozenset(CT_SOP_CLASSES)

# C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: STOW-RS: an instance of another study than the request URL names (A9xx range of PS3.18 Table I.2-2).
STUDY_MISMATCH = 0xA901

#: Implementation Class UID and Version Name written in the file meta of stored instances.
IMPLEMENTATION_CLASS_UID = "2.25.193415117617284733618405939326346727402"
IMPLEMENTATION_VERSION_NAME = f"PACSAINODE_{__version__}"[:16]  # VR SH: 16 characters at most (PS3.7 D.3.3.2.4)


@dataclass(frozen=True)
class IntakeResult:
    """What happened to one instance: a DICOM status, and the reason when it is not success."""

    status: int
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_uid: str | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information group (PS3.10 7.1) for a received dataset.

    The same bytes pydicom's ``write_file_meta_info`` writes (a test checks
    this), in a few microseconds instead of half a millisecond per instance.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        *([_meta_element(0x0016, b"AE", _padded(source_ae, b" "))] if source_ae else []),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def check_pixel_data(ds: Dataset, transfer_syntax: UID, total_length: int | None = None) -> None:
    """Raise ValueError if an image lacks pixel data or native pixel data is truncated."""
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data")
    if transfer_syntax.is_compressed:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames * int(ds.BitsAllocated) // 8
    actual = len(ds.PixelData) if total_length is None else total_length
    if actual < expected:
        raise ValueError(f"Pixel Data holds {actual} bytes, {expected} expected")


def check_encapsulated(fd: int, position: int, end: int) -> None:
    """Raise ValueError unless the encapsulated Pixel Data value at ``position`` of file ``fd`` is whole:
    items (FFFE,E000) that fit before ``end``, then the Sequence Delimitation Item (PS3.5 A.4)."""
    items = 0
    while position + 8 <= end:
        group, element, length = struct.unpack("<HHI", os.pread(fd, 8, position))
        position += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            if items == 0:
                raise ValueError("encapsulated Pixel Data has no item")
            return
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"encapsulated Pixel Data holds tag ({group:04X},{element:04X}) instead of an item")
        position += length
        items += 1
    raise ValueError("encapsulated Pixel Data is truncated (no sequence delimiter)")


class Intake:
    """Checks, stores durably and records instances; shared by the DIMSE and STOW-RS listeners."""

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        state: StateStore,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.state = state
        self.on_queued = on_queued  # wakes the worker when a series is complete early
        self.metrics: NodeMetrics | None = None  # set by the service
        self.audit: AuditTrail | None = None
        self._tallies: dict[str, TransferTally] = {}
        self._tallies_lock = threading.Lock()

    def begin(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        source: str,
        association: str | None,
        spare: TempFile | None = None,
    ) -> IncomingInstance:
        """Start receiving one DIMSE dataset; its fragments go straight to the spool.

        ``spare`` is a temporary file made beforehand (:meth:`new_temp`), so that
        creating it is not on the path between a request and its response.
        """
        return IncomingInstance(self, sop_class_uid, sop_instance_uid, transfer_syntax, source, association, spare)

    def new_temp(self) -> TempFile:
        """An empty temporary file in the spool's incoming folder, open for writing and reading."""
        path = self.spool.incoming_dir / f".{uuid.uuid4().hex}.part"
        return TempFile(path, open(path, "w+b", buffering=1 << 20))  # few large writes, not one per PDU

    def record_arrival(self, header: InstanceHeader, path: Path, size: int, source: str,
                       association: str | None) -> IntakeResult:
        new = self.state.record_instance(header, path=str(path), size=size, calling_ae=source,
                                         association=association)
        if self.on_queued is not None and header.images_in_acquisition is not None:
            self.on_queued()  # the expected count may have completed the series
        LOG.debug("stored %s (%d bytes%s)", header.sop_instance_uid, size, "" if new else ", duplicate",
                  extra={"sop_instance_uid": header.sop_instance_uid, "series_uid": header.series_uid,
                         "study_uid": header.study_uid, "calling_ae": source})
        if self.metrics is not None:
            self.metrics.instance_received("stowrs" if (association or "").startswith("stow-") else "dicom")
        if self.audit is not None and association is not None:
            from node.observe.audit import TransferTally

            with self._tallies_lock:
                tally = self._tallies.setdefault(association, TransferTally())
            tally.stored(header.study_uid, header.sop_class_uid, duplicate=not new)
        return IntakeResult(SUCCESS, None, header.sop_class_uid, header.sop_instance_uid, header.series_uid,
                            duplicate=not new)

    def association_ended(
        self, association: str, released: bool, why: str = "sender released the association"
    ) -> list[tuple[str, str]]:
        """An association or STOW-RS request ended: queue the series it carried whole (if released)."""
        if not (released and self.config.complete_on_release):
            return []
        queued = self.state.complete_released(association, why=why)
        for series_uid, detail in queued:
            LOG.info("series %s complete (%s), queued", series_uid, detail, extra={"series_uid": series_uid})
        if queued and self.on_queued is not None:
            self.on_queued()
        return queued

    def transfer_finished(self, association: str, *, calling_ae: str, peer_ip: str | None, via: str) -> None:
        """An association or STOW-RS request is over: one audit event per study it stored into."""
        with self._tallies_lock:
            tally = self._tallies.pop(association, None)
        if tally is not None and self.audit is not None:
            tally.report_received(self.audit, calling_ae=calling_ae, peer_ip=peer_ip, via=via)

    def refuse(self, status: int, reason: str, source: str, *, sop_class_uid: str | None = None,
               sop_instance_uid: str | None = None, series_uid: str | None = None) -> IntakeResult:
        """Refuse one instance with a DICOM status: a log line with the reason, and the refusal counted."""
        LOG.warning("instance refused (0x%04X) from %s: %s", status, source, reason,
                    extra={"calling_ae": source, "sop_instance_uid": sop_instance_uid, "series_uid": series_uid})
        if self.metrics is not None:
            self.metrics.instance_refused(status)
        return IntakeResult(status, reason, sop_class_uid, sop_instance_uid, series_uid)

    def disk_full_reason(self) -> str | None:
        """Why new data must be refused now (free disk under the watermark), or None."""
        free = shutil.disk_usage(self.spool.root).free
        if free < self.config.min_free_disk_mb * 1024 * 1024:
            return f"free disk {free // 2**20} MiB below the {self.config.min_free_disk_mb} MiB watermark"
        return None

    def accept_part10_file(
        self,
        temp: TempFile,
        *,
        source: str,
        association: str | None = None,
        expected_study: str | None = None,
    ) -> IntakeResult:
        """Check and store one PS3.10 file (preamble, file meta, dataset) already streamed to ``temp``
        (:meth:`new_temp`), as STOW-RS receives it.

        ``expected_study`` (STOW-RS ``/studies/{uid}``) refuses an instance of
        another study with :data:`STUDY_MISMATCH`.

        Only the header is read from the file (pixel data is skipped, its
        length checked against the file's size); the file is then fsynced and
        renamed into place, or discarded: ``temp`` is consumed either way.
        """
        try:
            full = self.disk_full_reason()
            if full:
                return self.refuse(OUT_OF_RESOURCES, full, source)
            try:
                temp.file.flush()
                size = os.fstat(temp.file.fileno()).st_size
                temp.file.seek(0)
                ds = pydicom.dcmread(temp.file, defer_size=4096, specific_tags=HEADER_TAGS)
                transfer_syntax = ds.file_meta.TransferSyntaxUID
                pixels = ds.get_item(0x7FE00010, keep_deferred=True)
                if pixels is None:  # pydicom drops an encapsulated value that ends before its delimiter
                    raise ValueError("no Pixel Data, or a truncated one")
                length = getattr(pixels, "length", None)
                if transfer_syntax.is_deflated:
                    check_pixel_data(ds, transfer_syntax)  # positions are in the inflated stream
                elif length is not None and length != 0xFFFFFFFF:
                    if getattr(pixels, "value_tell", 0) + length > size:
                        raise ValueError("Pixel Data is truncated")
                    check_pixel_data(ds, transfer_syntax, total_length=length)
                elif length == 0xFFFFFFFF:  # pydicom only warns when the delimiter is missing
                    check_encapsulated(temp.file.fileno(), getattr(pixels, "value_tell", 0), size)
                header = read_header(ds)
            except Exception as exc:  # any failure to parse means the dataset is corrupt
                return self.refuse(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", source)
            uids = {"sop_class_uid": header.sop_class_uid, "sop_instance_uid": header.sop_instance_uid,
                    "series_uid": header.series_uid}
            if expected_study is not None and header.study_uid != expected_study:
                return self.refuse(STUDY_MISMATCH, f"Study Instance UID {header.study_uid} differs from the "
                                                   f"request URL's {expected_study}", source, **uids)
            if header.sop_class_uid not in ACCEPTED_SOP_CLASSES:
                return self.refuse(SOP_CLASS_NOT_SUPPORTED, f"SOP class {UID(header.sop_class_uid).name} is not "
                                                            "accepted", source, **uids)
            try:
                path = self.spool.place(temp.path, header.study_uid, header.series_uid, header.sop_instance_uid)
                temp.path = path  # renamed: nothing left to discard
                os.fdatasync(temp.file.fileno())
                temp.file.close()
                fsync_dir(path.parent)
                return self.record_arrival(header, path, size, source, association)
            except (SpoolError, OSError) as exc:
                return self.refuse(OUT_OF_RESOURCES, f"cannot store: {exc}", source, **uids)
        finally:
            if temp.path.parent == self.spool.incoming_dir:
                temp.discard()
            else:
                temp.file.close()


@dataclass
class TempFile:
    """A temporary spool file (``.part``: removed at start if a crash left it)."""

    path: Path
    file: BinaryIO

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class IncomingInstance:
    """One C-STORE dataset arriving in P-DATA fragments.

    The fragments are appended to a temporary PS3.10 file in the spool (file
    meta built from the request, then the dataset bytes exactly as received),
    so nothing is held in memory and the disk works while the network does.
    :meth:`finish` parses the header, checks it, fsyncs, renames the file into
    place and records it; :meth:`discard` drops it (aborted association).
    """

    def __init__(
        self,
        intake: Intake,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        source: str,
        association: str | None,
        spare: TempFile | None = None,
    ) -> None:
        self.intake = intake
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = UID(transfer_syntax)
        self.source = source
        self.association = association
        self.refusal: IntakeResult | None = None
        self.file: BinaryIO | None = None
        self.tmp: Path | None = None
        self.size = 0
        self.limit = intake.config.max_instance_mb * 1024 * 1024
        self.head = bytearray()
        if sop_class_uid not in ACCEPTED_SOP_CLASSES:
            self.refusal = IntakeResult(SOP_CLASS_NOT_SUPPORTED, f"SOP class {UID(sop_class_uid).name} is not accepted",
                                        sop_class_uid, sop_instance_uid)
        elif full := intake.disk_full_reason():
            self.refusal = IntakeResult(OUT_OF_RESOURCES, full, sop_class_uid, sop_instance_uid)
        if self.refusal is not None:
            if spare is not None:
                spare.discard()
            return
        try:
            temp = spare if spare is not None else intake.new_temp()
            self.tmp, self.file = temp.path, temp.file
            check_uid(sop_instance_uid, "Affected SOP Instance UID")
            self.dataset_offset = self.file.write(
                file_meta_bytes(sop_class_uid, sop_instance_uid, str(self.transfer_syntax), source[:16].strip())
            )
        except SpoolError as exc:
            self.discard()
            self.refusal = IntakeResult(CANNOT_UNDERSTAND, str(exc), sop_class_uid, sop_instance_uid)
        except (OSError, ValueError) as exc:
            self.discard()
            self.refusal = IntakeResult(OUT_OF_RESOURCES, f"cannot store: {exc}", sop_class_uid, sop_instance_uid)

    #: The first bytes of the dataset kept in memory: the header is parsed from them.
    HEAD_BYTES = 64 * 1024

    def write(self, fragment: bytes | memoryview) -> None:
        if self.file is None:
            return  # refused: the rest of the dataset is read and dropped
        if self.size + len(fragment) > self.limit:
            self.discard()
            self.refusal = IntakeResult(OUT_OF_RESOURCES, f"instance larger than max_instance_mb "
                                        f"({self.intake.config.max_instance_mb} MiB)", self.sop_class_uid,
                                        self.sop_instance_uid)
            return
        if len(self.head) < self.HEAD_BYTES:
            self.head += fragment[:self.HEAD_BYTES - len(self.head)]
        try:
            self.file.write(fragment)
            self.size += len(fragment)
        except OSError as exc:
            self.discard()
            self.refusal = IntakeResult(OUT_OF_RESOURCES, f"cannot store: {exc}", self.sop_class_uid,
                                        self.sop_instance_uid)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def _parse_head(self) -> Dataset | None:
        """The header tags read from the in-memory head, or None when the file must be read instead."""
        if self.transfer_syntax.is_deflated:
            return None
        complete = len(self.head) >= self.size
        try:
            ds = read_dataset(BytesIO(self.head), self.transfer_syntax.is_implicit_VR,
                              self.transfer_syntax.is_little_endian, defer_size=4096, specific_tags=HEADER_TAGS)
        except Exception:
            if complete:
                raise  # the whole dataset was in memory: it is corrupt
            return None
        if not complete and ds.get_item(0x7FE00010, keep_deferred=True) is None:
            return None
        return ds

    def finish(self) -> IntakeResult:
        """Check and store the complete dataset; returns the status for the response."""
        if self.refusal is not None:
            self.discard()
            r = self.refusal
            return self.intake.refuse(r.status, r.reason or "", self.source, sop_class_uid=r.sop_class_uid,
                                      sop_instance_uid=r.sop_instance_uid)
        assert self.file is not None and self.tmp is not None
        try:
            ds, start = self._parse_head(), 0
            if ds is None:  # deflated, or a header longer than the head: read the file
                self.file.flush()
                if self.transfer_syntax.is_deflated:
                    self.file.seek(0)
                    ds = pydicom.dcmread(self.file, defer_size=4096, specific_tags=HEADER_TAGS)
                else:
                    self.file.seek(self.dataset_offset)
                    ds = read_dataset(self.file, self.transfer_syntax.is_implicit_VR,
                                      self.transfer_syntax.is_little_endian, defer_size=4096,
                                      specific_tags=HEADER_TAGS)
                    start = self.dataset_offset
            if len(ds) == 0:  # pydicom gives up silently on a value that runs past the end
                raise ValueError("no element could be read (truncated, or not a dataset)")
            header = read_header(ds)
            pixels = ds.get_item(0x7FE00010, keep_deferred=True)
            if pixels is None:
                raise ValueError("no Pixel Data")
            length = getattr(pixels, "length", None)
            if self.transfer_syntax.is_deflated:
                # Positions are in the inflated stream, not the file: check the value itself.
                check_pixel_data(ds, self.transfer_syntax)
            elif length is not None and length != 0xFFFFFFFF:
                end = start + self.size
                if getattr(pixels, "value_tell", 0) + length > end:
                    raise ValueError("Pixel Data is truncated")
                check_pixel_data(ds, self.transfer_syntax, total_length=length)
            elif length == 0xFFFFFFFF:
                # Encapsulated: pydicom reads a missing sequence delimiter leniently, so walk the items.
                self.file.flush()
                check_encapsulated(self.file.fileno(), self.dataset_offset + getattr(pixels, "value_tell", 0) - start,
                                   self.dataset_offset + self.size)
        except Exception as exc:  # any failure to parse means the dataset is corrupt
            self.discard()
            return self.intake.refuse(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", self.source,
                                      sop_class_uid=self.sop_class_uid, sop_instance_uid=self.sop_instance_uid)
        uids = {"sop_class_uid": header.sop_class_uid, "sop_instance_uid": header.sop_instance_uid,
                "series_uid": header.series_uid}
        if header.sop_class_uid != self.sop_class_uid or header.sop_instance_uid != self.sop_instance_uid:
            self.discard()
            return self.intake.refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class/Instance UID {header.sop_class_uid} / {header.sop_instance_uid} differ from the "
                f"request's {self.sop_class_uid} / {self.sop_instance_uid}",
                self.source, **uids,
            )
        try:
            # Every byte to the kernel, the file into place, then one flush to the disk for
            # both: fdatasync commits the file system journal with the rename in it, so the
            # folder fsync that follows finds (almost) nothing left to do. A crash before the
            # fsyncs return never had a success status; a power cut may then leave this
            # file incomplete, and the start-up check (adopt_unrecorded) quarantines it.
            self.file.flush()
            path = self.intake.spool.place(self.tmp, header.study_uid, header.series_uid, header.sop_instance_uid)
            self.tmp = None
            os.fdatasync(self.file.fileno())
            self.file.close()
            self.file = None
            fsync_dir(path.parent)
            return self.intake.record_arrival(header, path, self.dataset_offset + self.size, self.source,
                                              self.association)
        except (SpoolError, OSError) as exc:
            self.discard()
            return self.intake.refuse(OUT_OF_RESOURCES, f"cannot store: {exc}", self.source, **uids)
