"""The OHIF viewer (npm ``@ohif/app``, its prebuilt ``dist/``) served next to Orthanc's DICOMweb.

OHIF is a static web app that talks DICOMweb (QIDO-RS, WADO-RS) from the
browser. Orthanc sends no CORS headers and wants a login, so the viewer and
the DICOMweb API are put on one origin: a small threaded HTTP server serves
``dist/`` (every unknown path gets ``index.html``, OHIF routes in the
browser) and forwards ``/dicom-web/...`` to Orthanc with its credentials.

``tests/run.sh`` unpacks the package into ``tests/.ohif/`` (``npm pack``);
``OHIF_DIST`` points elsewhere.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from support.processes import wait_for

if TYPE_CHECKING:  # selenium is imported only when a viewer test runs
    from selenium.webdriver import Chrome as WebDriver

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(os.environ.get("OHIF_DIST", Path(__file__).resolve().parents[1] / ".ohif" / "package" / "dist"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

#: Our app-config.js: one DICOMweb data source on the same origin, no
#: investigational-use pop-up (our objects carry their own research notice).
APP_CONFIG = {
    "routerBasename": "/",
    "extensions": [],
    "modes": [],
    "customizationService": {},
    "showStudyList": True,
    "maxNumberOfWebWorkers": 2,
    "showWarningMessageForCrossOrigin": False,
    "showCPUFallbackMessage": False,
    "showLoadingIndicator": True,
    "strictZSpacingForVolumeViewport": True,
    "investigationalUseDialog": {"option": "never"},
    "defaultDataSourceName": "orthanc",
    "dataSources": [{
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test PACS)",
            "name": "orthanc",
            "wadoUriRoot": "/dicom-web",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }],
}

#: Request headers passed on to Orthanc (the rest, cookies included, stay here).
_FORWARDED = ("Accept", "Content-Type", "Range")


class OhifServer:
    """Serve ``dist`` on 127.0.0.1 and proxy ``/dicom-web`` to ``dicomweb_root`` (with basic auth)."""

    def __init__(self, dist: Path, dicomweb_root: str, user: str, password: str) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build at {dist} (tests/run.sh installs @ohif/app {OHIF_VERSION})")
        self.dist = dist.resolve()
        self.upstream = dicomweb_root.rstrip("/")
        self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> OhifServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def _log(self, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((path, status))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        config_js = ("window.config = " + json.dumps(APP_CONFIG, indent=2) + ";\n").encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # the test keeps its own request log
                pass

            def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                server._log(self.path, status)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.startswith("/dicom-web/"):
                    self._proxy()
                elif self.path.split("?")[0] == "/app-config.js":
                    self._send(200, config_js, "application/javascript")
                else:
                    self._static()

            do_HEAD = do_GET

            def _proxy(self) -> None:
                headers = {key: self.headers[key] for key in _FORWARDED if self.headers.get(key)}
                headers["Authorization"] = server.authorization
                request = urllib.request.Request(server.upstream + self.path[len("/dicom-web"):], headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        body, status = response.read(), response.status
                        content_type = response.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as exc:
                    body, status = exc.read(), exc.code
                    content_type = exc.headers.get("Content-Type", "text/plain")
                self._send(status, body, content_type)

            def _static(self) -> None:
                relative = self.path.split("?")[0].split("#")[0].lstrip("/")
                target = (server.dist / relative).resolve()
                if not relative or not target.is_file() or server.dist not in target.parents:
                    target = server.dist / "index.html"  # a client-side route such as /viewer
                content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                if target.suffix == ".wasm":
                    content_type = "application/wasm"
                self._send(200, target.read_bytes(), content_type)

        return Handler


def chromium_driver(profile_parent: Path, size: tuple[int, int] = (1600, 1000)) -> WebDriver:
    """Headless Debian Chromium (software WebGL for the viewports) under selenium's chromedriver."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=profile_parent)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it is truthy; the TimeoutError names what the viewer failed to do."""
    return wait_for(predicate, timeout, interval=0.25, what=f"the viewer: {what}")


def have_viewer() -> str | None:
    """None when OHIF, Chromium and chromedriver are all installed, else what is missing."""
    missing = [str(p) for p in (OHIF_DIST / "index.html", CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    return ", ".join(missing) or None


def copy_screenshot(source: Path, target: Path) -> None:
    """Copy a screenshot to where a person looks for it (creating the folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
