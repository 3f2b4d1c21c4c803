"""The audit trail: security-relevant events as DICOM audit messages (PS3.15 A.5), one JSON line each.

Every event is one JSON object with the structure of the DICOM Audit Message
schema (PS3.15 A.5.1): ``EventIdentification``, ``ActiveParticipant`` (list),
``AuditSourceIdentification``, ``ParticipantObjectIdentification`` (list). The
XML attributes become JSON keys; a coded value (``csd-code``,
``codeSystemName``, ``originalText``) is ``{"code", "scheme", "meaning"}``;
the enumerations of RFC 3881 (outcome, network access point type,
participant object type and role) are numbers.

Events (PS3.15 A.5.3 and PS3.16 CID 400-403 for the codes):

==========================  ================================  ======  ==================================
method                      EventID                           action  EventTypeCode
==========================  ================================  ======  ==================================
application_activity        110100 Application Activity        E       110120 Start / 110121 Stop
instances_received          110104 DICOM Instances Transferred C (R)   -
instances_sent              110104 DICOM Instances Transferred R       -
association_rejected        110113 Security Alert              E       110126 Node Authentication
admin_action                110113 Security Alert              E       110131 Software / 110129 Security
                                                                       Configuration
==========================  ================================  ======  ==================================

Storage: ``<data_dir>/audit/audit-YYYY-MM-DD.jsonl`` (UTC date of the event),
mode 0600 in a 0700 folder. Each event is one ``write`` to a file opened with
``O_APPEND`` (so the service and a CLI command may append to the same file),
then fsynced before the call returns: a recorded event survives a crash or a
power cut. Files are never rewritten or truncated; a line torn by a crash
mid-write is closed with a newline before the next event, and
:func:`read_events` skips it.

Patient identity (Patient ID, Patient's Name) is left out unless the site sets
``include_patient_identity``: PS3.15 makes the Patient participant object
mandatory in DICOM Instances Transferred, so a site that feeds an ATNA audit
repository enables it (and keeps the files as protected as the images).

Optional forwarding to a syslog collector: RFC 5424 messages over UDP
(RFC 5426), facility authpriv, severity notice (PRI 85), with the JSON event
as MSG. ATNA's own transport (the XML schema over TLS syslog, RFC 5425) is not
implemented; the local files stay the record of truth either way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

# EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
OUTCOMES = (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE)
ACTIONS = ("C", "R", "U", "D", "E")
# NetworkAccessPointTypeCode (RFC 3881): 1 machine name, 2 IP address.
MACHINE_NAME, IP_ADDRESS = 1, 2
# ParticipantObjectTypeCode and ...TypeCodeRole (RFC 3881).
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_SECURITY_RESOURCE = 1, 3, 4, 13

TRANSPORTS = ("DICOM", "STOW-RS")

#: Syslog PRI: facility authpriv (10) * 8 + severity notice (5), as ATNA senders use.
SYSLOG_PRI = 85
SYSLOG_APP_NAME = "pacs-ai-node"
SYSLOG_MSGID = "DICOM-AUDIT-JSON"
#: Largest datagram sent; a larger event (thousands of SOP classes) stays in the file only.
MAX_DATAGRAM = 65000


@dataclass(frozen=True)
class Code:
    """A coded value of an audit message (PS3.15 A.5.1 CodedValueType)."""

    code: str
    scheme: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning}


# PS3.16 CID 400 (audit event ID), 401 (event type), 402 (participant role), 403 (security alert type),
# 404 (participant object ID type).
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
APPLICATION = Code("110150", "DCM", "Application")
APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")


class AuditError(ValueError):
    """An audit trail set up with an unusable argument."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _access_point(peer: str | None) -> dict[str, Any]:
    """NetworkAccessPointID / TypeCode of a host: 2 for an IP address, 1 for a name."""
    if not peer:
        return {}
    try:
        ipaddress.ip_address(peer)
        kind = IP_ADDRESS
    except ValueError:
        kind = MACHINE_NAME
    return {"NetworkAccessPointID": peer, "NetworkAccessPointTypeCode": kind}


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected non-empty text, got {value!r}")
    return value.strip()


def _outcome(value: int) -> int:
    if value not in OUTCOMES or isinstance(value, bool):
        raise ValueError(f"outcome: {value!r} is not one of {OUTCOMES} (success, minor, serious, major failure)")
    return value


