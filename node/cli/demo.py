"""``pacs-ai-node demo``: the first five minutes, one phantom CT through a running node.

    pacs-ai-node demo [--to AET@HOST:PORT] [--http-url URL] [--timeout S] [--config FILE] [--data-dir DIR]

Renders a small synthetic chest CT (``pipelines.offline.phantom``: no patient data), checks
that the node answers a C-ECHO, sends the slices by C-STORE, waits for the node to process the
series and prints what came out: the findings summary, the result files (SEG, SR, key images)
and the series' status page. The wait reads the node's state database when the node runs on
this machine with the same config (``--config`` or ``--data-dir``), else its status page
(``--http-url``, default the configured HTTP port on the target host).
"""

from __future__ import annotations

import argparse
import html
import ipaddress
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from node.cli.arguments import seconds_within
from node.config import Destination, NodeConfig, load_config
from pipelines.errors import PacsAiError

#: The phantom's seed: the same anatomy every run (its series UID is new each run).
DEMO_SEED = 20261208
#: Calling AE title of the demo's associations (a site with ``allowed_calling_ae_titles``
#: lists it, or the demo is run with ``--calling-ae``).
DEMO_CALLING_AE = "PACSAIDEMO"
DEFAULT_TIMEOUT_S = 300.0
#: Series states after which the node does nothing more with a series (node.store.state).
FINAL_STATES = ("done", "rejected", "failed")
#: States a series goes through once its last instance is in, for the progress bar.
_WAIT_STEPS = ("receiving", "queued", "processing")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The parser class of the command line's subcommands (``node.cli.main.CommandParser``).
_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


class DemoError(PacsAiError):
    """The demo cannot go on: no node answers, a C-STORE failed, no result in time (the message says which)."""


class Progress(Protocol):
    """The part of a tqdm bar the demo uses."""

    def update(self, n: float | None = 1) -> bool | None: ...

    def set_description(self, desc: str | None = None, refresh: bool | None = True) -> None: ...


@dataclass(frozen=True)
class SeriesOutcome:
    """What the node reports about the demo series: its state, summary (or reason) and result files."""

    state: str
    summary: str = ""
    #: (modality, path) of each result object of the last version.
    results: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def add_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    """Add ``demo`` to the ``pacs-ai-node`` subcommands."""
    demo = sub.add_parser("demo", help="send a phantom chest CT to a running node and show what comes back")
    demo.add_argument("--to", metavar="AET@HOST:PORT",
                      help="the node to send to (default: the configured AE title on 127.0.0.1, the configured port)")
    demo.add_argument("--http-url", metavar="URL",
                      help="the node's HTTP base URL, for its status pages (default: http(s)://HOST:http_port); "
                           "polled for the result when the node's state database is not on this machine")
    demo.add_argument("--timeout", type=seconds_within(86400), default=DEFAULT_TIMEOUT_S, metavar="S",
                      help=f"seconds to wait for the result (default {DEFAULT_TIMEOUT_S:.0f})")
    demo.add_argument("--calling-ae", default=DEMO_CALLING_AE, help=f"calling AE title (default {DEMO_CALLING_AE})")
    demo.add_argument("--config", type=Path, help="the node's TOML config file (AE title, ports, data_dir)")
    demo.add_argument("--data-dir", help="the node's data dir, where its state database is (default: the config's)")
    demo.set_defaults(func=cmd_demo)


def demo_target(config: NodeConfig, to: str | None) -> Destination:
    """The node to send to: ``--to``, else the configured AE title and port on 127.0.0.1."""
    if to:
        return Destination.parse(to, "--to")
    return Destination(ae_title=config.ae_title, host="127.0.0.1", port=config.port)


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def status_base_url(config: NodeConfig, target: Destination, http_url: str | None) -> str:
    """The node's HTTP base URL: ``--http-url``, else the configured HTTP port on the target host."""
    if http_url:
        return http_url.rstrip("/")
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{'https' if config.http_tls else 'http'}://{host}:{config.http_port}"


