"""Server-rendered status pages for the admin, under ``/status`` on the node's HTTP port.

Pages (HTML from Jinja2 templates in ``node/templates/``, autoescaped; no
JavaScript; every page has the same nav bar):

- ``GET /status``: recent series (state, instances, completion rule,
  eligibility decision with its reason or the result summary), series counts
  by state, free space of the data dir and the size of the spool and results,
  outbox counts per destination and state.
- ``GET /status/series/{uid}``: one series, its result files and outbox items.
- ``GET /status/outbox``: items per destination; retry and purge forms
  (``POST /status/outbox/retry``, ``POST /status/outbox/purge``).
- ``GET /status/peers``: the configured destinations, each with a check
  (``POST /status/peers/test``): C-ECHO for DICOM peers, a QIDO-RS
  ``GET {url}/studies?limit=1`` for DICOMweb ones (status and round trip only;
  the response body, which names patients, is never read).
- ``GET /status/models``: the loaded model bundles.

The pages show UIDs only: the state database holds no patient names or IDs,
and nothing here reads a DICOM file.

Actions (the POSTs) change state, so they need an authenticated admin: when the
node has no ``[http] http_username/http_password`` they are refused with 403
and a page that says how to set them (reading stays open, as for STOW-RS).
With credentials the app-level :class:`node.http.server.BasicAuth` protects every
route and each action checks the credentials again (so that a route list
mounted without the middleware is not open). Against cross-site request
forgery every form carries a token, an HMAC of a per-process secret, and an
``Origin`` (or else ``Referer``) header that names another host is refused;
pages forbid framing (``frame-ancestors 'none'``). After an action the browser
is redirected (303) back to the page with a signed flash message in the query
string, and ``audit("admin action", {...})`` is called.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from node.config import DICOM, DICOMWEB, Destination, NodeConfig
from node.send.probe import PeerResult, echo_destination, peer_text, query_dicomweb
from node.store.state import (
    DEAD,
    DONE,
    FAILED,
    OUTBOX_STATES,
    PENDING,
    PROCESSING,
    QUEUED,
    RECEIVING,
    REJECTED,
    SENT,
    OutboxRow,
    SeriesRow,
    StateStore,
    short_class_name,
)

if TYPE_CHECKING:
    from pipelines.model.bundle import ModelBundle

LOG = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).with_name("templates")
SERIES_STATES = (RECEIVING, QUEUED, PROCESSING, DONE, REJECTED, FAILED)
DAY_S = 24 * 3600.0
#: How long a measured spool/results size is reused, and how long one measurement may walk.
DISK_CACHE_S = 30.0
DISK_WALK_BUDGET_S = 2.0
#: Outbox items searched for the series page (newest first; the store has no per-series query).
SERIES_OUTBOX_SCAN = 2000
_UID_RE = re.compile(r"^[0-9.]{1,64}$")
_BACK_RE = re.compile(r"^/status(/[A-Za-z0-9._-]+)*$")
#: Pages are self-contained (inline CSS, no script) and must not be framed (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

EchoFunction = Callable[[Destination], PeerResult]
AuditFunction = Callable[[str, dict[str, Any]], None]
ModelsFunction = Callable[[], list[dict[str, Any]]]


def describe_bundle(bundle: ModelBundle) -> dict[str, Any]:
    """What the models page shows of a loaded bundle (the ``models`` callable returns a list of these).

    Keys: ``id``, ``version``, ``name``, ``key``, ``artifacts`` (``{"id", "file", "provider"}``
    each; provider ``None`` when no session was made), ``stages`` (stage ids in order),
    ``segments`` (count) and ``folder``.
    """
    manifest = bundle.manifest
    providers = bundle.providers
    return {
        "id": manifest.id,
        "version": manifest.version,
        "name": manifest.name,
        "key": bundle.key,
        "artifacts": [{"id": a.id, "file": a.file, "provider": providers.get(a.id)} for a in manifest.artifacts],
        "stages": [s.id for s in manifest.stages],
        "segments": len(manifest.segments),
        "folder": str(bundle.folder),
    }


@dataclass(frozen=True)
class PeerCheck:
    """The outcome of one C-ECHO or QIDO-RS check of a destination."""

    destination: str
    ok: bool
    text: str
    at: float


@dataclass(frozen=True)
class DiskReport:
    """Space on the data dir's file system and what the spool and results take."""

    total: int | None
    free: int | None
    spool_bytes: int
    spool_files: int
    results_bytes: int
    complete: bool  # False: the walk stopped at its time budget; the sizes are lower bounds
    watermark_bytes: int
    measured_at: float
    error: str | None = None

    @property
    def under_watermark(self) -> bool:
        return self.free is not None and self.free < self.watermark_bytes


