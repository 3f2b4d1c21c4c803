"""A test CA and certificates, made with the openssl command line (RSA 2048, valid two days)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

OPENSSL = "/usr/bin/openssl"


def openssl(*args: str, cwd: Path) -> None:
    """Run one openssl command in ``cwd``; the test fails with openssl's message if it fails."""
    done = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def make_pki(folder: Path) -> Path:
    """CA, server, client and peer (both roles, e.g. Orthanc) certificates, RSA 2048, two days."""
    if not Path(OPENSSL).exists():
        pytest.fail("openssl is not installed (apt-get install openssl); run the README test command")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=pacs-ai-node test CA", cwd=folder)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth"),
                            ("peer", "subjectAltName=IP:127.0.0.1,DNS:localhost")):
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=pacs-ai-node test {name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder
