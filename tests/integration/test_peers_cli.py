"""``pacs-ai-node peers test`` against real peers: Orthanc (C-ECHO and an authenticated QIDO-RS),
the node's own DICOM TLS port (C-ECHO with a client certificate), and peers that are down or refuse.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from support.cli import cli, write_config
from support.node import StartNode
from support.orthanc import Orthanc
from support.processes import free_port

PASSWORD_VARIABLE = "PACS_AI_NODE_TEST_QIDO_PASSWORD"


def peers_config(tmp_path: Path, orthanc: Orthanc, *extra: str, password_variable: str = PASSWORD_VARIABLE) -> Path:
    web = f"http://127.0.0.1:{orthanc.http_port}/dicom-web"
    return write_config(tmp_path, "\n".join([
        "[send]",
        "send_connect_timeout_s = 30.0",  # peers test uses --timeout, not these
        "[[send.destinations]]",
        f'name = "pacs"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}',
        "[[send.destinations]]",
        f'name = "web"\nkind = "dicomweb"\nurl = "{web}"\nusername = "{orthanc.user}"\n'
        f'password_env = "{password_variable}"',
        *extra,
    ]) + "\n", name="peers.toml")


def rows(out: str) -> dict[str, str]:
    """The ``peers test`` table by destination name."""
    return {line.split()[0]: line for line in out.splitlines()[1:] if line and not line[0].isdigit()}


def test_peers_answer_over_dicom_and_dicomweb(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, orthanc.password)
    code, out, err = cli(capsys, "peers", "test", "--config", str(peers_config(tmp_path, orthanc)))
    assert code == 0, out + err
    header = out.splitlines()[0].split()
    assert header == ["name", "kind", "address", "result", "rtt", "ms", "error"]
    table = rows(out)
    assert table["pacs"].split()[1:5] == ["dicom", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "C-ECHO", "0x0000"]
    assert float(table["pacs"].split()[5]) > 0
    assert table["web"].split()[1:5] == ["dicomweb", f"http://127.0.0.1:{orthanc.http_port}/dicom-web", "HTTP", "200"]
    assert out.splitlines()[-1].startswith("2 of 2 destinations answered with success (calling AE title AINODE)")


def test_peers_that_fail_say_why(capsys: pytest.CaptureFixture[str], tmp_path: Path, orthanc: Orthanc,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, "not-the-password")
    dead = free_port()  # nothing listens there
    config = peers_config(
        tmp_path, orthanc,
        "[[send.destinations]]", f'name = "dead"\nae_title = "GONE"\nhost = "127.0.0.1"\nport = {dead}',
        "[[send.destinations]]",
        f'name = "wrong-aet"\nae_title = "NOTPACS"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}',
        "[[send.destinations]]", f'name = "dead-web"\nkind = "dicomweb"\nurl = "http://127.0.0.1:{dead}/dicom-web"',
    )
    started = time.monotonic()
    code, out, err = cli(capsys, "peers", "test", "--config", str(config), "--timeout", "3")
    assert time.monotonic() - started < 15
    assert code == 1, out + err
    table = rows(out)
    assert "C-ECHO 0x0000" in table["pacs"]  # the others' failures do not hide a peer that answers
    assert "HTTP 401" in table["web"] and "authentication refused" in table["web"]
    assert "no association" in table["dead"]
    assert f"cannot connect to 127.0.0.1:{dead}: [Errno 111] Connection refused" in table["dead"]
    assert "association rejected by the service user (permanent): Called AE title not recognised" \
        in table["wrong-aet"]
    assert f"cannot connect to http://127.0.0.1:{dead}/dicom-web/studies: [Errno 111] Connection refused" \
        in table["dead-web"]
    assert out.splitlines()[-1].startswith("1 of 5 destinations answered with success; 4 failed")


def test_peers_unset_password_variable(capsys: pytest.CaptureFixture[str], tmp_path: Path, orthanc: Orthanc,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    code, out, _ = cli(capsys, "peers", "test", "--config", str(peers_config(tmp_path, orthanc)))
    assert code == 1
    assert f"password_env: environment variable {PASSWORD_VARIABLE} is not set" in rows(out)["web"]


def test_peers_dicom_tls_with_client_certificate(capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: Path,
                                                 start_node: StartNode) -> None:
    tls_port = free_port()
    node_config = write_config(tmp_path, f'[tls]\ntls_port = {tls_port}\ntls_cert_file = "{pki / "server.crt"}"\n'
                                         f'tls_key_file = "{pki / "server.key"}"\ntls_ca_file = "{pki / "ca.crt"}"\n'
                                         "tls_require_client_cert = true\n", name="tls-node.toml")
    start_node("--config", str(node_config))
    peer = (f'ae_title = "AINODE"\nhost = "127.0.0.1"\nport = {tls_port}\ntls = true\n'
            f'tls_ca_file = "{pki / "ca.crt"}"\n')
    config = write_config(tmp_path, "[node]\nae_title = \"CHECKER\"\n[send]\n"
                                    f'[[send.destinations]]\nname = "with-cert"\n{peer}'
                                    f'tls_cert_file = "{pki / "client.crt"}"\ntls_key_file = "{pki / "client.key"}"\n'
                                    f'[[send.destinations]]\nname = "without-cert"\n{peer}', name="peers.toml")
    code, out, _ = cli(capsys, "peers", "test", "--config", str(config), "--timeout", "5")
    assert code == 1
    table = rows(out)
    assert "C-ECHO 0x0000" in table["with-cert"] and f"AINODE@127.0.0.1:{tls_port} TLS" in table["with-cert"]
    assert "C-ECHO" not in table["without-cert"]
    assert "TLS" in table["without-cert"].split("  ")[-1] or "certificate" in table["without-cert"], table
