"""Logging set-up: plain text for a terminal, or one JSON object per line for a log shipper.

Log lines carry UIDs, AE titles and timings, never patient names or IDs
(README "Logs"); :func:`patient_text` is the one place that formats a
patient's identity, for the sites that configure the node to log it.

Structured fields go in through ``extra=`` and come out as JSON keys::

    LOG.info("series %s processed", uid, extra={"series_uid": uid, "duration_s": 1.54})

The worker's lines about a series carry ``series_uid`` (and ``duration_s`` once
it is processed), the listener's lines about an association its short
``association_id`` and ``calling_ae``, the intake's ``sop_instance_uid`` and
``series_uid`` where known, the sender's ``destination``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Fields taken from ``extra=`` into a JSON line, in this order.
EXTRA_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "job_id", "association_id", "calling_ae", "destination",
                "duration_s")

#: Libraries kept at WARNING or above whatever the node's level: pynetdicom logs
#: dataset contents (patient names included) at DEBUG and every association at
#: INFO; highdicom and uvicorn repeat what the node's own lines say.
NOISY_LOGGERS = ("pynetdicom", "highdicom", "uvicorn", "uvicorn.error", "uvicorn.access")

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-11-22T17:24:03.123Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the :data:`EXTRA_FIELDS`
    given, ``exception`` (the formatted traceback) and ``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a Path or a UID object in extra= must not cost the line.
        return json.dumps(entry, ensure_ascii=False, default=str)


class _NodeHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


def configure_logging(level: str, *, json: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (standard error by default).

    Plain text (the format the node always had) or, with ``json=True``, one JSON
    object per line (:class:`JsonFormatter`). Called again, it replaces the
    handler it installed before and leaves other handlers (pytest's) alone.
    :data:`NOISY_LOGGERS` are kept at WARNING or above. Returns the handler.
    """
    if not isinstance(level, str) or level.upper() not in LEVELS:
        raise ValueError(f"level: {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _NodeHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _NodeHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler


def patient_text(ds: Dataset | Mapping[str, object] | None, include: bool) -> str:
    """``"patient NAME (ID)"`` for a log line when ``include`` (the site asked for patient
    identity in its logs), else ``""``; also ``""`` when the dataset has neither.

    ``ds`` is a pydicom ``Dataset`` or any mapping with ``PatientName`` / ``PatientID``.
    """
    if not include or ds is None:
        return ""
    name = str(ds.get("PatientName", "") or "").strip()
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not name and not patient_id:
        return ""
    if not patient_id:
        return f"patient {name}"
    return f"patient {name} ({patient_id})" if name else f"patient ({patient_id})"
