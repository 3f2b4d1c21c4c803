"""A private Orthanc on free ports: the hospital PACS of the tests.

Also the PACS as an admin sets it up from ``deploy/orthanc/``: the shipped
example config and the Lua rule that routes stable CT series to the node.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from support.data import REPO
from support.dcmtk import PEER_ENV
from support.processes import free_port, stop_process, wait_for

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DEPLOY = REPO / "deploy" / "orthanc"
ROUTING_SCRIPT = DEPLOY / "route-ct-to-ainode.lua"
EXAMPLE_CONFIG = DEPLOY / "orthanc-example.json"
#: The node's alias in Orthanc's DicomModalities (NODE_MODALITY in the shipped script).
NODE_ALIAS = "ainode"


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
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / "orthanc.log"

    def private_config(self) -> dict[str, object]:
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

    def config(self) -> dict[str, object]:
        """The whole Orthanc configuration file's content."""
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
        """Write the config, start Orthanc and wait (bounded) for its REST API."""
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.proc = subprocess.Popen(
            [str(ORTHANC_BIN), str(config_path)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            env=PEER_ENV,
        )
        wait_for(self._ready, 30, what="Orthanc REST API")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log: {self.log.read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        """Stop Orthanc by its PID (its storage stays, so it can start again)."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> bytes:
        """One authenticated REST call; returns the response body."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers={"Authorization": f"Basic {token}", **(headers or {})},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            content: bytes = response.read()
        return content

    def get(self, path: str) -> Any:  # JSON of whatever shape the resource has
        """GET a REST resource as JSON."""
        return json.loads(self.request("GET", path))

    def series_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the series Orthanc lists for a study (DICOM JSON, PS3.18 F.2)."""
        try:
            found: list[dict[str, Any]] = json.loads(
                self.request("GET", f"/dicom-web/studies/{study_uid}/series") or b"[]")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        return found


def example_config() -> dict[str, object]:
    """The shipped example as Orthanc reads it (JsonCpp accepts comments; json does not)."""
    text = re.sub(r"/\*.*?\*/", "", EXAMPLE_CONFIG.read_text(), flags=re.S)
    text = re.sub(r"^\s*//.*$", "", text, flags=re.M)
    config: dict[str, object] = json.loads(text)
    return config


@dataclass
class RoutingOrthanc(Orthanc):
    """The PACS with the example config and the shipped routing rule."""

    modality_aet: str = "MODALITY"

    def config(self) -> dict[str, object]:
        config = example_config()
        config.update({
            "Name": "test-pacs-routing",
            **self.private_config(),
            "DicomCheckCalledAet": True,
            # The example keeps DicomAlwaysAllowStore false: the modality and
            # the node are both declared, as an admin would do.
            "DicomModalities": {
                NODE_ALIAS: ["AINODE", "127.0.0.1", self.node_port],
                "ct-scanner": [self.modality_aet, "127.0.0.1", 104],
            },
            "StableAge": 2,
            "LuaScripts": [str(ROUTING_SCRIPT)],
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        })
        return config

    def log_text(self) -> str:
        """Orthanc's log so far (the Lua rule logs there)."""
        return self.log.read_text(errors="replace")


PacsT = TypeVar("PacsT", bound=Orthanc)


def running_orthanc(kind: type[PacsT], tmp_path: Path, aet: str) -> Iterator[PacsT]:
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
