"""The node process: listener, series completion, processing and sending.

Each role is its own loop around the state store (mercure's shape): the
listener records instances, the assembler turns quiet series into jobs, the
worker runs the pipeline and fills the outbox, the sender empties it. All
state is in SQLite, so a restart picks up exactly where the last process
stopped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from node.config import NodeConfig
from node.receive.intake import Intake, read_header
from node.receive.listener import DicomServer
from node.send.sender import Sender
from node.receive.stow import HttpServer, create_app
from node.store.spool import Spool, check_uid, remove_partials, write_durably
from node.store.state import DONE, FAILED, REJECTED, StateStore
from pipelines.analysis import ResultLabelling, SeriesAnalyzer, SeriesResult
from pipelines.errors import PacsAiError, SeriesRejected
from pipelines.model.bundle import ModelBundle
from pipelines.rules.ruleset import RuleSet, screen_series
from pipelines.volume.ct import load_series

LOG = logging.getLogger(__name__)

#: How often the loops look for work when nothing woke them.
POLL_SECONDS = 0.5
#: How long a clean shutdown waits for associations in progress.
ASSOCIATION_DRAIN_SECONDS = 30.0


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pacs-ai-node")
    except PackageNotFoundError:
        return "0+unknown"


def build_analyzer(config: NodeConfig) -> SeriesAnalyzer:
    """Load every enabled model bundle once (hashes checked, sessions warm) and wrap them for analysis."""
    bundles = [
        ModelBundle(folder, require_gpu=config.require_gpu, tensorrt_cache_dir=config.data_dir / "tensorrt-cache")
        for folder in config.model_dirs
    ]
    labelling = ResultLabelling(research_notice=config.research_notice, software_version=software_version(),
                                risk=config.risk, seg_type=config.seg_type, key_image_type=config.key_image_type)
    return SeriesAnalyzer(bundles, labelling)


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as PS3.10 file bytes."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_results(result: SeriesResult, results_dir: Path) -> list[tuple[Dataset, Path]]:
    """Write each result object durably under results/<study>/<series>/; returns (dataset, path)."""
    written = []
    for ds in result.objects:
        path = (
            results_dir
            / check_uid(ds.StudyInstanceUID, "Study Instance UID")
            / check_uid(ds.SeriesInstanceUID, "Series Instance UID")
            / f"{check_uid(ds.SOPInstanceUID, 'SOP Instance UID')}.dcm"
        )
        write_durably(path, encode_dataset(ds))
        written.append((ds, path))
    return written


def previous_reports(results: str | None) -> list[Dataset]:
    """The SR(s) of the last result version of a series (to be superseded), read from the results dir."""
    import pydicom

    if not results:
        return []
    out = []
    for item in json.loads(results):
        if item.get("modality") == "SR":
            try:
                out.append(pydicom.dcmread(item["path"]))
            except (OSError, ValueError) as exc:
                LOG.warning("previous result %s cannot be read (%s); the new version will not reference it",
                            item["path"], exc)
    return out


def adopt_unrecorded(spool: Spool, state: StateStore, quarantine: Path | None = None) -> int:
    """Record spooled files that have no row; move aside those that are incomplete.

    A file without a row is either one whose row a power cut took away after
    its fsyncs (complete; its sender may hold a success status: it must not
    be forgotten), or one that was renamed into place but not yet flushed
    when the power went (never acknowledged; possibly incomplete). Each is
    read in full and its pixel data decoded: complete ones are recorded,
    others go to ``quarantine`` (never deleted) with a log line.
    """
    import pydicom

    known = state.known_paths()
    adopted = 0
    for path in spool.files():
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path)
            header = read_header(ds)
            ds.pixel_array  # noqa: B018 - decoding everything is the completeness check
        except Exception as exc:
            if quarantine is None:
                LOG.error("spooled file %s is incomplete or unreadable (%s); left in place", path, exc)
                continue
            target = quarantine / path.relative_to(spool.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            LOG.error("spooled file %s is incomplete or unreadable (%s); moved to %s", path, exc, target)
            continue
        state.record_instance(header, path=str(path), size=path.stat().st_size, calling_ae="(recovered)")
        adopted += 1
    return adopted


#: How often retention looks for expired data, in seconds.
RETENTION_INTERVAL_S = 600.0
DAY_S = 86400.0


def apply_retention(config: NodeConfig, state: StateStore, now: float | None = None) -> tuple[int, int]:
    """Delete received instances of series finished ``retain_input_days`` ago, and result files
    delivered to every destination ``retain_results_days`` ago; returns (instances, results) deleted.

    Results with any pending or dead delivery are never deleted. A setting of 0 keeps that data forever.
    """
    now = time.time() if now is None else now
    instances = results = 0
    if config.retain_input_days > 0:
        for series_uid, paths in state.expired_inputs(now - config.retain_input_days * DAY_S):
            for path in paths:
                instances += _unlink(Path(path), stop_at=config.spool_dir)
            state.mark_input_purged(series_uid, now)
            LOG.info("retention: deleted %d received instances of series %s", len(paths), series_uid)
    if config.retain_results_days > 0:
        for path in state.delivered_results(now - config.retain_results_days * DAY_S):
            results += _unlink(Path(path), stop_at=config.results_dir)
            state.forget_delivered(path)
    if results:
        LOG.info("retention: deleted %d delivered result files", results)
    return instances, results


def _unlink(path: Path, stop_at: Path) -> int:
    """Delete one file and the folders it leaves empty, up to ``stop_at``; 1 if the file existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    parent = path.parent
    while parent != stop_at and stop_at in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone)
            break
        parent = parent.parent
    return 1


