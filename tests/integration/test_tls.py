"""TLS on the node's own ports: DICOM TLS (PS3.15 B.12) and HTTPS with basic authentication.

Certificates are made with the openssl command line (the ``pki`` fixture): a CA, the
node's server certificate (for 127.0.0.1) and a client certificate. The
peers are DCMTK storescu with ``+tls`` and curl.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from support.data import abdomen_files
from support.dcmtk import PEER_ENV, dcmtk
from support.processes import free_port, wait_for


@pytest.fixture
def tls_node(start_node, pki: Path, tmp_path: Path):  # noqa: ANN201
    tls_port = free_port()
    config = tmp_path / "tls.toml"
    config.write_text(
        "[http]\n"
        'http_username = "stow"\nhttp_password = "test-password-123"\n'
        "[tls]\n"
        f"tls_port = {tls_port}\n"
        f'tls_cert_file = "{pki / "server.crt"}"\ntls_key_file = "{pki / "server.key"}"\n'
        f'tls_ca_file = "{pki / "ca.crt"}"\ntls_require_client_cert = true\nhttp_tls = true\n'
    )
    node = start_node("--config", str(config), "--quiet-seconds", "60")
    wait_for(lambda: "listening as AINODE" in node.output() and "with TLS" in node.output(), 30,
             what="the TLS listener")
    node.tls_port = tls_port
    return node


def storescu_tls(port: int, files: list[Path], *tls_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "AINODE", *tls_args, "127.0.0.1", str(port),
         *map(str, files)],
        env=PEER_ENV, capture_output=True, text=True, timeout=120,
    )


def spooled(node, files: list[Path]) -> list[Path]:  # noqa: ANN001
    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        candidate = node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        if candidate.exists():
            out.append(candidate)
    return out


def test_dicom_tls_with_client_certificate(tls_node, pki: Path) -> None:
    files = abdomen_files()[:3]
    sent = storescu_tls(tls_node.tls_port, files, "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                        "+cf", str(pki / "ca.crt"))
    assert sent.returncode == 0, sent.stderr
    assert len(spooled(tls_node, files)) == 3
    assert "3 instances stored" in tls_node.output()


def test_dicom_tls_refuses_callers_without_a_certificate(tls_node, pki: Path) -> None:
    files = abdomen_files()[3:4]
    anonymous = storescu_tls(tls_node.tls_port, files, "+tla", "+cf", str(pki / "ca.crt"))
    assert anonymous.returncode != 0
    plain = storescu_tls(tls_node.tls_port, files)  # no TLS at all on the TLS port
    assert plain.returncode != 0
    assert spooled(tls_node, files) == []
    # The plain port keeps working next to the TLS one.
    assert storescu_tls(tls_node.port, files).returncode == 0
    assert len(spooled(tls_node, files)) == 1


def test_https_stow_needs_credentials(tls_node, pki: Path, tmp_path: Path) -> None:
    path = abdomen_files()[5]
    url = f"https://127.0.0.1:{tls_node.http_port}/dicom-web/studies"

    def curl(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "30", "-o", str(tmp_path / "out"), "-w", "%{http_code}",
             "--cacert", str(pki / "ca.crt"), "-H", "Content-Type: application/dicom",
             "--data-binary", f"@{path}", *extra, url],
            capture_output=True, text=True, timeout=60,
        )

    assert curl().stdout == "401"
    assert curl("-u", "stow:wrong").stdout == "401"
    assert spooled(tls_node, [path]) == []
    ok = curl("-u", "stow:test-password-123")
    assert ok.stdout == "200", ok.stderr
    assert len(json.loads((tmp_path / "out").read_text())["00081199"]["Value"]) == 1
    assert len(spooled(tls_node, [path])) == 1
    # Plain HTTP on the HTTPS port gets no answer it can use.
    plain = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                            url.replace("https:", "http:")], capture_output=True, text=True, timeout=30)
    assert plain.stdout != "200"
