"""``pacs-ai-node demo``: a phantom chest CT through a real node process, and what the admin is shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom

from support.data import REPO
from support.node import StartNode
from support.processes import free_port


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "demo", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=False)


def test_demo_sends_a_phantom_and_names_the_results(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node()  # the quick body-lungs bundle alone (support.node.NodeProcess)
    result = _demo("--to", f"AINODE@127.0.0.1:{node.port}", "--data-dir", str(node.data_dir),
                   "--http-url", f"http://127.0.0.1:{node.http_port}", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"sent 64 CT slices to AINODE@127\.0\.0\.1:\d+", out), out
    series = re.search(r"^series ([0-9.]+): done after", out, re.MULTILINE)
    assert series, out
    assert "answers:" in out and "body-lungs: Body" in out, out
    files = dict(re.findall(r"^  (SEG|SR|SC)\s+(\S+\.dcm)$", out, re.MULTILINE))
    assert {"SEG", "SR"} <= set(files), out
    for kind, path in files.items():
        assert Path(path).is_file(), path
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == kind
    # the segmentation is of the series the demo sent
    seg = pydicom.dcmread(files["SEG"], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.group(1)
    assert f"status page: http://127.0.0.1:{node.http_port}/status/series/{series.group(1)}" in out
    # the node recorded it too: the series list names the same series as done
    listed = subprocess.run([sys.executable, "-m", "node", "series", "list", "--data-dir", str(node.data_dir)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=True).stdout
    assert re.search(rf"^{re.escape(series.group(1))}\s+done", listed, re.MULTILINE), listed


def test_demo_reads_a_remote_node_s_status_page(start_node: StartNode, tmp_path: Path) -> None:
    """No state database here (another --data-dir): the demo polls the series' status page instead."""
    config = tmp_path / "node.toml"
    config.write_text('[http]\nhttp_bind_address = "127.0.0.1"\n')  # status pages: on loopback alone
    node = start_node("--config", str(config))
    elsewhere = tmp_path / "not-the-node"
    result = _demo("--to", f"AINODE@127.0.0.1:{node.port}", "--data-dir", str(elsewhere),
                   "--http-url", f"http://127.0.0.1:{node.http_port}", "--timeout", "240")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not elsewhere.exists()
    files = dict(re.findall(r"^  (SEG|SR|SC)\s+(\S+\.dcm)$", result.stdout, re.MULTILINE))
    assert {"SEG", "SR"} <= set(files), result.stdout
    assert all(Path(path).is_file() for path in files.values())
    assert "body-lungs: Lungs" in result.stdout


def test_demo_without_a_node_says_so(tmp_path: Path) -> None:
    port = free_port()
    result = _demo("--to", f"AINODE@127.0.0.1:{port}", "--data-dir", str(tmp_path), "--timeout", "5")
    assert result.returncode == 1
    assert f"error: no DICOM node answers at AINODE@127.0.0.1:{port}" in result.stderr
    assert "pacs-ai-node serve" in result.stderr
    assert result.stdout == ""
