"""The DICOM listener: Verification and CT storage, durable before success.

The C-STORE handler is thin on purpose: it checks the header, writes the
received bytes durably, records them in the state store, and returns a DICOM
status (PS3.4 Table B.2-1). No decoding of pixels, no inference, no network
calls happen here.
"""

from __future__ import annotations

import logging
import shutil
import socket
from io import BytesIO
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification
from pynetdicom.presentation import StoragePresentationContexts

from node.config import NodeConfig
from node.spool import Spool, SpoolError, check_uid
from node.state import StateStore
from pipelines.volume import CT_SOP_CLASSES

LOG = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = frozenset(CT_SOP_CLASSES)

# C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation of pydicom can decode."""
    from pydicom.pixels import get_decoder

    out = []
    for uid in ALL_TRANSFER_SYNTAXES:
        try:
            decoder = get_decoder(UID(uid))
        except NotImplementedError:
            continue
        if decoder.is_available:
            out.append(uid)
    return out


def set_tcp_nodelay(event: evt.Event) -> None:
    """Disable Nagle's algorithm: without it every C-STORE to or from DCMTK or
    Orthanc stalls 45-90 ms waiting for a delayed ACK."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a socket closed under us: nothing to tune
            LOG.debug("TCP_NODELAY not set: %s", exc)


class StoreHandler:
    """Turns a C-STORE request into a durable spool entry and a status."""

    def __init__(self, config: NodeConfig, spool: Spool, state: StateStore) -> None:
        self.config = config
        self.spool = spool
        self.state = state

    def _refuse(self, status: int, reason: str, event: evt.Event) -> int:
        LOG.warning(
            "C-STORE refused (0x%04X) from %s: %s",
            status,
            event.assoc.requestor.ae_title,
            reason,
        )
        return status

    def __call__(self, event: evt.Event) -> int:
        sop_class = UID(event.context.abstract_syntax)
        if sop_class not in ACCEPTED_SOP_CLASSES:
            return self._refuse(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class.name} is not accepted", event)
        free = shutil.disk_usage(self.spool.root).free
        if free < self.config.min_free_disk_mb * 1024 * 1024:
            return self._refuse(
                OUT_OF_RESOURCES, f"free disk {free // 2**20} MiB below {self.config.min_free_disk_mb} MiB", event
            )
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(BytesIO(data))
            study = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
            series = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            sop = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            _check_pixel_data(ds)
        except Exception as exc:  # any decoding failure means the dataset is corrupt
            return self._refuse(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}", event)
        if ds.get("SOPClassUID") != sop_class:
            return self._refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class UID {ds.get('SOPClassUID')} differs from the presentation context's {sop_class}",
                event,
            )
        if sop != event.request.AffectedSOPInstanceUID:
            return self._refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOP Instance UID differs from the request's", event
            )
        try:
            path, size = self.spool.store(study, series, sop, data)
            new = self.state.record_instance(
                sop_instance_uid=sop,
                series_uid=series,
                study_uid=study,
                sop_class_uid=str(sop_class),
                path=str(path),
                size=size,
                calling_ae=event.assoc.requestor.ae_title,
            )
        except (SpoolError, OSError) as exc:
            return self._refuse(OUT_OF_RESOURCES, f"cannot store: {exc}", event)
        LOG.debug("stored %s of series %s (%d bytes%s)", sop, series, size, "" if new else ", duplicate")
        return SUCCESS


def _check_pixel_data(ds: pydicom.Dataset) -> None:
    """Raise ValueError if an image lacks pixel data or native pixel data is truncated."""
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data")
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames * int(ds.BitsAllocated) // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise ValueError(f"Pixel Data holds {actual} bytes, {expected} expected")


class Listener:
    """The node's DICOM SCP (pynetdicom), started in a background thread."""

    def __init__(self, config: NodeConfig, spool: Spool, state: StateStore) -> None:
        self.config = config
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_called_aet = True
        if config.allowed_calling_ae_titles:
            self.ae.require_calling_aet = list(config.allowed_calling_ae_titles)
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu_size
        self.ae.network_timeout = config.network_timeout_s
        self.ae.dimse_timeout = config.network_timeout_s
        self.ae.acse_timeout = config.network_timeout_s
        self.ae.add_supported_context(Verification)
        ct_syntaxes = decodable_transfer_syntaxes()
        for uid in sorted(ACCEPTED_SOP_CLASSES):
            self.ae.add_supported_context(uid, ct_syntaxes)
        # Other storage SOP classes are accepted at negotiation so that a PACS
        # pushing a whole study keeps its association, and then refused one by
        # one with 0x0122 and a logged reason.
        for context in StoragePresentationContexts:
            if context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.handler = StoreHandler(config, spool, state)
        self.server: Any = None

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self.handler),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_REJECTED, _log_rejected),
        ]
        self.server = self.ae.start_server(
            (self.config.bind_address, self.config.port), block=False, evt_handlers=handlers
        )
        LOG.info(
            "listening as %s on %s:%d (calling AE allow-list: %s)",
            self.config.ae_title,
            self.config.bind_address,
            self.config.port,
            ", ".join(self.config.allowed_calling_ae_titles) or "any",
        )

    def stop(self) -> None:
        """Stop accepting, let associations in progress finish, then return."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _log_rejected(event: evt.Event) -> None:
    LOG.warning(
        "association from %s (calling AE %s, called AE %s) rejected",
        event.assoc.requestor.address,
        event.assoc.requestor.ae_title,
        event.assoc.acceptor.ae_title,
    )
