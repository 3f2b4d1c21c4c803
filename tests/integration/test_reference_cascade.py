"""The committed reference cascade: intact, honestly labelled, runs end to end, and regenerates.

The bundle is trained on synthetic phantoms (onnx_models/reference-cascade/train.py);
these tests check the plumbing around it, not its accuracy (MODEL_CARD.md and
metrics.json report that, and say the goal is missed).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.analysis import SeriesAnalyzer
from pipelines.model.bundle import ModelBundle, sha256_file
from pipelines.model.manifest import load_manifest
from pipelines.offline import phantom
from pipelines.volume.ct import load_series
from support.data import REPO
from support.validators import dciodvfy

BUNDLE = REPO / "onnx_models" / "reference-cascade"
CPU = ["CPUExecutionProvider"]


def test_committed_bundle_is_intact_and_labelled_as_not_clinical() -> None:
    manifest, raw = load_manifest(BUNDLE / "manifest.json")
    for artifact in manifest.artifacts:
        assert sha256_file(BUNDLE / artifact.file) == artifact.sha256
    assert [s.id for s in manifest.stages] == ["organs", "lesions", "typing"]
    assert manifest.stage("lesions").region is not None and manifest.stage("typing").gate is not None
    assert "Not a clinical model" in manifest.regulatory_status
    card = (BUNDLE / "MODEL_CARD.md").read_text()
    assert "Not a clinical model" in card and "goal" in card
    metrics = json.loads((BUNDLE / "metrics.json").read_text())
    bundle = ModelBundle(BUNDLE, verify_only=True)
    assert metrics["bundle"] == bundle.key  # the figures belong to these exact artifacts
    assert set(metrics["sites"]) == {s.site for s in manifest.lesions.sites}
    # The committed run is what the one regeneration command does by default.
    spec = importlib.util.spec_from_file_location("reference_cascade_train", BUNDLE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert raw["provenance"]["iterations"] == {"organs": 3000, "lesions": 6000, "typing": 3000}


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest-abdomen phantom at 1.5 mm x 1.5 mm x 2.5 mm with a lesion, written as DICOM."""
    p = phantom.sample_phantom(424242, coverage="chest-abdomen", lesions=[{"site": "liver", "diameter_mm": 25.0,
                                                                           "type": "cyst"}], noise_sigma=10.0)
    grid = phantom.Grid.chest_ct(pixel_mm=1.5, slice_mm=2.5, rows=256, phantom=p)
    return phantom.write_case(p, grid, tmp_path_factory.mktemp("case") / "case")


def test_cascade_runs_end_to_end_on_a_phantom_series(phantom_case: Path, tmp_path: Path) -> None:
    bundle = ModelBundle(BUNDLE, providers=CPU)
    volume = load_series(sorted((phantom_case / "dicom").glob("*.dcm")))
    result = SeriesAnalyzer(bundle).analyse(volume)
    (only,) = result.bundles
    assert [r.site for r in only.sites] == [s.site for s in bundle.manifest.lesions.sites]
    assert all(r.status in ("present", "absent", "not evaluable") for r in only.sites)
    measured = only.measurements
    assert None not in (measured.bone_density, measured.steatosis, measured.lung_nodules)
    labels = {f.label for f in only.findings}
    assert {"Lung", "Liver", "Vertebra", "Aorta"} <= labels
    truth = json.loads((phantom_case / "truth.json").read_text())
    organs = np.load(phantom_case / "labels.npz")["organs"]
    lung = next(f for f in only.findings if f.label == "Lung")
    overlap = 2 * (lung.mask & (organs == phantom.ORGAN_IDS["lung"])).sum() / (
        lung.mask.sum() + (organs == phantom.ORGAN_IDS["lung"]).sum())
    assert overlap > 0.9
    steatosis = only.measurements.steatosis
    assert steatosis is not None
    if steatosis.evaluable:
        assert steatosis.liver_mean_hu == pytest.approx(truth["liver_mean_hu"], abs=15)
    # The objects are valid DICOM (dciodvfy) and carry the lesions' sizes when there are any.
    for ds in result.objects:
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, _warnings = dciodvfy(path)
        assert errors == [], (ds.Modality, errors)
        assert pydicom.dcmread(path).StudyInstanceUID == volume.study_instance_uid
    assert "research" in result.objects[0].SeriesDescription.lower()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs the train extra (torch)")
def test_regeneration_command_runs_end_to_end(tmp_path: Path) -> None:
    """train.py --quick: render, train (2 steps), export, write cases, calibrate, validate, card."""
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, str(BUNDLE / "train.py"), "--quick", "--out", str(out), "--workers", "1",
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bundle = ModelBundle(out, providers=CPU)
    assert [a.file for a in bundle.manifest.artifacts] == ["organs.onnx", "lesions.onnx", "typing.onnx"]
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bundle"] == bundle.key and metrics["cases"] == 2
