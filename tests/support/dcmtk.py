"""DCMTK's command-line tools as a DICOM peer (the modality or a PACS-side SCU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

#: By full path: pynetdicom installs console scripts with the same names.
DCMTK = Path("/usr/bin")
#: DCMTK sets TCP_NODELAY only when asked.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    """The full path of a DCMTK tool; fails the test (never skips) when it is not installed."""
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {tool} is not installed (apt-get install dcmtk); run the README test command")
    return str(path)


def storescu(port: int, files: list[Path], called: str = "AINODE", calling: str = "MODALITY",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK's storescu (TCP_NODELAY on, as the peers need)."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=PEER_ENV,
    )
