"""The hospital loop in its two other forms: DICOMweb only, and DICOM TLS end to end.

- DICOMweb: STOW-RS (dicomweb-client) into the node; the node sends SEG and
  SR back with STOW-RS to Orthanc's DICOMweb plugin (basic authentication).
- TLS: storescu sends to Orthanc over DICOM TLS; the shipped Lua rule
  forwards the stable CT to the node's TLS port (Orthanc presents its
  certificate, the node requires one); the node sends the results back to
  Orthanc over TLS with its own client certificate. Certificates are made in
  the test by openssl.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from support.data import abdomen_files
from support.dcmtk import PEER_ENV, dcmtk
from support.orthanc import NODE_ALIAS, RoutingOrthanc, running_orthanc
from support.pki import make_pki
from support.processes import free_port, wait_for

PASSWORD_VARIABLE = "PACS_AI_TEST_ORTHANC_PASSWORD"


def results_in(orthanc, study_uid: str) -> set[str]:  # noqa: ANN001
    modalities = set()
    for item in orthanc.series_in_study(study_uid):
        modalities.update(item.get("00080060", {}).get("Value", []))
    return modalities


def test_dicomweb_only_loop(orthanc, start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomweb_client.api import DICOMwebClient

    monkeypatch.setenv(PASSWORD_VARIABLE, orthanc.password)
    config = tmp_path / "node.toml"
    config.write_text(f"""
[[send.destinations]]
name = "orthanc-web"
kind = "dicomweb"
url = "http://127.0.0.1:{orthanc.http_port}/dicom-web"
username = "{orthanc.user}"
password_env = "{PASSWORD_VARIABLE}"
confirm = true
""")
    node = start_node("--config", str(config), "--quiet-seconds", "60")
    datasets = [pydicom.dcmread(p) for p in abdomen_files()]
    study_uid = str(datasets[0].StudyInstanceUID)
    client = DICOMwebClient(url=f"http://127.0.0.1:{node.http_port}/dicom-web")
    response = client.store_instances(datasets=datasets)
    assert len(response.ReferencedSOPSequence) == len(datasets)
    # The request carried the whole series: complete at once, results back by STOW-RS.
    wait_for(lambda: {"SEG", "SR"} <= results_in(orthanc, study_uid), 90, interval=0.5,
             what="SEG and SR in Orthanc by STOW-RS")
    assert "CT" not in results_in(orthanc, study_uid)  # only the results went to the PACS
    listing = subprocess.run([sys.executable, "-m", "node", "outbox", "list", "--data-dir", str(node.data_dir)],
                             capture_output=True, text=True, timeout=60)
    assert "confirmed by QIDO-RS" in listing.stdout, listing.stdout


@dataclass
class TlsRoutingOrthanc(RoutingOrthanc):
    """The routing PACS with DICOM TLS on its own port and towards the node."""

    pki: Path = Path()
    node_tls_port: int = 0

    def config(self) -> dict:
        config = super().config()
        config.update({
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.pki / "peer.crt"),
            "DicomTlsPrivateKey": str(self.pki / "peer.key"),
            "DicomTlsTrustedCertificates": str(self.pki / "ca.crt"),
            "DicomTlsRemoteCertificateRequired": True,
        })
        config["DicomModalities"][NODE_ALIAS] = {
            "AET": "AINODE", "Host": "127.0.0.1", "Port": self.node_tls_port, "UseDicomTls": True,
        }
        config["DicomModalities"]["ct-scanner"] = {"AET": self.modality_aet, "Host": "127.0.0.1", "Port": 104,
                                                   "UseDicomTls": True}
        return config


def test_routing_loop_over_dicom_tls(start_node, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    node_tls_port = free_port()

    class Pacs(TlsRoutingOrthanc):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.pki, self.node_tls_port = pki, node_tls_port

    fixture = running_orthanc(Pacs, tmp_path, "HOSPITALPACS")
    orthanc = next(fixture)
    try:
        config = tmp_path / "node.toml"
        config.write_text(f"""
[tls]
tls_port = {node_tls_port}
tls_cert_file = "{pki / 'server.crt'}"
tls_key_file = "{pki / 'server.key'}"
tls_ca_file = "{pki / 'ca.crt'}"
tls_require_client_cert = true

[[send.destinations]]
name = "pacs-tls"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
tls = true
tls_ca_file = "{pki / 'ca.crt'}"
tls_cert_file = "{pki / 'client.crt'}"
tls_key_file = "{pki / 'client.key'}"
""")
        node = start_node("--config", str(config), "--quiet-seconds", "60", port=orthanc.node_port)
        files = abdomen_files()
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        sent = subprocess.run(
            [dcmtk("storescu"), "-aet", orthanc.modality_aet, "-aec", orthanc.aet,
             "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"),
             "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
            env=PEER_ENV, capture_output=True, text=True, timeout=180,
        )
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: {"SEG", "SR"} <= results_in(orthanc, study_uid), 120, interval=0.5,
                 what="SEG and SR back in Orthanc over DICOM TLS")
        output = node.output()
        assert "112 instances stored" in output  # through the TLS port: the plain one is not in Orthanc's config
        assert "with TLS" in output
    finally:
        fixture.close()
