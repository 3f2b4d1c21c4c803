"""``pacs-ai-node models list|verify|describe|validate`` on tiny constructed bundles, and the
statistics of :mod:`pipelines.offline.validation` checked against values worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from node.cli.main import main
from pipelines.model.manifest import MANIFEST_NAME
from pipelines.offline.validation import auc, dice, format_report, wilson_interval
from support.models import (
    LESION_SPACING,
    lesion_manifest,
    lesion_models,
    liver_phantom,
    series,
    write_bundle,
)


def _models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_bundle(root / "tiny-liver", lesion_models(), lesion_manifest())
    write_bundle(root / "other", lesion_models(), lesion_manifest(id="other", version="0.1.0-rc.1"))
    return root


def _config(tmp_path: Path, models_dir: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[models]\nmodels_dir = "{models_dir}"\n')
    return path


def _tamper(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    path.write_bytes(bytes(payload))


# --------------------------------------------------------------------------- list


def test_list_shows_each_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    assert main(["models", "list", "--models-dir", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["bundle", "version", "enabled", "stages", "segments", "status"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"tiny-liver", "other"}
    assert rows["tiny-liver"].split() == ["tiny-liver", "1.2.3", "yes", "organ", "->", "lesion", "->", "typing", "1",
                                          "sha256", "ok"]
    assert "0.1.0-rc.1" in rows["other"]
    assert lines[-1] == f"2 bundles in {root}, 0 broken"


def test_list_names_a_broken_bundle_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    _tamper(root / "other" / "lesion.onnx")
    (root / "bad-json").mkdir()
    (root / "bad-json" / MANIFEST_NAME).write_text("{ not json")
    assert main(["models", "list", "--models-dir", str(root)]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert "sha256 ok" in rows["tiny-liver"]
    assert "BROKEN" in rows["other"] and "lesion.onnx" in rows["other"] and "does not match" in rows["other"]
    assert "BROKEN" in rows["bad-json"] and "not valid JSON" in rows["bad-json"]
    assert out.splitlines()[-1] == f"3 bundles in {root}, 2 broken"


def test_list_of_a_missing_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- verify


def test_verify_dry_runs_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    config = _config(tmp_path, root)
    assert main(["models", "verify", "tiny-liver", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny-liver@1.2.3+") and ": OK (3 artifacts, sha256 verified" in lines[0]
    assert "['CPUExecutionProvider']" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == ["organ", "lesion", "typing"]
    assert "input (1, 1, 16, 16, 16) -> (1, 1, 16, 16, 16)" in lines[1]  # no sliding window: 16^3
    assert "input (1, 1, 8, 32, 32) -> (1, 2, 8, 32, 32)" in lines[2]  # the sliding-window patch
    assert "classification" in lines[3] and "input (1, 1, 5, 9, 9) -> (1, 2)" in lines[3]
    # Every enabled bundle when none is named; a path works as a name too.
    assert main(["models", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "other@0.1.0-rc.1+" in out and "tiny-liver@1.2.3+" in out
    assert main(["models", "verify", str(root / "other")]) == 0
    capsys.readouterr()


def test_verify_fails_on_a_tampered_or_inconsistent_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    config = _config(tmp_path, root)
    _tamper(root / "other" / "organ.onnx")
    data = lesion_manifest(id="three")
    data["stages"][1]["output"]["channels"] = ["background", "lesion", "other"]
    write_bundle(root / "three", lesion_models(), data)
    assert main(["models", "verify", "tiny-liver", "other", "three", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "tiny-liver@1.2.3+" in out and ": OK" in out
    (other,) = [line for line in out.splitlines() if line.startswith(str(root / "other"))]
    assert "FAILED" in other and "organ.onnx" in other and "does not match the manifest" in other
    (three,) = [line for line in out.splitlines() if line.startswith(str(root / "three"))]
    assert "FAILED" in three and "stage lesion" in three and "the manifest names 3 channels" in three


def test_verify_require_gpu_fails_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _models_dir(tmp_path))
    assert main(["models", "verify", "tiny-liver", "--require-gpu", "--config", str(config)]) == 1
    assert "GPU execution provider is required" in capsys.readouterr().out


def test_verify_of_an_unknown_name_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _models_dir(tmp_path))
    assert main(["models", "verify", "nope", "--config", str(config)]) == 2
    assert "no bundle 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- describe


def test_describe_prints_the_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, _models_dir(tmp_path))
    assert main(["models", "describe", "tiny-liver", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Test bundle tiny-liver"
    for text in (
        "id tiny-liver, version 1.2.3",
        "manufacturer: pacs-ai-node tests; authors: tests; licence: Apache-2.0",
        "organ (segmentation, artifact organ): input 'ct' at 2x3x3 mm, intensity window clip -1024..3071 HU",
        "sliding window 8x32x32, overlap 0.5, gaussian True, mirror axes [], batch 2",
        "region: bounding box of ['organ'] from organ + 4 mm",
        "patch 5x9x9 per component",
        "gate: ['lesion'] from lesion",
        "output 'y' (softmax): solid, cystic",
        " 1 Organ          from organ:organ >= 0.5; type Organ (SCT 910001)",
        "lesions (stage lesion, channel lesion, typing typing):",
        "liver        in Organ        threshold 0.5, >= 0 mm: Malignant tumour of liver (SCT 93870000)",
        "type cystic: Cystic lesion (SCT 128501009)",
    ):
        assert text in out, (text, out)
    sha = json.loads((tmp_path / "models" / "tiny-liver" / MANIFEST_NAME).read_text())["artifacts"][0]["sha256"]
    assert f"organ: organ.onnx sha256 {sha}" in out


def test_describe_json_is_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    config = _config(tmp_path, root)
    assert main(["models", "describe", "other", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((root / "other" / MANIFEST_NAME).read_text())


def test_describe_of_an_invalid_manifest_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    data = json.loads((root / "other" / MANIFEST_NAME).read_text())
    data["lesions"]["sites"][0]["organ_segment"] = "Pancreas"
    (root / "other" / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["models", "describe", "other", "--config", str(_config(tmp_path, root))]) == 2
    assert "lesions.sites[0].organ_segment: 'Pancreas' is not a segment label" in capsys.readouterr().err


# --------------------------------------------------------------------------- validation statistics


def test_wilson_interval_at_the_extremes() -> None:
    z = 1.959964
    high = (z * z / 10) / (1 + z * z / 10)  # p = 0: [0, z^2/n / (1 + z^2/n)]
    assert high == pytest.approx(0.2775, abs=1e-4)
    low0, high0 = wilson_interval(0, 10)
    assert low0 == pytest.approx(0.0, abs=1e-12) and high0 == pytest.approx(high, rel=1e-12)
    low1, high1 = wilson_interval(10, 10)
    assert low1 == pytest.approx(1 - high, rel=1e-12) and high1 == pytest.approx(1.0, abs=1e-12)
    low, high_ = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high_ == pytest.approx(0.7634, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_auc_counts_ties_as_half() -> None:
    # Pairs (pos, neg): (1,1) tie, (1,2) <, (2,1) >, (2,2) tie, (3,1) >, (3,2) >: (3 + 2/2) / 6.
    assert auc([1, 2, 3], [1, 2]) == pytest.approx(4 / 6)
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9, 0.8]) == 0.0
    assert auc([0.5, 0.5], [0.5]) == 0.5
    assert auc(iter([0.7]), (s for s in [0.3])) == 1.0  # any iterables
    assert math.isnan(auc([], [0.1])) and math.isnan(auc([0.1], []))


def test_dice_edge_cases() -> None:
    a = np.zeros((4, 4), dtype=bool)
    assert math.isnan(dice(a, a))  # both empty: undefined, not 1
    b = a.copy()
    b[0, :2] = True
    assert dice(a, b) == 0.0 and dice(b, b) == 1.0
    c = a.copy()
    c[0, 1:4] = True
    assert dice(b, c) == pytest.approx(2 * 1 / (2 + 3))


def _write_case(root: Path, name: str, hu: np.ndarray, lesions: list[dict]) -> None:
    case = root / name
    (case / "dicom").mkdir(parents=True)
    for i, ds in enumerate(series(hu, LESION_SPACING)):
        ds.save_as(case / "dicom" / f"{i:03d}.dcm", enforce_file_format=True)
    organs = np.zeros(hu.shape, dtype=np.uint8)
    organs[4:16, 16:48, 16:48] = 1
    lesion_map = np.zeros(hu.shape, dtype=np.uint8)
    for t in lesions:
        lesion_map[t.pop("where")] = t["number"]
    np.savez(case / "labels.npz", organs=organs, lesions=lesion_map)
    (case / "truth.json").write_text(json.dumps({"label_names": {"1": "organ"}, "lesions": lesions}))


def test_validate_on_two_labelled_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _models_dir(tmp_path)
    cases = tmp_path / "cases"
    blob_a = (slice(8, 13), slice(22, 31), slice(22, 31))
    _write_case(cases, "a-two-lesions", liver_phantom(), [
        {"number": 1, "site": "liver", "diameter_mm": 12.0, "type": "cystic", "where": blob_a},
        {"number": 2, "site": "liver", "diameter_mm": 4.0, "where": (slice(10, 11), slice(38, 39), slice(38, 39))},
    ])
    _write_case(cases, "b-clean", liver_phantom(blobs=False), [])
    report_path = tmp_path / "report.json"
    code = main(["models", "validate", "tiny-liver", str(cases), "--quiet", "--json", str(report_path),
                 "--config", str(_config(tmp_path, root))])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["cases"] == 2 and report["failed_cases"] == []
    assert report["dice"]["Organ"]["n"] == 2 and report["dice"]["Organ"]["min"] > 0.9
    site = report["sites"]["liver"]
    assert site["lesion_sensitivity"]["successes"] == site["lesion_sensitivity"]["total"] == 1  # >= 10 mm only
    assert site["case_specificity"]["successes"] == site["case_specificity"]["total"] == 1
    assert site["auc"] == 1.0 and site["not_evaluable_cases"] == 0
    assert site["sensitivity_by_diameter_mm"]["0-5"] == {"value": 1.0, "successes": 1, "total": 1,
                                                         "ci95": list(wilson_interval(1, 1))}
    assert site["typing_accuracy"]["successes"] == site["typing_accuracy"]["total"] == 1
    assert format_report(report) in out
    assert "liver" in out and "1.000" in out