class Node:
    """One node process; :meth:`run` blocks until :meth:`request_stop`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_partials(config.data_dir)
        if removed:
            LOG.info("removed %d partial files left by an interrupted write", removed)
        self.state = StateStore(config.state_path)
        self.spool = Spool(config.spool_dir)
        adopted = adopt_unrecorded(self.spool, self.state, quarantine=config.data_dir / "quarantine")
        if adopted:
            LOG.warning("%d spooled instances had no state record (power cut?); recorded now", adopted)
        self.analyzer = build_analyzer(config)
        self.rules = RuleSet.load(config.rules_file)
        self._stop = threading.Event()
        self._wake_worker = threading.Event()
        self._wake_sender = threading.Event()
        from node.observe.audit import AuditTrail
        from node.observe.metrics import NodeMetrics, store_counts

        self.metrics = NodeMetrics(config.data_dir, store_counts(self.state), version=software_version())
        self.audit = AuditTrail(config.data_dir, config.ae_title, syslog=config.audit_syslog_address,
                                include_patient_identity=config.audit_patient_identity)
        self.intake = Intake(config, self.spool, self.state, on_queued=self._wake_worker.set)
        self.intake.metrics, self.intake.audit = self.metrics, self.audit
        self.listeners = [DicomServer(config, self.intake)]
        if config.tls_port:
            self.listeners.append(DicomServer(config, self.intake, ssl_context=config.server_ssl_context(),
                                              port=config.tls_port))
        self.http: HttpServer | None = None
        if config.http_port:
            credentials = (config.http_username, config.http_password) if config.http_username else None
            app = create_app(self.intake, max_request_bytes=config.stow_max_request_mb * 2**20,
                             credentials=credentials)
            if config.metrics_endpoint:
                from node.observe.metrics import metrics_route

                app.router.routes.append(metrics_route(self.metrics))
            if config.status_page_enabled:
                from node.http.status import describe_bundle, status_routes

                app.router.routes.extend(status_routes(
                    self.state, config,
                    models=lambda: [describe_bundle(b) for b in self.analyzer.bundles],
                    audit=self._admin_action,
                ))
            self.http = HttpServer(app, config.http_bind_address, config.http_port,
                                   ssl_context=config.server_ssl_context(False) if config.http_tls else None)
        self.sender = Sender(config, self.state, metrics=self.metrics, audit=self.audit)
        self._threads: list[threading.Thread] = []
        self._pending_reload: NodeConfig | None = None

    #: Settings a running node takes on reload (SIGHUP); any other change needs a restart.
    RELOADABLE = frozenset({
        "allowed_calling_ae_titles", "max_associations", "min_free_disk_mb", "network_timeout_s",
        "series_quiet_seconds", "complete_on_release", "rules_file", "destinations", "send_retry_initial_s",
        "send_retry_max_s", "send_connect_timeout_s", "send_dimse_timeout_s", "research_notice", "log_level",
        "retain_input_days", "retain_results_days", "risk", "seg_type", "key_image_type",
    })

    def request_reload(self, config: NodeConfig) -> None:
        """Ask the main loop to apply ``config`` (called from the SIGHUP handler)."""
        self._pending_reload = config
        self._wake_worker.set()

    def reload(self, new: NodeConfig) -> tuple[list[str], list[str]]:
        """Apply the reloadable settings of ``new`` without dropping associations in progress
        (they finish with the settings they started with); returns (applied, needing a restart)."""
        from dataclasses import fields, replace

        changed = [f.name for f in fields(NodeConfig) if getattr(new, f.name) != getattr(self.config, f.name)]
        applied = [name for name in changed if name in self.RELOADABLE]
        restart = [name for name in changed if name not in self.RELOADABLE]
        if not applied:
            return applied, restart
        config = replace(self.config, **{name: getattr(new, name) for name in applied})
        rules = RuleSet.load(config.rules_file) if "rules_file" in applied else self.rules
        self.sender.reconfigure(config)  # validates destinations first: a bad one changes nothing
        self.rules = rules
        self.config = config
        self.intake.config = config
        for listener in self.listeners:
            listener.config = config  # new associations only
        self.analyzer.labelling = replace(self.analyzer.labelling, research_notice=config.research_notice,
                                          risk=config.risk, seg_type=config.seg_type,
                                          key_image_type=config.key_image_type)
        logging.getLogger().setLevel(config.log_level.upper())
        return applied, restart

    def _apply_pending_reload(self) -> None:
        new, self._pending_reload = self._pending_reload, None
        if new is None:
            return
        try:
            applied, restart = self.reload(new)
        except Exception as exc:  # a bad file must not stop a running node
            LOG.error("configuration reload refused, nothing changed: %s", exc)
            return
        LOG.info("configuration reloaded: %s", ", ".join(applied) or "no change that can be applied live")
        self.audit.admin_action("SIGHUP", None, "configuration reload", {"applied": applied, "restart_needed": restart},
                                security=bool({"allowed_calling_ae_titles", "destinations"} & set(applied)))
        if restart:
            LOG.warning("configuration reload: %s changed but only take effect after a restart",
                        ", ".join(restart))

    def _admin_action(self, what: str, detail: dict) -> None:
        LOG.info("%s: %s", what, json.dumps(detail, default=str, sort_keys=True))
        self.audit.record_admin(what, detail)

    def request_stop(self) -> None:
        self._stop.set()
        self._wake_sender.set()
        self._wake_worker.set()

    def run(self) -> None:
        requeued = self.state.requeue_interrupted()
        if requeued:
            LOG.info("%d series interrupted by the last shutdown are queued again", len(requeued))
        started: list[DicomServer] = []
        try:
            for listener in self.listeners:
                listener.start()
                started.append(listener)
            if self.http is not None:
                self.http.start()
        except Exception:
            for listener in started:
                listener.stop(0)
            raise
        if self.http is not None:
            LOG.info("DICOMweb STOW-RS on %s://%s:%d/studies (and /dicom-web/studies)%s",
                     "https" if self.config.http_tls else "http", self.config.http_bind_address, self.http.port,
                     ", basic authentication" if self.config.http_username else "")
            if self.config.status_page_enabled:
                LOG.info("status pages on %s://%s:%d/status%s", "https" if self.config.http_tls else "http",
                         self.config.http_bind_address, self.http.port,
                         "" if self.config.http_username else " (read-only: set http_username/http_password "
                         "to allow retry, purge and C-ECHO)")
        self._threads = [
            threading.Thread(target=self._work_loop, name="worker", daemon=True),
            threading.Thread(target=self._send_loop, name="sender", daemon=True),
            threading.Thread(target=self._retention_loop, name="retention", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.audit.application_activity(True)
        LOG.info(
            "node ready: models %s, quiet period %.1f s, destinations: %s",
            ", ".join(f"{b.key} on {b.provider}" for b in self.analyzer.bundles),
            self.config.series_quiet_seconds,
            ", ".join(str(d) for d in self.config.destinations) or "none",
        )
        try:
            while not self._stop.wait(POLL_SECONDS):
                self._apply_pending_reload()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        LOG.info("stopping: no new associations; waiting for those in progress")
        for listener in self.listeners:
            listener.close()  # all ports stop accepting first, then each drains
        if self.http is not None:
            self.http.stop()
        for listener in self.listeners:
            listener.stop(ASSOCIATION_DRAIN_SECONDS)
        for thread in self._threads:
            thread.join(timeout=60)
            if thread.is_alive():
                LOG.warning("%s still busy at shutdown; its series will be queued again at the next start",
                            thread.name)
        if not self.sender.wait_idle(timeout=30):
            LOG.warning("a delivery is still running at shutdown; its items are sent again at the next start")
        self.audit.application_activity(False)
        self.audit.close()
        LOG.info("stopped")

    # -- worker ---------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for uid in self.state.queue_quiet_series(self.config.series_quiet_seconds):
                    LOG.info("series %s complete (quiet for %.1f s), queued", uid, self.config.series_quiet_seconds)
                row = self.state.claim_next_series()
            except Exception:  # the state store must not kill the loop (e.g. locked database)
                LOG.exception("worker could not read the state store")
                self._stop.wait(POLL_SECONDS)
                continue
            if row is None:
                self._wake_worker.wait(POLL_SECONDS)
                self._wake_worker.clear()
                continue
            try:
                self.process_series(row.series_uid, row.updated_at)
            except Exception as exc:  # e.g. the state store failed: the series must not stay claimed
                LOG.exception("worker error on series %s", row.series_uid)
                try:
                    self.state.finish_series(row.series_uid, FAILED, f"internal error: {type(exc).__name__}: {exc}",
                                             row.updated_at)
                except Exception:  # requeue_interrupted picks it up at the next start
                    LOG.exception("series %s stays in processing until the next start", row.series_uid)
                self._stop.wait(POLL_SECONDS)

    def process_series(self, series_uid: str, claimed_at: float) -> str:
        """Analyse one claimed series, store and queue its results; returns the final state."""
        paths = self.state.series_instances(series_uid)
        started = time.perf_counter()
        row = self.state.get_series(series_uid)
        version = (row.version if row else 0) + 1
        rule_ids: list[str] = []
        try:
            decision = screen_series([Path(p) for p in paths], self.rules)
            if not decision.eligible:
                rule_ids = [f.rule_id for f in decision.failures]
                raise SeriesRejected("; ".join(decision.reasons))
            volume = load_series(paths)
            loaded = time.perf_counter()
            previous = previous_reports(row.results if row else None)
            result = self.analyzer.analyse(volume, version=version, previous_reports=previous)
            analysed = time.perf_counter()
            written = write_results(result, self.config.results_dir)
        except SeriesRejected as exc:
            final = self.state.finish_series(series_uid, REJECTED, exc.reason, claimed_at)
            LOG.info("series %s%s rejected: %s", series_uid, self._patient(paths), exc.reason)
            self._count_finished(final, exc.reason, rule_ids or ["geometry"])
            return final
        except PacsAiError as exc:
            final = self.state.finish_series(series_uid, FAILED, str(exc), claimed_at)
            LOG.error("series %s%s failed: %s", series_uid, self._patient(paths), exc)
            self._count_finished(final)
            return final
        except Exception as exc:  # a bug must fail one series, not the node
            LOG.exception("series %s failed with an internal error", series_uid)
            final = self.state.finish_series(series_uid, FAILED, f"internal error: {type(exc).__name__}: {exc}",
                                             claimed_at)
            self._count_finished(final)
            return final
        destinations = [str(d) for d in self.config.destinations]
        self.state.record_results(
            series_uid,
            version,
            json.dumps([{"modality": str(ds.Modality), "path": str(path)} for ds, path in written]),
            [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path),
              [str(d) for d in self.config.destinations if d.wants(str(ds.Modality), str(ds.SOPClassUID))])
             for ds, path in written],
        )
        summary = "; ".join(result.summary)
        if version > 1:
            summary = f"version {version} (supersedes {version - 1}): {summary}"
        stages = {"screen and load": round(loaded - started, 3),
                  **{k: round(v, 3) for k, v in result.timings.items()},
                  "write results": round(time.perf_counter() - analysed, 3)}
        final = self.state.finish_series(series_uid, DONE, summary, claimed_at, timings=json.dumps(stages))
        self._count_finished(final)
        self.metrics.stage_timings(result.timings)
        LOG.info(
            "series %s processed in %.2f s (%s): %s; %d objects queued for %d destinations",
            series_uid,
            time.perf_counter() - started,
            ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()),
            summary,
            len(written),
            len(destinations),
        )
        self._wake_sender.set()
        return final

    def _patient(self, paths: list[str]) -> str:
        """`` (patient NAME (ID))`` for a log line when the site enabled log_patient_identity, else ""."""
        if not self.config.log_patient_identity or not paths:
            return ""
        import pydicom

        from node.observe.logs import patient_text

        try:
            ds = pydicom.dcmread(paths[0], stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        except (OSError, ValueError):
            return ""
        text = patient_text(ds, True)
        return f" ({text})" if text else ""

    def _count_finished(self, final: str, reason: str | None = None, rules: list[str] | None = None) -> None:
        if final in (DONE, REJECTED, FAILED):  # not when new instances sent the series back to receiving
            self.metrics.series_finished(final, reason, rules=rules)

    # -- retention ------------------------------------------------------------

    def _retention_loop(self) -> None:
        while not self._stop.is_set():
            try:
                apply_retention(self.config, self.state)
            except Exception:  # retention must never stop the node; it tries again later
                LOG.exception("retention pass failed")
            self._stop.wait(RETENTION_INTERVAL_S)

    # -- sender ---------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_sender.wait(1.0)
            self._wake_sender.clear()
            if self._stop.is_set():
                break
            try:
                self.sender.send_due()
            except Exception:  # keep retrying; items stay pending in the outbox
                LOG.exception("sender loop error")