def write_phantom_series(folder: Path) -> list[Path]:
    """A small chest CT phantom (64 slices of 256 x 256, 5 mm) with one lung nodule, as CT Image files.

    The study UID is derived from :data:`DEMO_SEED`; the series UID is new on every call, so each
    demo run is a new series at the node rather than a new version of the previous run's.
    """
    from pydicom.uid import generate_uid

    # imported here: the offline phantom generator is only for this command (tests/unit/test_layout.py)
    from pipelines.offline.phantom import (
        Grid,
        render,
        sample_phantom,
        write_dicom_series,
    )

    phantom = sample_phantom(DEMO_SEED, coverage="chest", noise_sigma=10.0, lesion_probability=0.0,
                             lung_nodules=1, slice_thickness_mm=5.0)
    grid = Grid.chest_ct(pixel_mm=1.5, slice_mm=5.0, rows=256, phantom=phantom)
    return write_dicom_series(render(phantom, grid), grid, folder, series_uid=str(generate_uid()),
                              patient_name="DEMO^PHANTOM", patient_id="PACSAIDEMO")


def send_series(files: list[Path], target: Destination, calling_ae: str, timeout: float,
                progress: Callable[[], object]) -> None:
    """C-STORE ``files`` (CT Image Storage, Explicit VR Little Endian) to ``target`` in one association;
    ``progress()`` is called after each (what it returns is ignored)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(_CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise DemoError(f"{target}: the node answered the C-ECHO but refused the storage association "
                        f"(calling AE title {calling_ae!r} not allowed? see [node] allowed_calling_ae_titles)")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is None:
                raise DemoError(f"{target}: no C-STORE response for {path.name} (association aborted or timed out)")
            if code != 0x0000:
                raise DemoError(f"{target}: C-STORE of {path.name} answered status 0x{code:04X}")
            progress()
    finally:
        if assoc.is_established:
            assoc.release()


def outcome_from_state(state_path: Path, series_uid: str) -> SeriesOutcome | None:
    """The series as the node's state database has it; None while the node has not recorded it."""
    from node.store.state import StateStore

    store = StateStore(state_path)
    try:
        row = store.get_series(series_uid)
    finally:
        store.close()
    if row is None:
        return None
    results: list[tuple[str, str]] = []
    if row.results:
        items = json.loads(row.results)
        results = [(str(i.get("modality", "?")), str(i.get("path", "?"))) for i in items if isinstance(i, dict)]
    return SeriesOutcome(row.state, row.reason or "", tuple(results))


_STATE_RE = re.compile(r"<dt>state</dt>\s*<dd>(.*?)</dd>", re.DOTALL)
_SUMMARY_RE = re.compile(r"<dt>reason / result</dt>\s*<dd>(.*?)</dd>", re.DOTALL)
_RESULT_RE = re.compile(r"<tr><td>([A-Z]+)</td><td class=\"uid\">(.*?)</td></tr>")
_TAG_RE = re.compile(r"<[^>]+>")


def outcome_from_status_page(page: str) -> SeriesOutcome:
    """The series as its status page (``/status/series/UID``, node/http/templates/series.html) shows it."""

    def text(match: re.Match[str] | None) -> str:
        return html.unescape(_TAG_RE.sub("", match.group(1))).strip() if match else ""

    state = text(_STATE_RE.search(page)).lower()
    summary = text(_SUMMARY_RE.search(page))
    results = tuple((m.group(1), html.unescape(m.group(2))) for m in _RESULT_RE.finditer(page))
    return SeriesOutcome(state, "" if summary == "—" else summary, results)


def _status_page_reader(config: NodeConfig, url: str) -> Callable[[], SeriesOutcome | None]:
    import requests

    auth = (config.http_username, config.http_password) if config.http_username else None

    def read() -> SeriesOutcome | None:
        try:
            response = requests.get(url, auth=auth, timeout=10, verify=not config.http_tls)
        except requests.RequestException as exc:
            raise DemoError(f"status page {url}: {exc} "
                            "(give --http-url, or --config / --data-dir with the node's data dir)") from exc
        if response.status_code == 404 and "Series not found" in response.text:
            return None
        if response.status_code != 200:
            raise DemoError(f"status page {url}: HTTP {response.status_code} (status pages off? [status] status_page; "
                            "or give --config with the node's data_dir)")
        return outcome_from_status_page(response.text)

    return read


