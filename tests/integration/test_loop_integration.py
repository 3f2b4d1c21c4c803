"""The whole loop with real peers on loopback.

DCMTK storescu (the modality) -> the node -> Orthanc (the PACS); then the SEG
and SR that Orthanc holds are checked by tools nobody here wrote: dciodvfy,
dcmqi's tid1500reader and segimage2itkimage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipelines.volume.ct import load_series
from support.data import abdomen_files
from support.dcmtk import PEER_ENV, dcmtk, storescu
from support.processes import wait_for
from support.validators import dciodvfy, dcmqi_seg_masks, tid1500_json

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _modality_series(orthanc, study_uid: str) -> dict[str, dict]:
    """Series of the study in Orthanc by modality (QIDO-RS)."""
    out = {}
    for item in orthanc.series_in_study(study_uid):
        modality = item.get("00080060", {}).get("Value", [""])[0]
        out[modality] = item
    return out


def _instances(orthanc, study_uid: str, modality: str) -> list[str]:
    """Orthanc ids of the instances of one modality in a study."""
    return json.loads(orthanc.request("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": modality}}).encode()))


def _download_instances(orthanc, study_uid: str, modality: str, folder: Path) -> list[Path]:
    """Fetch the PS3.10 files of one modality in a study through Orthanc's REST API."""
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for orthanc_id in _instances(orthanc, study_uid, modality):
        path = folder / f"{modality}-{orthanc_id}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{orthanc_id}/file"))
        paths.append(path)
    return paths


def test_ct_in_seg_and_sr_back_in_pacs(orthanc, start_node, tmp_path: Path, have_tools: None) -> None:
    """Both bundled models (the default: every bundle) on the real abdomen CT, results checked in the PACS."""
    node = start_node("--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--quiet-seconds", "2",
                      "--models", "body-lungs,reference-cascade", port=orthanc.node_port)
    files = abdomen_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    # The modality sends the CT to the node only.
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr

    # Within a minute of the last image, a SEG and an SR per model are in the PACS, same study, new series.
    def both_models() -> dict | None:
        s = _modality_series(orthanc, study_uid)
        return s if s and {"SEG", "SR"} <= set(s) and len(_instances(orthanc, study_uid, "SR")) == 2 else None

    series = wait_for(both_models, 90, interval=0.5, what="SEG and SR of both models in Orthanc")
    assert "CT" not in series, "the node must not forward the CT itself"
    seg_paths = _download_instances(orthanc, study_uid, "SEG", tmp_path / "from-pacs")
    sr_paths = _download_instances(orthanc, study_uid, "SR", tmp_path / "from-pacs")
    assert len(seg_paths) == len(sr_paths) == 2
    volume = load_series(files)
    voxel_mm3 = volume.voxel_volume_mm3
    models = set()
    for seg_path in seg_paths:
        seg = pydicom.dcmread(seg_path)
        model = str(seg.SeriesDescription).split()[1]  # "AI <bundle id> SEG - <notice>"
        models.add(model)
        sr_path = next(p for p in sr_paths if str(pydicom.dcmread(p).SeriesDescription).split()[1] == model)
        sr = pydicom.dcmread(sr_path)
        assert seg.SOPClassUID == SEG_CLASS and seg.SegmentationType == "BINARY"
        assert sr.SOPClassUID == SR_CLASS
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid

        # Valid DICOM according to dciodvfy.
        for path in (seg_path, sr_path):
            errors, warnings = dciodvfy(path)
            assert errors == [], f"{model} {path.name}: {errors}"
            print(f"dciodvfy {model} {path.name}: {len(warnings)} warnings {warnings}")

        # dcmqi reads both; the SR's volumes match the SEG's voxels.
        masks = dcmqi_seg_masks(seg_path, tmp_path / f"dcmqi-seg-{model}", volume)
        report = tid1500_json(sr_path, tmp_path / f"dcmqi-sr-{model}")
        # One TID 1411 group per segment; lesions also have a TID 1410 group locating them (SCOORD3D point).
        groups = [g for g in report["Measurements"] if "ReferencedSegment" in g]
        assert len(groups) == len(masks) == len(seg.SegmentSequence) >= 1
        for group in groups:
            number = int(group["ReferencedSegment"])
            volume_item = next(m for m in group["measurementItems"] if m["quantity"]["CodeValue"] == "118565006")
            mean_item = next(m for m in group["measurementItems"] if m["quantity"]["CodeValue"] == "112031")
            mask = masks[number]
            assert float(volume_item["value"]) == pytest.approx(mask.sum() * voxel_mm3, rel=1e-6)
            assert float(mean_item["value"]) == pytest.approx(float(volume.hu[mask].mean()), abs=0.01)
    assert models == {"body-lungs", "reference-cascade"}

    # The admin sees the outcome.
    listing = subprocess.run(
        [sys.executable, "-m", "node", "series", "list", "--data-dir", str(node.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert "done" in listing.stdout
    log = node.output()
    assert "TotalSegmentator^ExampleCT" not in log and "TSEG-EXAMPLE-CT" not in log, "patient identity in logs"


def test_restart_between_receiving_and_processing(orthanc, start_node, tmp_path: Path) -> None:
    """Killed (SIGKILL) after the CT arrived but before its quiet period ended: the restart finishes it."""
    dest = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    node = start_node("--send-to", dest, "--quiet-seconds", "600", port=orthanc.node_port)
    files = abdomen_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr
    node.stop(signal.SIGKILL)
    assert _modality_series(orthanc, study_uid) == {}

    start_node("--send-to", dest, "--quiet-seconds", "1", port=orthanc.node_port, data_dir=node.data_dir)
    series = wait_for(lambda: (s := _modality_series(orthanc, study_uid)) and {"SEG", "SR"} <= set(s) and s,
                      60, interval=0.5, what="SEG and SR after restart")
    assert set(series) == {"SEG", "SR"}


def test_results_wait_for_a_pacs_that_is_down(orthanc, start_node, tmp_path: Path) -> None:
    """Destination down: results stay queued and arrive once it is back."""
    dest = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    orthanc.stop()
    node = start_node("--send-to", dest, "--quiet-seconds", "1", port=orthanc.node_port)
    files = abdomen_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: "send of" in node.output() and "failed" in node.output(), 60, what="a failed send attempt")
    orthanc.start()
    series = wait_for(lambda: (s := _modality_series(orthanc, study_uid)) and {"SEG", "SR"} <= set(s) and s,
                      90, interval=0.5, what="SEG and SR after the PACS came back")
    assert set(series) == {"SEG", "SR"}


def test_echoscu_and_echo_command(start_node) -> None:
    node = start_node()
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "AINODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=60, env=PEER_ENV)
    assert echo.returncode == 0, echo.stderr
    ours = subprocess.run([sys.executable, "-m", "node", "echo", f"AINODE@127.0.0.1:{node.port}"], capture_output=True,
                          text=True, timeout=60)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "status 0x0000" in ours.stdout and "round trip" in ours.stdout
    wrong = subprocess.run([sys.executable, "-m", "node", "echo", f"NOTTHENODE@127.0.0.1:{node.port}"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "no association" in wrong.stdout
