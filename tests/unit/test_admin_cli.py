"""``pacs-ai-node config check`` and ``pacs-ai-node peers test``.

``config check`` on the shipped configs and on configs broken one way each
(every problem is one line that names the key); ``peers test`` against a
real Orthanc (C-ECHO and an authenticated QIDO-RS), the node's own DICOM TLS
port (C-ECHO with a client certificate), and peers that are down or refuse.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import REPO, Orthanc, free_port
from node.cli.main import main
from node.cli.admin import dicomweb_session
from node.config import Destination
from node.send.sender import Sender
from test_tls import make_pki

EXAMPLE = REPO / "deploy" / "node.example.toml"
IMAGE_CONFIG = REPO / "deploy" / "docker" / "node.toml"
PASSWORD_VARIABLE = "PACS_AI_NODE_TEST_QIDO_PASSWORD"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


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


# -- peers test ---------------------------------------------------------------------


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
                                                 start_node) -> None:  # noqa: ANN001
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