def wait_for_outcome(read: Callable[[], SeriesOutcome | None], timeout: float, bar: Progress) -> SeriesOutcome:
    """Poll ``read`` until the series reaches a final state; DemoError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen = 0
    outcome: SeriesOutcome | None = None
    while time.monotonic() < deadline:
        outcome = read()
        if outcome is not None:
            step = _WAIT_STEPS.index(outcome.state) + 1 if outcome.state in _WAIT_STEPS else len(_WAIT_STEPS)
            if step > seen:
                bar.update(step - seen)
                seen = step
            bar.set_description(outcome.state)
            if outcome.final:
                return outcome
        time.sleep(0.25)
    where = f"still {outcome.state}" if outcome else "not recorded by the node"
    raise DemoError(f"no result after {timeout:.0f} s: the series is {where} (a longer --timeout? the node's log?)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Send a phantom CT to a running node and print its findings, result files and status page."""
    try:
        return _run_demo(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.send.probe import echo_destination

    config = load_config(args.config)
    if args.data_dir:
        config = config.with_overrides(data_dir=Path(args.data_dir))
    target = demo_target(config, args.to)
    timeout = min(args.timeout, 60.0)
    echo = echo_destination(target, config.with_overrides(ae_title=args.calling_ae), timeout,
                            connect_timeout=min(timeout, 10.0))
    if echo.status is None:
        print(f"error: no DICOM node answers at {target}: {echo.error or echo.result}\n"
              f"  start one with `pacs-ai-node serve` (same --config), or name it with --to AET@HOST:PORT",
              file=sys.stderr)
        return 1
    base_url = status_base_url(config, target, args.http_url)
    # the state database answers even where the status pages are off (their default off loopback)
    local = _is_local(target.host) and config.state_path.exists()
    with tempfile.TemporaryDirectory(prefix="pacs-ai-node-demo-") as folder:
        print("rendering a phantom chest CT (synthetic, no patient data)...", file=sys.stderr)
        files = write_phantom_series(Path(folder))
        import pydicom

        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        started = time.monotonic()
        with tqdm(total=len(files) + len(_WAIT_STEPS), unit="step", disable=None, file=sys.stderr) as bar:
            bar.set_description("C-STORE")
            send_series(files, target, args.calling_ae, timeout, lambda: bar.update(1))
            sent_s = time.monotonic() - started
            read = ((lambda: outcome_from_state(config.state_path, series_uid)) if local
                    else _status_page_reader(config, f"{base_url}/status/series/{series_uid}"))
            outcome = wait_for_outcome(read, args.timeout, bar)
    total_s = time.monotonic() - started
    print(f"sent {len(files)} CT slices to {target} in {sent_s:.1f} s (C-ECHO {echo.rtt_ms or 0.0:.1f} ms)")
    print(f"series {series_uid}: {outcome.state} after {total_s:.1f} s")
    if outcome.summary:
        print("answers:" if outcome.state == "done" else "reason:")
        for answer in outcome.summary.split("; "):
            print(f"  {answer}")
    if outcome.results:
        print("result files:")
    for modality, path in outcome.results:
        # the Secondary Capture key images have Modality OT; say what they are
        print(f"  {'SC' if modality == 'OT' else modality:<4} {path}")
    note = "" if not local or config.status_page_enabled else "  (status pages are off: [status] status_page)"
    print(f"status page: {base_url}/status/series/{series_uid}{note}")
    return 0 if outcome.state == "done" else 1


__all__ = [
    "DemoError", "SeriesOutcome", "add_parser", "cmd_demo", "demo_target", "outcome_from_state",
    "outcome_from_status_page", "send_series", "status_base_url", "wait_for_outcome", "write_phantom_series",
]
