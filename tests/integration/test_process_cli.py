"""``pacs-ai-node process``: the same pipeline offline on a folder."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from support.data import REPO, abdomen_files
from support.validators import dciodvfy


def _process(input_dir: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "process", str(input_dir), "--output", str(output), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_process_writes_seg_and_sr(tmp_path: Path) -> None:
    """By default every bundle in onnx_models/ runs: a SEG and an SR from each."""
    result = _process(abdomen_files()[0].parent, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "1 series processed, 0 not" in result.stdout
    written = sorted((tmp_path / "out").glob("*.dcm"))
    bundles = len(list((REPO / "onnx_models").glob("*/manifest.json")))
    assert bundles >= 2
    kinds = [p.name.split("_")[0] for p in written]
    assert kinds.count("SEG") == kinds.count("SR") == bundles
    # Key images (Secondary Capture), one per lesion a bundle reports.
    assert (kinds.count("SC") > 0) == ("lesion present" in result.stdout)
    assert re.search(r"reference-cascade: pancreas: \w", result.stdout)  # the per-site summary
    for path in written:
        errors, _ = dciodvfy(path)
        assert errors == [], errors
    # Deterministic UIDs: a second run writes the same objects (same file names).
    again = _process(abdomen_files()[0].parent, tmp_path / "out2")
    one = _process(abdomen_files()[0].parent, tmp_path / "out3", "--models", "body-lungs")
    assert one.returncode == 0 and len(list((tmp_path / "out3").glob("*.dcm"))) == 2
    assert again.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out2").glob("*.dcm")) == [p.name for p in written]
    assert "TotalSegmentator^ExampleCT" not in result.stderr + result.stdout


def test_process_fails_with_one_line_reason_per_series(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    files = abdomen_files()
    for f in files[:40] + files[41:]:  # a missing slice
        shutil.copy(f, folder / f.name)
    scout = pydicom.dcmread(files[0])
    scout.SeriesInstanceUID = "1.2.3.4.5"
    scout.SOPInstanceUID = "1.2.3.4.5.1"
    scout.save_as(folder / "single.dcm")
    result = _process(folder, tmp_path / "out")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("series ")]
    assert len(lines) == 2, result.stderr
    assert any("missing slices" in line for line in lines)
    assert any("1.2.3.4.5" in line and "slice" in line for line in lines)