def transfer_outcome(stored: int, failed: int) -> int:
    """0 when nothing failed, 4 (minor failure) when some did, 8 (serious) when nothing was stored."""
    if failed <= 0:
        return SUCCESS
    return MINOR_FAILURE if stored > 0 else SERIOUS_FAILURE


class AuditTrail:
    """Writes audit events; one per process, shared by every thread (calls are serialised).

    ``source_id`` is the AuditSourceID and the node's UserID: its AE title.
    ``syslog`` (host, port) also sends each event to a syslog collector over UDP.
    ``include_patient_identity`` adds a Patient participant object to transfer
    events when the caller knows the patient. ``site_id`` is the optional
    AuditEnterpriseSiteID; ``clock`` returns the current time (tests).
    A failed write is logged at ERROR and counted in :attr:`write_errors`; it
    never raises into the DICOM or HTTP service that reported the event.
    """

    def __init__(
        self,
        data_dir: Path | str,
        source_id: str,
        *,
        syslog: tuple[str, int] | None = None,
        include_patient_identity: bool = False,
        site_id: str | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.source_id = _text(source_id, "source_id")
        self.folder = Path(data_dir) / "audit"
        self.include_patient_identity = bool(include_patient_identity)
        self.site_id = site_id
        self.clock = clock
        self.hostname = socket.gethostname()
        self.write_errors = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: date | None = None
        self._syslog_address: tuple[Any, ...] | None = None
        self._syslog_socket: socket.socket | None = None
        if syslog is not None:
            if (not isinstance(syslog, tuple) or len(syslog) != 2 or not isinstance(syslog[0], str)
                    or not isinstance(syslog[1], int) or not 0 < syslog[1] < 65536):
                raise AuditError(f"syslog: expected (host, port), got {syslog!r}")
            try:
                family, _, _, _, address = socket.getaddrinfo(syslog[0], syslog[1], type=socket.SOCK_DGRAM)[0]
            except OSError as exc:
                raise AuditError(f"syslog: {syslog[0]}:{syslog[1]} cannot be resolved: {exc}") from None
            self._syslog_address = address
            self._syslog_socket = socket.socket(family, socket.SOCK_DGRAM)

    # -- events ---------------------------------------------------------------

    def application_activity(self, started: bool, *, launcher: str | None = None) -> dict[str, Any]:
        """The node started or stopped (Application Activity, PS3.15 A.5.3.1); ``launcher``: the
        user or service manager that started it, when known."""
        participants = [self._node(requestor=launcher is None, role=APPLICATION)]
        if launcher:
            participants.append({"UserID": launcher, "UserIsRequestor": True,
                                 "RoleIDCode": [APPLICATION_LAUNCHER.as_json()]})
        return self._record(self._event(APPLICATION_ACTIVITY, "E", SUCCESS, None,
                                        APPLICATION_START if started else APPLICATION_STOP), participants, [])

    def instances_received(
        self,
        calling_ae: str,
        peer_ip: str | None,
        study_uid: str,
        sop_classes: Mapping[str, int],
        outcome: int = SUCCESS,
        via: str = "DICOM",
        *,
        description: str | None = None,
        action: str = "C",
        patient: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Instances of one study were received (DICOM Instances Transferred, PS3.15 A.5.3.7).

        ``calling_ae`` is the sender: its AE title, or for STOW-RS the user name
        or client. ``action`` is ``"C"`` when the node did not hold the
        instances, ``"R"`` when every one was a duplicate. ``patient`` is
        (Patient ID, Patient's Name), recorded only with ``include_patient_identity``.
        """
        if via not in TRANSPORTS:
            raise ValueError(f"via: {via!r} is not one of {', '.join(TRANSPORTS)}")
        if action not in ("C", "R", "U"):
            raise ValueError(f"action: {action!r} is not C, R or U")
        source = {"UserID": _text(calling_ae, "calling_ae"), "UserIsRequestor": True,
                  "RoleIDCode": [SOURCE_ROLE.as_json()], **_access_point(peer_ip)}
        if via == "DICOM":
            source["AlternativeUserID"] = f"AETITLES={calling_ae.strip()}"
        participants = [source, self._node(requestor=False, role=DESTINATION_ROLE)]
        objects = [self._study(study_uid, sop_classes, via)] + self._patient(patient)
        return self._record(self._event(INSTANCES_TRANSFERRED, action, _outcome(outcome), description),
                            participants, objects)

    def instances_sent(
        self,
        destination_name: str,
        destination_ae_or_url: str,
        peer: str | None,
        study_uid: str,
        sop_classes: Mapping[str, int],
        outcome: int = SUCCESS,
        detail: str | None = None,
        *,
        patient: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Result instances of one study were sent to a destination (DICOM Instances
        Transferred, action R: the node is not the receiver, PS3.15 A.5.3.7).

        ``destination_ae_or_url`` is the destination's AE title or STOW-RS URL,
        ``peer`` its host, ``detail`` the outcome description (statuses, errors).
        """
        target = _text(destination_ae_or_url, "destination_ae_or_url")
        destination = {"UserID": target, "UserIsRequestor": False, "RoleIDCode": [DESTINATION_ROLE.as_json()],
                       **_access_point(peer)}
        if "://" not in target:
            destination["AlternativeUserID"] = f"AETITLES={target}"
        if destination_name and destination_name != target:
            destination["UserName"] = destination_name
        via = "STOW-RS" if "://" in target else "DICOM"
        participants = [self._node(requestor=True, role=SOURCE_ROLE), destination]
        objects = [self._study(study_uid, sop_classes, via)] + self._patient(patient)
        return self._record(self._event(INSTANCES_TRANSFERRED, "R", _outcome(outcome), detail),
                            participants, objects)

    def association_rejected(self, calling_ae: str, peer_ip: str | None, reason: str, *,
                             event_type: Code = NODE_AUTHENTICATION) -> dict[str, Any]:
        """A peer was refused an association (wrong called AE title, calling AE title not allowed,
        TLS authentication failed): Security Alert (PS3.15 A.5.3.11), minor failure (the
        refusal is the mitigation that worked), the peer as the alert subject."""
        peer = {"UserID": _text(calling_ae, "calling_ae"), "AlternativeUserID": f"AETITLES={calling_ae.strip()}",
                "UserIsRequestor": True, **_access_point(peer_ip)}
        subject = {
            "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": ROLE_SECURITY_RESOURCE,
            "ParticipantObjectIDTypeCode": NODE_ID.as_json(),
            "ParticipantObjectID": peer_ip or calling_ae.strip(),
            "ParticipantObjectDetail": [{"type": "Alert Description", "value": _text(reason, "reason")}],
        }
        return self._record(self._event(SECURITY_ALERT, "E", MINOR_FAILURE, reason, event_type),
                            [self._node(requestor=False, role=None), peer], [subject])

    def admin_action(self, user: str, peer_ip: str | None, action: str, detail: Mapping[str, Any] | None = None,
                     *, security: bool = False, outcome: int = SUCCESS) -> dict[str, Any]:
        """An administrator changed the node (outbox retry or purge, rules or model change,
        configuration reload): Security Alert with EventTypeCode Software Configuration
        (110131), or Security Configuration (110129) when ``security`` (allow-lists,
        credentials, TLS). Security Alert, not Application Activity: the latter's event
        types (CID 401: start, stop, login, logout) have no configuration change, while
        CID 403 lists configuration changes as security alert types, which is how IHE
        ATNA records them. ``detail`` values are recorded as text: never put patient
        identity in them."""
        who = {"UserID": _text(user, "user"), "UserIsRequestor": True, **_access_point(peer_ip)}
        details = [{"type": "Action", "value": _text(action, "action")}]
        for key, value in (detail or {}).items():
            details.append({"type": str(key), "value": value if isinstance(value, str)
                            else json.dumps(value, default=str, sort_keys=True)})
        subject = {
            "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": ROLE_SECURITY_RESOURCE if security else ROLE_RESOURCE,
            "ParticipantObjectIDTypeCode": NODE_ID.as_json(),
            "ParticipantObjectID": self.source_id,
            "ParticipantObjectDescription": action,
            "ParticipantObjectDetail": details,
        }
        kind = SECURITY_CONFIGURATION if security else SOFTWARE_CONFIGURATION
        return self._record(self._event(SECURITY_ALERT, "E", _outcome(outcome), None, kind),
                            [who, self._node(requestor=False, role=None)], [subject])

    def record_admin(self, what: str, detail: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`admin_action` called as a ``(what, detail)`` callback (the status pages'
        ``audit``): ``detail["user"]`` and ``detail["client"]`` (an IP address) say who and from
        where, ``detail["action"]`` (else ``what``) the action; the other keys are the details."""
        rest = {k: v for k, v in detail.items() if k not in ("user", "client", "action")}
        client = detail.get("client")
        return self.admin_action(str(detail.get("user") or "unknown"), str(client) if client else None,
                                 str(detail.get("action") or what), rest)

    # -- parts ----------------------------------------------------------------

    def _event(self, event_id: Code, action: str, outcome: int, description: str | None,
               event_type: Code | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "EventID": event_id.as_json(),
            "EventActionCode": action,
            "EventDateTime": "",  # set when written
            "EventOutcomeIndicator": outcome,
        }
        if description:
            event["EventOutcomeDescription"] = description
        if event_type is not None:
            event["EventTypeCode"] = [event_type.as_json()]
        return event

    def _node(self, *, requestor: bool, role: Code | None) -> dict[str, Any]:
        """The node itself as an active participant (UserID: its AE title, PS3.15 A.5.2.1-2)."""
        out: dict[str, Any] = {"UserID": self.source_id, "AlternativeUserID": f"AETITLES={self.source_id}",
                               "UserIsRequestor": requestor, **_access_point(self.hostname)}
        if role is not None:
            out["RoleIDCode"] = [role.as_json()]
        return out

    @staticmethod
    def _study(study_uid: str, sop_classes: Mapping[str, int], via: str) -> dict[str, Any]:
        classes = []
        for uid, count in sorted(sop_classes.items()):
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"sop_classes[{uid!r}]: expected a count >= 0, got {count!r}")
            classes.append({"UID": _text(uid, "SOP Class UID"), "NumberOfInstances": count})
        return {
            "ParticipantObjectTypeCode": SYSTEM_OBJECT,
            "ParticipantObjectTypeCodeRole": ROLE_REPORT,
            "ParticipantObjectIDTypeCode": STUDY_INSTANCE_UID.as_json(),
            "ParticipantObjectID": _text(study_uid, "study_uid"),
            "ParticipantObjectDescription": {"SOPClass": classes},
            "ParticipantObjectDetail": [{"type": "Transport", "value": via}],
        }

    def _patient(self, patient: tuple[str, str] | None) -> list[dict[str, Any]]:
        if not self.include_patient_identity or not patient or not str(patient[0] or "").strip():
            return []
        out = {
            "ParticipantObjectTypeCode": PERSON,
            "ParticipantObjectTypeCodeRole": ROLE_PATIENT,
            "ParticipantObjectIDTypeCode": PATIENT_NUMBER.as_json(),
            "ParticipantObjectID": str(patient[0]).strip(),
        }
        if len(patient) > 1 and str(patient[1] or "").strip():
            out["ParticipantObjectName"] = str(patient[1]).strip()
        return [out]

    # -- writing --------------------------------------------------------------

    def _record(self, event: dict[str, Any], participants: list[dict[str, Any]],
                objects: list[dict[str, Any]]) -> dict[str, Any]:
        source: dict[str, Any] = {"AuditSourceID": self.source_id}
        if self.site_id:
            source["AuditEnterpriseSiteID"] = self.site_id
        message: dict[str, Any] = {
            "EventIdentification": event,
            "ActiveParticipant": participants,
            "AuditSourceIdentification": source,
            "ParticipantObjectIdentification": objects,
        }
        with self._lock:  # one clock reading per position in the file: times never go backwards in it
            moment = self.clock()
            event["EventDateTime"] = _timestamp(moment)
            line = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
            self._append(moment.astimezone(UTC).date(), (line + "\n").encode("utf-8"))
            self._forward(moment, line)
        return message

    def path_for(self, day: date) -> Path:
        return self.folder / f"audit-{day.isoformat()}.jsonl"

    def _open(self, day: date) -> int:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path_for(day)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # also a file created by someone else, or under another umask
            size = os.fstat(fd).st_size
            if size == 0:
                # A new file: its folder entry must be on disk too before an event counts as recorded.
                dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                with open(path, "rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":  # a line torn by a crash: keep it apart from the next
                        os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _append(self, day: date, data: bytes) -> None:
        try:
            if self._fd is None or self._day != day:
                self._close_file()
                self._fd, self._day = self._open(day), day
            written = os.write(self._fd, data)  # one write: appends from other processes never interleave
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except OSError as exc:
            self.write_errors += 1
            self._close_file()
            LOG.error("audit event could not be written to %s: %s; event: %s", self.path_for(day), exc,
                      data.decode("utf-8", "replace").strip())

    def _forward(self, moment: datetime, line: str) -> None:
        if self._syslog_socket is None or self._syslog_address is None:
            return
        header = f"<{SYSLOG_PRI}>1 {_timestamp(moment)} {self.hostname[:255] or '-'} {SYSLOG_APP_NAME} " \
                 f"{os.getpid()} {SYSLOG_MSGID} - "
        datagram = header.encode("ascii", "replace") + b"\xef\xbb\xbf" + line.encode("utf-8")
        if len(datagram) > MAX_DATAGRAM:
            LOG.warning("audit event of %d bytes not sent to syslog (over %d); it is in the audit file",
                        len(datagram), MAX_DATAGRAM)
            return
        try:
            self._syslog_socket.sendto(datagram, self._syslog_address)
        except OSError as exc:
            LOG.warning("audit event not sent to syslog %s: %s", self._syslog_address, exc)

    def _close_file(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = self._day = None

    def close(self) -> None:
        """Close the current file and the syslog socket (events after this reopen the file)."""
        with self._lock:
            self._close_file()
            if self._syslog_socket is not None:
                self._syslog_socket.close()
                self._syslog_socket = None


@dataclass
class _StudyTally:
    sop_classes: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    new: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # status text -> count
    patient: tuple[str, str] | None = None


class TransferTally:
    """What one association (or STOW-RS request, or send batch) transferred, by study, turned
    into one DICOM Instances Transferred event per study at its end. Not thread-safe: one per
    association, used by the thread that serves it."""

    def __init__(self) -> None:
        self.studies: dict[str, _StudyTally] = {}
        self.refused_unknown = 0  # refusals before a Study Instance UID could be read

    def stored(self, study_uid: str, sop_class_uid: str, *, duplicate: bool = False,
               patient: tuple[str, str] | None = None) -> None:
        study = self.studies.setdefault(study_uid, _StudyTally())
        study.sop_classes[sop_class_uid] = study.sop_classes.get(sop_class_uid, 0) + 1
        study.stored += 1
        study.new += not duplicate
        if patient is not None and study.patient is None:
            study.patient = patient

    def refused(self, study_uid: str | None, status: int | str) -> None:
        if not study_uid:
            self.refused_unknown += 1
            return
        key = f"0x{status:04X}" if isinstance(status, int) else str(status)
        study = self.studies.setdefault(study_uid, _StudyTally())
        study.refused[key] = study.refused.get(key, 0) + 1

    def _describe(self, study: _StudyTally) -> tuple[int, str | None]:
        failed = sum(study.refused.values())
        parts = [f"{n} refused ({status})" for status, n in sorted(study.refused.items())]
        if self.refused_unknown:
            parts.append(f"{self.refused_unknown} instances of unknown study refused in the same transfer")
        return transfer_outcome(study.stored, failed), ("; ".join(parts) or None)

    def report_received(self, audit: AuditTrail, *, calling_ae: str, peer_ip: str | None,
                        via: str = "DICOM") -> int:
        """Write one received event per study; returns how many were written."""
        for study_uid, study in self.studies.items():
            outcome, description = self._describe(study)
            audit.instances_received(calling_ae, peer_ip, study_uid, study.sop_classes, outcome, via,
                                     description=description, action="C" if study.new or not study.stored else "R",
                                     patient=study.patient)
        return len(self.studies)

    def report_sent(self, audit: AuditTrail, *, destination_name: str, destination_ae_or_url: str,
                    peer: str | None) -> int:
        """Write one sent event per study; returns how many were written."""
        for study_uid, study in self.studies.items():
            outcome, description = self._describe(study)
            audit.instances_sent(destination_name, destination_ae_or_url, peer, study_uid, study.sop_classes,
                                 outcome, description, patient=study.patient)
        return len(self.studies)


def read_events(data_dir: Path | str, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """The events under ``data_dir/audit`` in file order, from ``since`` (an aware datetime) on.

    Lines that are not JSON (torn by a crash) are skipped with a warning.
    """
    folder = Path(data_dir) / "audit"
    if since is not None and since.tzinfo is None:
        raise ValueError(f"since: {since!r} has no time zone")
    first_day = since.astimezone(UTC).date().isoformat() if since is not None else ""
    threshold = _timestamp(since) if since is not None else ""
    for path in sorted(folder.glob("audit-????-??-??.jsonl")):
        if path.stem[len("audit-"):] < first_day:
            continue
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    LOG.warning("%s line %d is not a complete audit event (torn by a crash?); skipped", path, number)
                    continue
                # Same fixed-width UTC format on both sides: text order is time order.
                if threshold and event.get("EventIdentification", {}).get("EventDateTime", "") < threshold:
                    continue
                yield event
