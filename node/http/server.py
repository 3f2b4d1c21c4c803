"""The node's HTTP server: one Starlette app on one port, run by uvicorn in a thread.

:func:`create_app` puts together what the node serves over HTTP: DICOMweb
STOW-RS (:mod:`node.receive.stow`), optionally behind HTTP basic
authentication (:class:`BasicAuth`); the status pages (:mod:`node.http.status`)
and the Prometheus ``/metrics`` route (:func:`metrics_route`) are added to its
router. When the status pages are off, :func:`status_hint_routes` answers
``/status`` and ``/`` with a short page that says why and how to turn them on.
:class:`HttpServer` binds the socket and runs the app. :class:`ConcurrencyLimit`
bounds the requests in flight (503 with ``Retry-After`` over it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from node.receive.intake import Intake
from node.receive.stow import (
    DEFAULT_BASE_PATHS,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_PART_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    stow_routes,
)
from pipelines.errors import PacsAiError

if TYPE_CHECKING:
    from node.observe.metrics import NodeMetrics

LOG = logging.getLogger(__name__)

#: Why the status pages may be off, and how to turn them on (see ``NodeConfig.status_page_enabled``).
STATUS_DISABLED_TEXT = """\
pacs-ai-node: the status pages are turned off on this node.

With the default [status] status_page = "auto" they are served only when the
HTTP port listens on loopback alone ([http] http_bind_address = "127.0.0.1"),
because they show UIDs, result summaries and the outbox. To turn them on, set
in the node's config file either

    [http]
    http_bind_address = "127.0.0.1"   # then open http://127.0.0.1:PORT/status on this machine

or

    [status]
    status_page = "on"

and restart the node. Actions (retry, purge, C-ECHO) also need
[http] http_username and http_password (with [tls] http_tls = true when the
port is reachable from other machines). DICOMweb STOW-RS (/studies and
/dicom-web/studies) works either way.
"""


#: Requests in flight at most, by default (``[http] http_max_concurrency``).
DEFAULT_MAX_CONCURRENCY = 16
#: Seconds a client is asked to wait (``Retry-After``) when every request slot is taken.
BUSY_RETRY_AFTER_S = 5


class HttpServerError(PacsAiError):
    """The HTTP server could not start (port in use, address not available, ...)."""


def create_app(
    intake: Intake,
    *,
    base_paths: Sequence[str] = DEFAULT_BASE_PATHS,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    credentials: tuple[str, str] | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> Starlette:
    """The node's HTTP application with the STOW-RS routes under each of ``base_paths``.

    ``max_part_bytes`` bounds one instance (a larger part fails with 0xA700;
    parts are streamed to the spool, not held in memory); ``max_request_bytes``
    bounds a request body (413). ``credentials`` (user, password) require HTTP
    basic authentication on every route. ``max_concurrency`` bounds the
    requests in flight (503 with ``Retry-After`` over it); ``idle_timeout_s``
    the wait for the next bytes of a STOW-RS body (408 after it). Other
    routes (status page, metrics) can be added to ``app.router``.
    """
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
        raise ValueError(f"max_concurrency: expected a number of requests >= 1, got {max_concurrency!r}")
    service, routes = stow_routes(intake, base_paths=base_paths, max_part_bytes=max_part_bytes,
                                  max_request_bytes=max_request_bytes, idle_timeout_s=idle_timeout_s)
    # The first is the outermost: a request over the limit costs no authentication work.
    middleware = [Middleware(ConcurrencyLimit, limit=max_concurrency)]
    if credentials:
        middleware.append(Middleware(BasicAuth, username=credentials[0], password=credentials[1]))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.stow = service
    return app


def metrics_route(metrics: NodeMetrics, path: str = "/metrics") -> Route:
    """A Starlette ``Route`` serving ``metrics`` at ``GET path`` (add it to the app's routes).

    The app's basic authentication, when configured, covers it too: give
    Prometheus the same credentials (``basic_auth`` in the scrape config).
    """
    from node.observe.metrics import NodeMetrics

    if not isinstance(metrics, NodeMetrics):
        raise TypeError(f"metrics: expected a NodeMetrics, got {type(metrics).__name__}")

    async def endpoint(request: Request) -> Response:
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    return Route(path, endpoint, methods=["GET"])


def status_hint_routes() -> list[BaseRoute]:
    """``GET /status`` (and below) and ``GET /``: a plain 404 page saying why the status pages are
    off and which config keys turn them on, for a node whose status pages are disabled."""

    async def hint(request: Request) -> Response:
        return PlainTextResponse(STATUS_DISABLED_TEXT, status_code=404)

    return [Route("/", hint, methods=["GET"]), Route("/status", hint, methods=["GET"]),
            Route("/status/{rest:path}", hint, methods=["GET"])]


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in flight; over it 503 with ``Retry-After``.

    Counted in the event loop's thread (ASGI calls are never concurrent in
    another thread), so no lock. uvicorn's own ``limit_concurrency`` answers
    503 without ``Retry-After`` and counts connections as well as requests.
    """

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_CONCURRENCY,
                 retry_after_s: int = BUSY_RETRY_AFTER_S) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit: expected a number of requests >= 1, got {limit!r}")
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            client = (scope.get("client") or ("?",))[0]
            LOG.warning("HTTP %s %s from %s refused (503): %d requests in flight, the limit "
                        "([http] http_max_concurrency)", scope.get("method"), scope.get("path"), client, self.limit)
            response = PlainTextResponse(f"busy: {self.limit} requests in flight; retry in {self.retry_after_s} s\n",
                                         status_code=503, headers={"Retry-After": str(self.retry_after_s)})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BasicAuth:
    """ASGI middleware: HTTP basic authentication (RFC 7617) on every request; 401 otherwise.

    The user name and password are compared as UTF-8 bytes (RFC 7617 2.1
    ``charset="UTF-8"``) in constant time; a header that is not valid base64,
    or has no colon, is wrong credentials (401), never an error.
    """

    def __init__(self, app: ASGIApp, username: str, password: str) -> None:
        if not username or not password:
            raise ValueError("basic authentication needs a user name and a password")
        self.app = app
        self.expected = f"{username}:{password}".encode()

    @staticmethod
    def credentials(header: bytes) -> bytes | None:
        """The decoded ``user:password`` bytes of a Basic Authorization header, or None when malformed."""
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded if b":" in decoded else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = self.credentials(header)
        # compare_digest on bytes: constant time for equal lengths, no TypeError on non-ASCII.
        if given is not None and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?",))[0]
        LOG.warning("HTTP %s %s from %s refused: %s", scope.get("method"), scope.get("path"), client,
                    "no credentials" if not header else "malformed credentials" if given is None
                    else "wrong credentials")
        response = PlainTextResponse("authentication required\n", status_code=401,
                                     headers={"WWW-Authenticate": 'Basic realm="pacs-ai-node"'})
        await response(scope, receive, send)