def folder_size(root: Path, deadline: float) -> tuple[int, int, bool]:
    """(bytes, files, complete) of the regular files under ``root``, walking until ``deadline``."""
    total = files = 0
    stack = [root]
    while stack:
        if time.monotonic() > deadline:
            return total, files, False
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                            files += 1
                    except OSError:
                        continue  # removed while we walked (the spool changes all the time)
        except OSError:
            continue
    return total, files, True


def human_bytes(n: int | None) -> str:
    """``512 B``, ``4.0 KiB``, ``53.3 GiB``; ``?`` for None."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def clock(t: float | None) -> str:
    """Local time as the CLI prints it; empty for None."""
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def ago(t: float | None, now: float | None = None) -> str:
    """``5 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago``; ``in 10 s`` for the future."""
    if t is None:
        return ""
    delta = (time.time() if now is None else now) - t
    future, delta = delta < 0, abs(delta)
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (2 * 86400, "h", 3600), (float("inf"), "d", 86400)):
        if delta < limit:
            text = f"{delta / size:.0f} {unit}"
            return f"in {text}" if future else f"{text} ago"
    return ""


def uid_breaks(uid: str) -> Markup:
    """A UID, escaped, that may wrap after its dots (64-character UIDs in a table column)."""
    return Markup(escape(uid).replace(".", Markup(".<wbr>")))


def _timings(row: SeriesRow) -> dict[str, float]:
    """Seconds per stage of the series' last run (stored by the worker), or {}."""
    try:
        data = json.loads(row.timings) if row.timings else {}
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def series_decision(row: SeriesRow) -> tuple[str, str]:
    """(decision label, text) for a series: the eligibility outcome and its reason or result summary.

    The ``reason`` column holds the rejection reason, the error, or the findings summary.
    """
    reason = row.reason or ""
    if row.state == DONE:
        return "eligible, processed", reason
    if row.state == REJECTED:
        return "not eligible", reason
    if row.state == FAILED:
        return "failed", reason
    if row.state == PROCESSING:
        return "processing", ""
    if row.state == QUEUED:
        return "complete, queued", ""
    return "receiving", "waiting for the series to complete"


