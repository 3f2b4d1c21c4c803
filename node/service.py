"""The node process: listener, series completion, processing and sending.

Each role is its own loop around the state store (mercure's shape): the
listener records instances (:mod:`node.receive`), the worker turns quiet series
into jobs, runs the pipeline and fills the outbox (:mod:`node.work`), the sender
empties it (:mod:`node.send`), retention deletes what has expired
(:mod:`node.store.retention`). All state is in SQLite, so a restart picks up
exactly where the last process stopped. :class:`Node` assembles the roles,
applies a reload and shuts them down in order.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from node import __version__
from node.config import NodeConfig
from node.http.server import HttpServer, create_app, metrics_route, status_hint_routes
from node.receive.intake import Intake
from node.receive.listener import DicomServer
from node.send.sender import Sender
from node.store.recovery import adopt_unrecorded
from node.store.retention import RETENTION_INTERVAL_S, apply_retention
from node.store.spool import Spool, remove_partials
from node.store.state import StateStore
from node.work.results import build_analyzer
from node.work.worker import Worker
from pipelines.rules.ruleset import RuleSet

LOG = logging.getLogger(__name__)

#: How often the main loop looks for a pending reload.
POLL_SECONDS = 0.5
#: How long a clean shutdown waits for associations in progress.
ASSOCIATION_DRAIN_SECONDS = 30.0


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

        self.metrics = NodeMetrics(config.data_dir, store_counts(self.state), version=__version__)
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
                             credentials=credentials, max_concurrency=config.http_max_concurrency,
                             idle_timeout_s=config.network_timeout_s)
            if config.metrics_endpoint:
                app.router.routes.append(metrics_route(self.metrics))
            if config.status_page_enabled:
                from node.http.status import describe_bundle, status_routes

                app.router.routes.extend(status_routes(
                    self.state, config,
                    models=lambda: [describe_bundle(b) for b in self.analyzer.bundles],
                    audit=self._admin_action,
                ))
            else:  # a newcomer who opens /status learns why it is off and how to turn it on
                app.router.routes.extend(status_hint_routes())
            self.http = HttpServer(app, config.http_bind_address, config.http_port,
                                   ssl_context=config.server_ssl_context(False) if config.http_tls else None)
        self.sender = Sender(config, self.state, metrics=self.metrics, audit=self.audit)
        self.worker = Worker(config, self.state, self.analyzer, self.rules, metrics=self.metrics,
                             on_results=self._wake_sender.set)
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
        self.worker.rules, self.worker.config = rules, config  # from the next series on
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

    def _admin_action(self, what: str, detail: dict[str, Any]) -> None:
        LOG.info("%s: %s", what, json.dumps(detail, default=str, sort_keys=True))
        self.audit.record_admin(what, detail)

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (called from the SIGTERM/SIGINT handler)."""
        self._stop.set()
        self._wake_sender.set()
        self._wake_worker.set()

    def run(self) -> None:
        """Start every role, then apply reloads until :meth:`request_stop`; shuts down in order."""
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
            else:
                LOG.info("status pages off (HTTP is not on loopback and [status] status_page is not \"on\"); "
                         "GET /status says how to turn them on")
        self._threads = [
            threading.Thread(target=self.worker.run, args=(self._stop, self._wake_worker), name="worker",
                             daemon=True),
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