class HttpServer:
    """Runs an ASGI app with uvicorn in a background thread (``start``/``stop``).

    The socket is bound in :meth:`start`, so a port in use is an
    :class:`HttpServerError` there, not a log line in another thread. Port 0
    picks a free port; :attr:`port` is the one bound.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        graceful_timeout_s: float = 30.0,
        limit_concurrency: int | None = None,
        start_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port: {port!r} out of range 0-65535")
        if graceful_timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError("graceful_timeout_s and start_timeout_s must be > 0")
        if limit_concurrency is not None and limit_concurrency < 1:
            raise ValueError(f"limit_concurrency: must be >= 1 or None, got {limit_concurrency}")
        self.app = app
        self.host = host
        self.port = port
        self.graceful_timeout_s = graceful_timeout_s
        self.limit_concurrency = limit_concurrency
        self.start_timeout_s = start_timeout_s
        self.ssl_context = ssl_context
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise HttpServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        family, socktype, proto, _, address = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise HttpServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        """Bind, start serving in a thread, and return once the server accepts connections."""
        if self._thread is not None:
            raise HttpServerError("HTTP server already started")
        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the node configures logging
            access_log=False,  # one line per STOW request comes from node.stow
            lifespan="off",
            proxy_headers=False,  # the client address is the peer's, not an X-Forwarded-For header's
            timeout_graceful_shutdown=max(1, round(self.graceful_timeout_s)),
            limit_concurrency=self.limit_concurrency,
        )
        if self.ssl_context is not None:
            config.load()
            config.ssl = self.ssl_context  # TLS 1.2+ as the node configures it (uvicorn takes files only)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise HttpServerError(f"HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        LOG.debug("HTTP%s (STOW-RS) listening on %s:%d", "S" if self.ssl_context else "", self.host, self.port)

    def stop(self) -> None:
        """Stop accepting, let requests in progress finish (bounded), and return."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(self.graceful_timeout_s + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
            if self._thread.is_alive():
                LOG.warning("HTTP server thread did not stop in time")
        self._server = None
        self._thread = None


__all__ = ["BUSY_RETRY_AFTER_S", "DEFAULT_MAX_CONCURRENCY", "BasicAuth", "ConcurrencyLimit", "HttpServer",
           "HttpServerError", "create_app", "metrics_route", "status_hint_routes"]
