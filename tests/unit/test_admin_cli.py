"""``pacs-ai-node config check`` and what ``pacs-ai-node peers test`` does without a peer.

``config check`` on the shipped configs and on configs broken one way each
(every problem is one line that names the key). ``peers test`` against a real
Orthanc, the node's own DICOM TLS port and peers that are down or refuse:
tests/integration/test_peers_cli.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from node.cli.admin import dicomweb_session
from node.config import Destination
from node.send.sender import Sender
from support.cli import cli, write_config
from support.data import REPO

EXAMPLE = REPO / "deploy" / "node.example.toml"
IMAGE_CONFIG = REPO / "deploy" / "docker" / "node.toml"
PASSWORD_VARIABLE = "PACS_AI_NODE_TEST_QIDO_PASSWORD"


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# -- config check: valid configs --------------------------------------------------


def test_example_config_checks_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "config", "check", str(EXAMPLE))
    assert code == 0, err
    assert out.startswith(f"OK: {EXAMPLE}")
    assert "AE title AINODE, DICOM 0.0.0.0:11112" in out
    assert "STOW-RS http://0.0.0.0:8080/studies" in out
    assert "body-lungs" in out and "reference-cascade" in out and "sha256 ok" in out
    assert "built-in default rules" in out
    assert not errors(err)


def test_image_config_checks_ok_with_container_paths_mapped(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    text = IMAGE_CONFIG.read_text()
    for container_path, here in (("/var/lib/pacs-ai-node", tmp_path / "data"),
                                 ("/opt/pacs-ai-node/onnx_models", REPO / "onnx_models")):
        assert f'"{container_path}"' in text
        text = text.replace(f'"{container_path}"', f'"{here}"')
    code, out, err = cli(capsys, "config", "check", str(write_config(tmp_path, text)))
    assert code == 0, err
    assert "callers: ORTHANC" in out
    assert "orthanc (dicom ORTHANC@orthanc:4242; SEG, SR)" in out
    assert "does not exist yet; serve creates it" in err
    assert not (tmp_path / "data").exists()  # checked, not created


def test_tls_files_that_load_check_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[tls]\ntls_port = 2762\nhttp_tls = true\n'
                                    f'tls_cert_file = "{pki / "server.crt"}"\ntls_key_file = "{pki / "server.key"}"\n'
                                    f'tls_ca_file = "{pki / "ca.crt"}"\ntls_require_client_cert = true\n')
    code, out, err = cli(capsys, "config", "check", str(config))
    assert code == 0, err
    assert "DICOM TLS 0.0.0.0:2762 (client certificate required)" in out and "STOW-RS https://" in out


# -- config check: one problem each, named by its key -----------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ('[node]\ncolour = "blue"\n', "unknown key node.colour"),
    ('[node]\nae_title = "MORE_THAN_16_CHARS"\n', "ae_title: 'MORE_THAN_16_CHARS' is not a valid AE title"),
    ('[node]\nae_title = "BACK\\\\SLASH"\n', "ae_title: 'BACK\\\\SLASH' is not a valid AE title"),
    ("[node]\nport = 70000\n", "port: 70000 out of range 1-65535"),
    ('[series]\nquiet = 3\n', "unknown key series.quiet"),
    ('[send]\ndestinations = ["PACS@host"]\n', "send.destinations[0]: 'PACS@host' is not AET@HOST:PORT"),
])
def test_config_that_does_not_load(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str,
                                   expected: str) -> None:
    code, out, err = cli(capsys, "config", "check", str(write_config(tmp_path, text)))
    assert code == 2 and out == ""
    (line,) = errors(err)
    assert expected in line, line


def test_missing_tls_files_one_line_each(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[tls]\ntls_port = 2762\n'
                                    'tls_cert_file = "certs/node.crt"\ntls_key_file = "certs/node.key"\n')
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    assert errors(err) == [f"error: tls.tls_cert_file: {tmp_path / 'certs/node.crt'} not found",
                           f"error: tls.tls_key_file: {tmp_path / 'certs/node.key'} not found"]
    assert "2 problems; `serve` would not start with it" in err


def test_tls_key_of_another_certificate(capsys: pytest.CaptureFixture[str], tmp_path: Path, pki: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[tls]\ntls_port = 2762\n'
                                    f'tls_cert_file = "{pki / "server.crt"}"\ntls_key_file = "{pki / "client.key"}"\n')
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: tls.tls_cert_file / tls_key_file / tls_ca_file: TLS certificate, key or CA file "
                           "cannot be used"), line


def tampered_models(tmp_path: Path) -> Path:
    """A copy of the body-lungs bundle with one byte of its ONNX file changed."""
    models = tmp_path / "models"
    shutil.copytree(REPO / "onnx_models" / "body-lungs", models / "body-lungs")
    onnx = models / "body-lungs" / "body_lungs.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    return models


def test_tampered_model_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    models = tampered_models(tmp_path)
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[models]\nmodels_dir = "{models}"\n')
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: models.models_dir (body-lungs): ") and "does not match the manifest" in line, line


def test_enabled_model_that_is_not_there(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n'
                                    f'[models]\nmodels_dir = "{REPO / "onnx_models"}"\n'
                                    'enabled_models = ["body-lungs", "no-such-model"]\n')
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: models.enabled_models (no-such-model): "), line


@pytest.mark.parametrize("layout", ["under a file", "is a file"])
def test_data_dir_that_cannot_be_used(capsys: pytest.CaptureFixture[str], tmp_path: Path, layout: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    data_dir = blocker / "var" if layout == "under a file" else blocker
    code, _, err = cli(capsys, "config", "check", str(write_config(tmp_path, f'[node]\ndata_dir = "{data_dir}"\n')))
    assert code == 2
    (line,) = errors(err)
    assert line.startswith(f"error: node.data_dir: {data_dir} "), line
    assert ("is not a folder" in line), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only folder anyway; the file cases cover root")
def test_data_dir_without_write_permission(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o500)
    try:
        code, _, err = cli(capsys, "config", "check", str(write_config(tmp_path, f'[node]\ndata_dir = "{data_dir}"\n')))
    finally:
        data_dir.chmod(0o700)
    assert code == 2
    assert errors(err) == [f"error: node.data_dir: {data_dir} is not writable by this user (Permission denied)"]


def test_every_problem_after_loading_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    models = tampered_models(tmp_path)
    config = write_config(tmp_path, (
        f'[node]\ndata_dir = "{tmp_path / "blocker" / "var"}"\nport = 11112\n'
        '[http]\nhttp_port = 11112\n'
        '[series]\nrules_file = "missing-rules.toml"\n'
        f'[models]\nmodels_dir = "{models}"\n'
        '[send]\ndestinations = [{ kind = "dicomweb", url = "https://archive.example.org/dicom-web", '
        f'username = "ainode", password_env = "{PASSWORD_VARIABLE}" }}]\n'))
    (tmp_path / "blocker").write_text("")
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    keys = [line.split(": ")[1] for line in errors(err)]
    assert keys == ["http.http_port", "send.destinations[0].password_env", "models.models_dir (body-lungs)",
                    "series.rules_file", "node.data_dir"], err
    assert "5 problems" in err


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="this machine has an NVIDIA driver")
def test_require_gpu_without_a_gpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[models]\nrequire_gpu = true\n')
    code, _, err = cli(capsys, "config", "check", str(config))
    assert code == 2
    (line,) = errors(err)
    assert line.startswith("error: models.require_gpu: no GPU execution provider here (NVIDIA driver absent"), line


def test_credentials_over_plain_http_are_a_warning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[node]\ndata_dir = "{tmp_path}"\n[send]\ndestinations = [{{ kind = "dicomweb", '
                                    'url = "http://archive.example.org/dicom-web", username = "u", password = "p" }]\n')
    code, out, err = cli(capsys, "config", "check", str(config))
    assert code == 0, err
    assert ("warning: send.destinations[0].url: credentials would be sent over plain http to "
            "http://archive.example.org/dicom-web") in err
    url = "http://archive.example.org/dicom-web"
    assert f"{url} (dicomweb {url}; SEG, SR, KO, SC, PR)" in out


# -- peers test without a peer (with real peers: tests/integration/test_peers_cli.py) -------------


def test_peers_without_destinations(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "peers", "test", "--config", str(write_config(tmp_path, "[node]\n")))
    assert code == 1 and out == ""
    assert "no destinations configured" in err


def test_peers_config_that_does_not_load(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "peers", "test", "--config", str(write_config(tmp_path, "[send]\nretry = 1\n")))
    assert code == 2 and "unknown key send.retry" in err


@pytest.mark.parametrize("destination", [
    Destination(kind="dicomweb", url="https://a.example/dw", name="basic", username="u", password="p"),
    Destination(kind="dicomweb", url="https://a.example/dw", name="token", bearer_token="t0ken"),
    Destination(kind="dicomweb", url="https://a.example/dw", name="noverify", tls_verify=False),
    Destination(kind="dicomweb", url="http://a.example/dw", name="anonymous"),
])
def test_qido_session_authenticates_as_the_sender(destination: Destination) -> None:
    """peers test must log in exactly as the STOW-RS sender does, or its answer means nothing."""
    ours = dicomweb_session(destination)
    theirs = Sender._http_session(None, destination)  # type: ignore[arg-type]  # uses no instance state
    assert (ours.auth, ours.verify, ours.cert) == (theirs.auth, theirs.verify, theirs.cert)
    assert dict(ours.headers) == dict(theirs.headers)
