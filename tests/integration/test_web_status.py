"""The admin's status pages (``node.http.status``), served by uvicorn on loopback.

A real StateStore filled through its own methods (instances received, a
series processed with results queued, one item delivered, one dead), the
pages fetched over HTTP with ``requests``, and once in headless Chromium
(Debian's chromium + chromedriver, driven by selenium) to see the page and
press its retry button.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.config import Destination, NodeConfig
from node.http.server import BasicAuth, HttpServer
from node.http.status import describe_bundle, status_routes
from node.send.probe import PeerResult, peer_text
from node.store.header import InstanceHeader
from node.store.state import DEAD, DONE, FAILED, PENDING, REJECTED, SENT, StateStore
from support.processes import free_port

REPO = Path(__file__).resolve().parent.parent.parent
OUTPUT = Path(__file__).resolve().parent.parent / "output"
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"
STUDY = "1.2.826.0.1.3680043.8.498.1"
DONE_SERIES = "1.2.826.0.1.3680043.8.498.20618380718132701474776061857022813903"
REJECTED_SERIES = "1.2.826.0.1.3680043.8.498.31"
FAILED_SERIES = "1.2.826.0.1.3680043.8.498.41"
RECEIVING_SERIES = "1.2.826.0.1.3680043.8.498.51"
SUMMARY = "Body 25270.5 cm3, mean -74 HU; Lungs 81.6 cm3, mean -895 HU"
REJECTION = "missing slices: gap of 6.00 mm between slices 50 and 51 where the spacing is 3.00 mm"
HOSTILE = "internal error: ValueError: <script>alert('x')</script> & more"
USER, PASSWORD = "admin", "status-test-password"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def receive(store: StateStore, series: str, count: int, association: str) -> None:
    """Record ``count`` axial slices 3 mm apart, as the intake does, through one association."""
    for i in range(count):
        header = InstanceHeader(study_uid=STUDY, series_uid=series, sop_instance_uid=f"{series}.{i + 1}",
                                sop_class_uid=CT, position=3.0 * i, orientation=AXIAL,
                                images_in_acquisition=None, number_of_frames=None)
        store.record_instance(header, path=f"/var/spool/{STUDY}/{series}/{i + 1}.dcm", size=1000,
                              calling_ae="MODALITY", association=association)


def fill(store: StateStore) -> dict[str, int]:
    """A processed series with results for two destinations (one SEG sent, one SR dead), a rejected,
    a failed and a receiving series. Returns the outbox ids by name."""
    receive(store, DONE_SERIES, 12, "assoc-1")
    assert store.complete_released("assoc-1")
    claimed = store.claim_next_series()
    assert claimed is not None and claimed.series_uid == DONE_SERIES
    seg_uid, sr_uid = "2.25.1451", "2.25.2755"
    seg_path, sr_path = f"/var/results/{STUDY}/seg/{seg_uid}.dcm", f"/var/results/{STUDY}/sr/{sr_uid}.dcm"
    store.record_results(DONE_SERIES, 1,
                         json.dumps([{"modality": "SEG", "path": seg_path}, {"modality": "SR", "path": sr_path}]),
                         [(seg_uid, SEG, seg_path, ["pacs", "web"]), (sr_uid, SR, sr_path, ["pacs"])])
    assert store.finish_series(DONE_SERIES, DONE, SUMMARY, claimed.updated_at) == DONE
    items = {(r.sop_instance_uid, r.destination): r.id for r in store.due_outbox()}
    store.mark_sent(items[(seg_uid, "pacs")], "0x0000")
    store.mark_dead(items[(sr_uid, "pacs")], "0xA700", "refused: out of resources")

    for series, association, state, reason in ((REJECTED_SERIES, "assoc-2", REJECTED, REJECTION),
                                                (FAILED_SERIES, "assoc-3", FAILED, HOSTILE)):
        receive(store, series, 12, association)
        store.complete_released(association)
        claimed = store.claim_next_series()
        assert claimed is not None and claimed.series_uid == series
        store.finish_series(series, state, reason, claimed.updated_at)
    receive(store, RECEIVING_SERIES, 3, "assoc-4")
    return {"seg_pacs": items[(seg_uid, "pacs")], "sr_pacs": items[(sr_uid, "pacs")],
            "seg_web": items[(seg_uid, "web")]}


@dataclass
class StatusNode:
    """The status routes of one node, served on loopback, with what the injected callables saw."""

    url: str
    store: StateStore
    ids: dict[str, int]
    config: NodeConfig
    echoed: list[Destination] = field(default_factory=list)
    audited: list[tuple[str, dict]] = field(default_factory=list)

    def get(self, path: str, **kwargs) -> requests.Response:  # noqa: ANN003
        return requests.get(self.url + path, auth=(USER, PASSWORD), timeout=10, **kwargs)

    def post(self, path: str, data: dict, **kwargs) -> requests.Response:  # noqa: ANN003
        headers = {"Origin": self.url, **kwargs.pop("headers", {})}
        return requests.post(self.url + path, data=data, auth=kwargs.pop("auth", (USER, PASSWORD)),
                             headers=headers, allow_redirects=False, timeout=10, **kwargs)

    def token(self) -> str:
        page = self.get("/status/outbox").text
        marker = 'name="csrf_token" value="'
        start = page.index(marker) + len(marker)
        return page[start:page.index('"', start)]

    def outbox_state(self, name: str) -> str:
        return self.store.outbox_items([self.ids[name]])[0].state


def serve(app: Starlette, port: int = 0) -> HttpServer:
    server = HttpServer(app, "127.0.0.1", port, graceful_timeout_s=1.0)
    server.start()
    return server


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator:
    """``make_node(credentials=True, dicomweb_url=...)``: a filled store and its status pages on loopback."""
    servers: list[HttpServer] = []
    stores: list[StateStore] = []

    def make(credentials: bool = True, dicomweb_url: str = "http://127.0.0.1:9/dicom-web",
             middleware: bool = True) -> StatusNode:
        data_dir = tmp_path / f"node-{len(stores)}"
        (data_dir / "spool" / STUDY).mkdir(parents=True)
        (data_dir / "spool" / STUDY / "1.dcm").write_bytes(b"\0" * 4096)
        store = StateStore(data_dir / "state.sqlite3")
        stores.append(store)
        ids = fill(store)
        destinations = (
            Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=4343, results=("SEG", "SR")),
            Destination(name="web", kind="dicomweb", url=dicomweb_url, username="qido", password="qido-secret",
                        results=("SEG",)),
        )
        config = NodeConfig(data_dir=data_dir, destinations=destinations,
                            http_username=USER if credentials else "", http_password=PASSWORD if credentials else "")
        node = StatusNode("", store, ids, config)

        def echo(destination: Destination) -> PeerResult:
            node.echoed.append(destination)
            return PeerResult(destination, True, "C-ECHO 0x0000", 2.1, status=0, setup_ms=12.3)

        bundles = [{"id": "body-lungs", "version": "2.0.0", "name": "Body and lungs", "key": "body-lungs@2.0.0+6bf6",
                    "artifacts": [{"id": "body_lungs", "file": "body_lungs.onnx", "provider": "CPUExecutionProvider"}],
                    "stages": ["body-lungs"], "segments": 2}]
        routes = status_routes(store, config, models=lambda: bundles, echo=echo,
                               audit=lambda event, detail: node.audited.append((event, detail)))
        stack = [Middleware(BasicAuth, username=USER, password=PASSWORD)] if credentials and middleware else []
        server = serve(Starlette(routes=routes, middleware=stack), free_port())
        servers.append(server)
        node.url = f"http://127.0.0.1:{server.port}"
        return node

    yield make
    for server in servers:
        server.stop()
    for store in stores:
        store.close()


def test_pages_show_series_outbox_peers_models_and_escape_everything(make_node) -> None:  # noqa: ANN001
    node = make_node()
    overview = node.get("/status")
    assert overview.status_code == 200
    assert overview.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in overview.headers["content-security-policy"]
    page = overview.text
    for text in (DONE_SERIES, SUMMARY, REJECTED_SERIES, REJECTION, RECEIVING_SERIES, "not eligible",
                 "eligible, processed", "sender released the association, gap-free run of 12 slices",
                 "4.0 KiB in 1 file<"):
        assert text in page, text
    # Hostile text from the database is shown, escaped, never as markup.
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in page
    assert "PatientName" not in page and "Patient" not in page.replace("patient names", "")
    for path in ("/status", "/status/outbox", "/status/peers", "/status/models", f"/status/series/{DONE_SERIES}"):
        response = node.get(path)
        assert response.status_code == 200, path
        assert '<a href="/status/outbox"' in response.text and "<nav>" in response.text, path

    outbox = node.get("/status/outbox").text
    assert "refused: out of resources" in outbox and "0xA700" in outbox
    assert "Retry 1 dead item(s)" in outbox and "Comprehensive 3D SR" in outbox
    assert "Purge sent items" in outbox
    dead_only = node.get("/status/outbox", params={"state": "dead"}).text
    assert "0xA700" in dead_only and "0x0000" not in dead_only

    peers = node.get("/status/peers").text
    assert "PACS@127.0.0.1:4343" in peers and "http://127.0.0.1:9/dicom-web" in peers
    assert "basic, user qido" in peers and "qido-secret" not in peers
    assert "C-ECHO" in peers and ">check<" in peers

    models = node.get("/status/models").text
    for text in ("body-lungs", "2.0.0", "body-lungs@2.0.0+6bf6", "CPUExecutionProvider", "body_lungs.onnx"):
        assert text in models

    detail = node.get(f"/status/series/{DONE_SERIES}").text
    for text in (SUMMARY, STUDY, "/var/results/", "2.25.1451", "2.25.2755", "refused: out of resources", "web"):
        assert text in detail
    assert node.get("/status/series/1.2.3.4").status_code == 404
    assert node.get("/status/series/<b>x</b>").status_code == 404


def test_actions_are_refused_without_configured_credentials(make_node) -> None:  # noqa: ANN001
    node = make_node(credentials=False)
    page = requests.get(node.url + "/status/outbox", timeout=10)
    assert page.status_code == 200 and "Actions are disabled" in page.text and "disabled" in page.text
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    refused = requests.post(node.url + "/status/outbox/retry", data={"destination": "pacs", "csrf_token": token},
                            headers={"Origin": node.url}, allow_redirects=False, timeout=10)
    assert refused.status_code == 403
    assert "http_username" in refused.text and "[http]" in refused.text
    assert node.outbox_state("sr_pacs") == DEAD
    assert node.audited == []


def test_actions_need_credentials_token_and_same_origin(make_node) -> None:  # noqa: ANN001
    node = make_node()
    token = node.token()
    retry = {"destination": "pacs", "csrf_token": token}
    assert node.post("/status/outbox/retry", retry, auth=None).status_code == 401
    assert node.post("/status/outbox/retry", retry, auth=(USER, "wrong")).status_code == 401
    missing = node.post("/status/outbox/retry", {"destination": "pacs"})
    assert missing.status_code == 403 and "Form expired" in missing.text
    forged = node.post("/status/outbox/retry", {**retry, "csrf_token": "0" * 64})
    assert forged.status_code == 403
    cross_site = node.post("/status/outbox/retry", retry, headers={"Origin": "http://evil.example"})
    assert cross_site.status_code == 403 and "another site" in cross_site.text
    referer = node.post("/status/outbox/retry", retry, headers={"Origin": None, "Referer": "http://evil.example/x"})
    assert referer.status_code == 403
    assert node.outbox_state("sr_pacs") == DEAD and node.audited == []
    # A flash message that this process did not sign is not shown.
    assert "phish" not in node.get("/status/outbox", params={"flash": "phish", "kind": "ok", "sig": "x"}).text

    # Routes mounted without the app's BasicAuth still check the credentials on actions.
    bare = make_node(middleware=False)
    assert requests.get(bare.url + "/status", timeout=10).status_code == 200
    assert bare.post("/status/outbox/retry", {"destination": "pacs", "csrf_token": bare.token()},
                     auth=None).status_code == 401
    assert bare.outbox_state("sr_pacs") == DEAD


def test_retry_makes_dead_items_pending_and_purge_removes_sent_ones(make_node) -> None:  # noqa: ANN001
    node = make_node()
    token = node.token()
    done = node.post("/status/outbox/retry", {"destination": "pacs", "csrf_token": token})
    assert done.status_code == 303 and done.headers["location"].startswith("/status/outbox?flash=")
    after = node.get(done.headers["location"]).text
    assert "Retry: 1 item(s) of pacs are pending and due now" in after
    row = node.store.outbox_items([node.ids["sr_pacs"]])[0]
    assert (row.state, row.attempts, row.dead_at) == (PENDING, 0, None)
    assert node.audited[-1] == ("admin action", {
        "action": "outbox retry", "destination": "pacs", "ids": [], "retried": [node.ids["sr_pacs"]],
        "user": USER, "client": "127.0.0.1"})
    nothing = node.post("/status/outbox/retry", {"destination": "pacs", "csrf_token": token})
    assert "Nothing+to+retry" in nothing.headers["location"]

    # By id, from the series page: back to the series page.
    node.store.mark_dead(node.ids["sr_pacs"], "0xA700", "refused again")
    back = f"/status/series/{DONE_SERIES}"
    by_id = node.post("/status/outbox/retry", {"ids": str(node.ids["sr_pacs"]), "back": back, "csrf_token": token})
    assert by_id.headers["location"].startswith(back + "?") and node.outbox_state("sr_pacs") == PENDING
    elsewhere = node.post("/status/outbox/retry", {"ids": "1", "back": "https://evil.example/", "csrf_token": token})
    assert elsewhere.headers["location"].startswith("/status/outbox?")

    keep = node.post("/status/outbox/purge", {"days": "30", "csrf_token": token})
    assert "0+sent+item" in keep.headers["location"] and node.outbox_state("seg_pacs") == SENT
    bad = node.post("/status/outbox/purge", {"days": "-1", "csrf_token": token})
    assert "kind=error" in bad.headers["location"]
    purged = node.post("/status/outbox/purge", {"days": "0", "destination": "pacs", "csrf_token": token})
    assert "1 sent item(s) of pacs" in node.get(purged.headers["location"]).text
    assert node.store.outbox_items([node.ids["seg_pacs"]]) == []
    assert {r.state for r in node.store.list_outbox()} == {PENDING}
    assert node.audited[-1][1]["action"] == "outbox purge" and node.audited[-1][1]["purged"] == 1


def test_peer_checks_echo_dicom_and_query_dicomweb(make_node) -> None:  # noqa: ANN001
    seen: list[str] = []

    async def qido(request: Request) -> Response:
        seen.append(f"{request.url.path}?{request.url.query} {request.headers.get('authorization')}")
        expected = "Basic " + base64.b64encode(b"qido:qido-secret").decode()
        if request.headers.get("authorization") != expected:
            return Response(status_code=401)
        return JSONResponse([{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}}],
                            media_type="application/dicom+json")

    pacs_port = free_port()
    pacs = serve(Starlette(routes=[Route("/dicom-web/studies", qido)]), pacs_port)
    try:
        node = make_node(dicomweb_url=f"http://127.0.0.1:{pacs_port}/dicom-web")
        token = node.token()
        echoed = node.post("/status/peers/test", {"destination": "pacs", "csrf_token": token})
        assert echoed.status_code == 303
        page = node.get(echoed.headers["location"]).text
        assert "pacs: C-ECHO 0x0000, round trip 2.1 ms" in page
        assert [str(d) for d in node.echoed] == ["pacs"]
        checked = node.post("/status/peers/test", {"destination": "web", "csrf_token": token})
        page = node.get(checked.headers["location"]).text
        assert "web: QIDO-RS HTTP 200, round trip" in page and "Doe^Jane" not in page
        assert seen == ["/dicom-web/studies?limit=1 Basic " + base64.b64encode(b"qido:qido-secret").decode()]
        assert [d["destination"] for _, d in node.audited] == ["pacs", "web"]
        unknown = node.post("/status/peers/test", {"destination": "nowhere", "csrf_token": token})
        assert "kind=error" in unknown.headers["location"]
    finally:
        pacs.stop()


def test_disabled_status_pages_say_why_and_how_to_turn_them_on(tmp_path: Path) -> None:
    """A node whose status pages are off (HTTP not on loopback, status_page = "auto") answers
    /status and / with a plain 404 naming the config keys, not a bare "Not Found"."""
    from starlette.testclient import TestClient

    from node.http.server import create_app, status_hint_routes
    from node.receive.intake import Intake
    from node.store.spool import Spool

    config = NodeConfig(data_dir=tmp_path, http_bind_address="0.0.0.0")
    assert not config.status_page_enabled
    store = StateStore(config.state_path)
    try:
        app = create_app(Intake(config, Spool(config.spool_dir), store))
        app.router.routes.extend(status_hint_routes())
        with TestClient(app) as client:
            for path in ("/status", "/", "/status/outbox"):
                page = client.get(path)
                assert page.status_code == 404 and page.headers["content-type"].startswith("text/plain")
                for key in ("status_page", "http_bind_address", "http_username"):
                    assert key in page.text
            assert client.post("/studies", content=b"", headers={"Content-Type": "text/plain"}).status_code == 415
    finally:
        store.close()


def test_describe_bundle_and_patient_names_stay_off(tmp_path: Path) -> None:
    from pipelines.model.bundle import ModelBundle

    bundle = ModelBundle(REPO / "onnx_models" / "body-lungs", verify_only=True)
    described = describe_bundle(bundle)
    assert described["key"] == bundle.key and described["segments"] == len(bundle.manifest.segments)
    assert described["artifacts"][0]["provider"] is None
    store = StateStore(tmp_path / "state.sqlite3")
    try:
        with pytest.raises(ValueError, match="show_patient_names"):
            status_routes(store, NodeConfig(data_dir=tmp_path), show_patient_names=True)
        with pytest.raises(TypeError, match="echo"):
            status_routes(store, NodeConfig(data_dir=tmp_path), echo="not callable")  # type: ignore[arg-type]
    finally:
        store.close()


def test_browser_shows_the_series_and_retries_the_dead_item(make_node, tmp_path: Path) -> None:  # noqa: ANN001
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By

    node = make_node()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1500,1000", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(20)
        # Credentials in the URL: Chromium answers the basic-auth challenge with them and
        # reuses them for the form POST to the same origin.
        authority = node.url.replace("http://", f"http://{USER}:{PASSWORD}@")
        driver.get(authority + "/status")
        link = driver.find_element(By.LINK_TEXT, DONE_SERIES)
        row = link.find_element(By.XPATH, "./ancestor::tr")
        assert SUMMARY in row.text and "done" in row.text
        OUTPUT.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(tmp_path / "status-page.png"))
        shutil.copyfile(tmp_path / "status-page.png", OUTPUT / "status-page.png")

        driver.get(node.url + "/status/outbox")
        dead = node.ids["sr_pacs"]
        driver.find_element(By.XPATH, f"//form[input[@name='ids' and @value='{dead}']]/button").click()
        deadline = time.monotonic() + 10
        while "flash=" not in driver.current_url and time.monotonic() < deadline:
            time.sleep(0.05)
        flash = driver.find_element(By.CSS_SELECTOR, ".flash.ok").text
        assert f"Retry: 1 item(s) are pending and due now (ids {dead})" in flash
        assert node.outbox_state("sr_pacs") == PENDING
        driver.save_screenshot(str(OUTPUT / "status-outbox-after-retry.png"))
    finally:
        driver.quit()


def test_default_peer_check_is_the_peers_test_echo(start_node, tmp_path: Path) -> None:
    """Without an injected echo the page uses `peers test`'s C-ECHO (TLS-capable, says why it failed)."""
    from node.http.status import StatusPages

    node = start_node()
    dead = free_port()
    config = NodeConfig(data_dir=tmp_path / "d", send_connect_timeout_s=5.0,
                        destinations=(Destination.parse(f"AINODE@127.0.0.1:{node.port}"),
                                      Destination.parse(f"NOBODY@127.0.0.1:{dead}")))
    pages = StatusPages(StateStore(config.state_path), config)
    answered = pages._sender_echo(config.destinations[0])
    assert answered.ok and "0x0000" in peer_text(answered) and "round trip" in peer_text(answered)
    refused = pages._sender_echo(config.destinations[1])
    assert not refused.ok and "refused" in peer_text(refused).lower()