def result_files(row: SeriesRow) -> list[dict[str, str]]:
    """The last result version's objects (``modality``, ``path``) from the series' results JSON."""
    if not row.results:
        return []
    try:
        items = json.loads(row.results)
    except ValueError:
        return [{"modality": "?", "path": f"(unreadable results record: {row.results[:200]})"}]
    return [{"modality": str(i.get("modality", "?")), "path": str(i.get("path", "?"))}
            for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def outbox_when(row: OutboxRow, now: float) -> str:
    """When an item was sent or went dead, or when its next attempt is due."""
    if row.state == SENT:
        return f"sent {clock(row.sent_at)}"
    if row.state == DEAD:
        return f"dead since {clock(row.dead_at)}" if row.dead_at is not None else "dead"
    return "due now" if row.next_attempt_at <= now else f"next attempt {clock(row.next_attempt_at)}"


def destination_address(destination: Destination) -> str:
    """``AET@host:port`` of a DICOM destination, the base URL of a DICOMweb one."""
    if destination.kind == DICOMWEB:
        return destination.url
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    return f"{destination.ae_title}@{host}:{destination.port}"


def destination_auth(destination: Destination) -> str:
    """How the node authenticates to a DICOMweb destination, without the secret."""
    if destination.kind == DICOM:
        return "TLS client certificate" if destination.tls_cert_file else ""
    if destination.bearer_token or destination.token_env:
        return "bearer token" + (f" (from ${destination.token_env})" if destination.token_env else "")
    if destination.username:
        return f"basic, user {destination.username}" + (
            f" (password from ${destination.password_env})" if destination.password_env else "")
    return "none"


class StatusPages:
    """The ``/status`` pages of one node process: state, config and the injected callables."""

    def __init__(
        self,
        state: StateStore,
        config: NodeConfig,
        *,
        models: ModelsFunction | None = None,
        echo: EchoFunction | None = None,
        audit: AuditFunction | None = None,
    ) -> None:
        if not isinstance(state, StateStore):
            raise TypeError(f"state: expected a StateStore, got {type(state).__name__}")
        if not isinstance(config, NodeConfig):
            raise TypeError(f"config: expected a NodeConfig, got {type(config).__name__}")
        for name, value in (("models", models), ("echo", echo), ("audit", audit)):
            if value is not None and not callable(value):
                raise TypeError(f"{name}: expected a callable or None, got {type(value).__name__}")
        self.state = state
        self.config = config
        self.models = models
        self.echo = echo if echo is not None else self._sender_echo
        self.audit = audit
        self._secret = secrets.token_bytes(32)  # per process: forms of an earlier process are refused
        self.csrf_token = self._sign("form")
        self._credentials = (
            base64.b64encode(f"{config.http_username}:{config.http_password}".encode()).decode()
            if config.http_username and config.http_password else None)
        self._disk: DiskReport | None = None
        self._disk_lock = threading.Lock()
        self._checks: dict[str, PeerCheck] = {}
        self.templates = Environment(
            loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined,
            trim_blocks=True, lstrip_blocks=True,
        )
        self.templates.filters.update(clock=clock, ago=ago, human_bytes=human_bytes,
                                      class_name=short_class_name, uid_breaks=uid_breaks)

    def _sender_echo(self, destination: Destination) -> PeerResult:
        # The same check as `pacs-ai-node peers test`: TLS where configured, and the reason for a refusal.
        return echo_destination(destination, self.config, self.config.send_connect_timeout_s)

    @property
    def actions_enabled(self) -> bool:
        """Whether POST actions can be authorised (the node has HTTP credentials)."""
        return self._credentials is not None

    def routes(self) -> list[BaseRoute]:
        """The GET pages and POST actions, each with its full ``/status...`` path."""
        return [
            Route("/status", self.overview, methods=["GET"]),
            Route("/status/series/{uid}", self.series, methods=["GET"]),
            Route("/status/outbox", self.outbox, methods=["GET"]),
            Route("/status/outbox/retry", self.retry, methods=["POST"]),
            Route("/status/outbox/purge", self.purge, methods=["POST"]),
            Route("/status/peers", self.peers, methods=["GET"]),
            Route("/status/peers/test", self.test_peer, methods=["POST"]),
            Route("/status/models", self.models_page, methods=["GET"]),
        ]

    # -- rendering --------------------------------------------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def _flash(self, request: Request) -> dict[str, str] | None:
        """The flash message of the query string, if this process signed it (no forged messages)."""
        message, kind, signature = (request.query_params.get(k, "") for k in ("flash", "kind", "sig"))
        if not message or kind not in ("ok", "error"):
            return None
        if not hmac.compare_digest(signature, self._sign(f"flash|{kind}|{message}")):
            return None
        return {"kind": kind, "message": message}

    def _redirect(self, request: Request, path: str, message: str, ok: bool = True) -> RedirectResponse:
        kind = "ok" if ok else "error"
        query = urlencode({"flash": message, "kind": kind, "sig": self._sign(f"flash|{kind}|{message}")})
        return RedirectResponse(f"{request.scope.get('root_path', '')}{path}?{query}", status_code=303)

    def _render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(
            base=request.scope.get("root_path", ""),
            path=request.url.path,
            node=self.config,
            flash=self._flash(request),
            csrf_token=self.csrf_token,
            actions_enabled=self.actions_enabled,
            now=time.time(),
            **context,
        )
        return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)

    def _message(self, request: Request, status_code: int, title: str, **context: Any) -> HTMLResponse:
        return self._render(request, "message.html", status_code, title=title, **context)

    # -- read-only pages ----------------------------------------------------------

    def disk_report(self) -> DiskReport:
        """Free space of the data dir, spool and results sizes; measured at most every DISK_CACHE_S."""
        with self._disk_lock:
            if self._disk is not None and time.time() - self._disk.measured_at < DISK_CACHE_S:
                return self._disk
            total = free = None
            error = None
            try:
                usage = shutil.disk_usage(self.config.data_dir)
                total, free = usage.total, usage.free
            except OSError as exc:
                error = f"{self.config.data_dir}: {exc.strerror or exc}"
            deadline = time.monotonic() + DISK_WALK_BUDGET_S
            spool_bytes, spool_files, spool_complete = folder_size(self.config.spool_dir, deadline)
            results_bytes, _, results_complete = folder_size(self.config.results_dir, deadline)
            self._disk = DiskReport(total, free, spool_bytes, spool_files, results_bytes,
                                    spool_complete and results_complete, self.config.min_free_disk_mb * 2**20,
                                    time.time(), error)
            return self._disk

    def _outbox_by_destination(self) -> dict[str, dict[str, int]]:
        """Counts per destination and state, configured destinations first (even without items)."""
        counts: dict[str, dict[str, int]] = {str(d): dict.fromkeys(OUTBOX_STATES, 0) for d in self.config.destinations}
        for (destination, state), n in sorted(self.state.outbox_counts().items()):
            counts.setdefault(destination, dict.fromkeys(OUTBOX_STATES, 0))[state] = n
        return counts

    def overview(self, request: Request) -> Response:
        try:
            limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
        except ValueError:
            limit = 100
        counts = self.state.counts()
        series_counts = {s: counts.get(f"series_{s}", 0) for s in SERIES_STATES}
        rows = self.state.list_series(limit=limit)
        outbox = self._outbox_by_destination()
        return self._render(
            request, "overview.html",
            title="Overview",
            series=[(row, *series_decision(row)) for row in rows],
            series_counts=series_counts,
            series_total=sum(series_counts.values()),
            limit=limit,
            disk=self.disk_report(),
            outbox=outbox,
            outbox_totals={s: sum(c[s] for c in outbox.values()) for s in OUTBOX_STATES},
            outbox_states=OUTBOX_STATES,
        )

    def series(self, request: Request) -> Response:
        uid = request.path_params["uid"]
        row = self.state.get_series(uid) if _UID_RE.match(uid) else None
        if row is None:
            return self._message(request, 404, "Series not found",
                                 text=f"No series with Series Instance UID {uid} in the state database.")
        scanned = self.state.list_outbox(limit=SERIES_OUTBOX_SCAN)
        items = [r for r in scanned if r.series_uid == uid]
        decision, text = series_decision(row)
        return self._render(
            request, "series.html",
            title=f"Series {uid}",
            row=row, decision=decision, decision_text=text,
            results=result_files(row), items=items, timings=_timings(row),
            outbox_partial=len(scanned) == SERIES_OUTBOX_SCAN,
            scan_limit=SERIES_OUTBOX_SCAN,
            when=outbox_when,
        )

    def outbox(self, request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state not in (None, *OUTBOX_STATES):
            state = None
        try:
            limit = min(max(int(request.query_params.get("limit", "200")), 1), 2000)
        except ValueError:
            limit = 200
        counts = self._outbox_by_destination()
        sections = [(name, n, self.state.list_outbox(limit=limit, state=state, destination=name))
                    for name, n in counts.items()]
        return self._render(
            request, "outbox.html",
            title="Outbox",
            sections=sections, state_filter=state, outbox_states=OUTBOX_STATES, limit=limit,
            when=outbox_when, retryable=lambda r: r.state == DEAD or (r.state == PENDING and r.attempts > 0),
        )

    def peers(self, request: Request) -> Response:
        counts = self._outbox_by_destination()
        peers = [{"destination": d, "name": str(d), "address": destination_address(d), "auth": destination_auth(d),
                  "counts": counts.get(str(d), {}), "check": self._checks.get(str(d))}
                 for d in self.config.destinations]
        return self._render(request, "peers.html", title="Peers", peers=peers, outbox_states=OUTBOX_STATES,
                            dicomweb=DICOMWEB)

    def models_page(self, request: Request) -> Response:
        error = None
        bundles: list[dict[str, Any]] = []
        if self.models is not None:
            try:
                bundles = list(self.models())
            except Exception as exc:  # a broken callable must not take the page down
                LOG.exception("status page: the models callable failed")
                error = f"{type(exc).__name__}: {exc}"
        return self._render(request, "models.html", title="Models", bundles=bundles,
                            known=self.models is not None, error=error)

    # -- actions ----------------------------------------------------------------

    async def _authorise(self, request: Request) -> dict[str, Any] | Response:
        """The submitted form when the POST may act; otherwise the refusal to send."""
        client = request.client.host if request.client else "?"
        if self._credentials is None:
            LOG.warning("status action %s from %s refused: no http_username/http_password configured",
                        request.url.path, client)
            return self._message(request, 403, "Actions need credentials", no_credentials=True,
                                       text="This node has no HTTP credentials, so its status pages are "
                                            "read-only: anyone who can reach the port could otherwise "
                                            "change the outbox.")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not hmac.compare_digest(token.strip(), self._credentials):
            LOG.warning("status action %s from %s refused: no or wrong credentials", request.url.path, client)
            return Response("authentication required\n", status_code=401, media_type="text/plain",
                                  headers={"WWW-Authenticate": 'Basic realm="pacs-ai-node"'})
        host = request.headers.get("host", "")
        origin = request.headers.get("origin")
        referer = request.headers.get("referer")
        source = origin if origin is not None else referer
        if source is not None and (source == "null" or urlsplit(source).netloc.rpartition("@")[2] != host):
            LOG.warning("status action %s from %s refused: %s %r is not this host %r", request.url.path, client,
                        "Origin" if origin is not None else "Referer", source, host)
            return self._message(request, 403, "Request from another site refused",
                                       text="The form was submitted from a page that is not this node's.")
        form = await request.form()
        values: dict[str, Any] = {key: form.getlist(key) for key in form.keys()}
        if not hmac.compare_digest(str(form.get("csrf_token", "")), self.csrf_token):
            LOG.warning("status action %s from %s refused: missing or stale form token", request.url.path, client)
            return self._message(request, 403, "Form expired",
                                       text="The form's token is missing or from before the node restarted. "
                                            "Reload the page and try again.")
        values["_client"] = client
        return values

    def _audit(self, detail: dict[str, Any]) -> None:
        LOG.info("status action: %s", detail)
        if self.audit is not None:
            self.audit("admin action", detail)

    @staticmethod
    def _back(form: dict[str, Any], default: str) -> str:
        back = (form.get("back") or [""])[0]
        return back if _BACK_RE.match(back) else default

    async def retry(self, request: Request) -> Response:
        form = await self._authorise(request)
        if isinstance(form, Response):  # refused
            return form
        back = self._back(form, "/status/outbox")
        destination = (form.get("destination") or [""])[0].strip() or None
        try:
            ids = [int(v) for raw in form.get("ids", []) for v in str(raw).replace(",", " ").split()]
        except ValueError:
            return self._redirect(request, back, "Retry: ids must be whole numbers.", ok=False)
        if not ids and destination is None:
            return self._redirect(request, back, "Retry: choose a destination or items.", ok=False)
        # A destination alone retries its dead items; ids retry those items (dead, or pending that failed).
        rows = await run_in_threadpool(self.state.retry_outbox, ids=ids or None, destination=destination,
                                       all_dead=not ids)
        self._audit({"action": "outbox retry", "destination": destination, "ids": ids,
                     "retried": [r.id for r in rows], "user": self.config.http_username, "client": form["_client"]})
        where = f" of {destination}" if destination else ""
        if not rows:
            return self._redirect(request, back, f"Nothing to retry{where}: no dead or failed items selected.",
                                  ok=False)
        return self._redirect(request, back, f"Retry: {len(rows)} item(s){where} are pending and due now "
                                             f"(ids {', '.join(str(r.id) for r in rows)}).")

    async def purge(self, request: Request) -> Response:
        form = await self._authorise(request)
        if isinstance(form, Response):  # refused
            return form
        back = self._back(form, "/status/outbox")
        destination = (form.get("destination") or [""])[0].strip() or None
        try:
            days = float((form.get("days") or [""])[0])
        except ValueError:
            days = -1.0
        if not 0 <= days <= 36500:
            return self._redirect(request, back, "Purge: days must be a number from 0 to 36500.", ok=False)
        before = time.time() - days * DAY_S
        count = await run_in_threadpool(self.state.purge_outbox, sent_before=before, destination=destination)
        self._audit({"action": "outbox purge", "sent_older_than_days": days, "destination": destination,
                     "purged": count, "user": self.config.http_username, "client": form["_client"]})
        where = f" of {destination}" if destination else ""
        return self._redirect(request, back, f"Purge: {count} sent item(s){where} sent more than {days:g} days "
                                             "ago removed from the outbox (result files are kept).")

    async def test_peer(self, request: Request) -> Response:
        form = await self._authorise(request)
        if isinstance(form, Response):  # refused
            return form
        name = (form.get("destination") or [""])[0]
        destination = next((d for d in self.config.destinations if str(d) == name), None)
        if destination is None:
            return self._redirect(request, "/status/peers", f"No configured destination named {name!r}.", ok=False)
        try:
            if destination.kind == DICOM:
                result = await run_in_threadpool(self.echo, destination)
            else:
                result = await run_in_threadpool(query_dicomweb, destination, self.config.send_connect_timeout_s)
            ok, text = result.ok, peer_text(result)
        except Exception as exc:  # the peer check reports, it does not crash the page
            ok, text = False, f"peer check failed: {type(exc).__name__}: {exc}"
        self._checks[name] = PeerCheck(name, ok, text, time.time())
        self._audit({"action": "peer test", "destination": name, "ok": ok, "result": text,
                     "user": self.config.http_username, "client": form["_client"]})
        return self._redirect(request, "/status/peers", f"{name}: {text}", ok=ok)


def status_routes(
    state: StateStore,
    config: NodeConfig,
    *,
    models: ModelsFunction | None = None,
    echo: EchoFunction | None = None,
    audit: AuditFunction | None = None,
    show_patient_names: bool = False,
) -> list[BaseRoute]:
    """The ``/status`` routes, to add to the node's Starlette app next to STOW-RS.

    ``models`` returns the loaded bundles (a dict each, see :func:`describe_bundle`);
    ``echo`` C-ECHOes a DICOM destination and returns a :class:`node.send.probe.PeerResult`
    (default :func:`node.send.probe.echo_destination` with ``config``); ``audit``
    is called as ``audit("admin action", detail)`` after every action.
    ``show_patient_names`` must stay False: the state database holds no patient
    names or IDs, and the pages show UIDs only.
    """
    if show_patient_names:
        raise ValueError("show_patient_names: the state database holds no patient names or IDs "
                         "(the status pages show UIDs only); it must be False")
    return StatusPages(state, config, models=models, echo=echo, audit=audit).routes()


__all__ = ["DiskReport", "PeerCheck", "StatusPages", "describe_bundle", "status_routes"]
