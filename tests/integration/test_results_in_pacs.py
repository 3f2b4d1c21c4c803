"""Key images (Secondary Capture) and GSPS reach a real PACS: Orthanc stores them, and the node delivers them.

The objects are those of the key-image scene (``support.findings``: the abdomen
series with a liver lesion and a lung nodule painted in); the unit tests in
``tests/unit/test_keyimages.py`` and ``tests/unit/test_presentation.py`` check
their content. Here: DCMTK's storescu into Orthanc, ``pacs-ai-node process``,
and the node process delivering a GSPS after a reload.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipelines.dicom_out.keyimages import KeyImageSeries, build_key_images
from pipelines.dicom_out.presentation import GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE, build_presentation_states
from pipelines.dicom_out.uids import derive_uid
from pipelines.volume.ct import CTVolume, load_series
from support.data import REPO, abdomen_files
from support.dcmtk import storescu
from support.findings import KEY_IMAGE_ALGORITHM, PREFIX, key_image_arguments, key_image_findings, paint_lesions
from support.node import StartNode
from support.orthanc import Orthanc
from support.processes import wait_for
from support.validators import dciodvfy

#: The GSPS series of tests/unit/test_presentation.py.
GSPS_SERIES_UID = derive_uid(*PREFIX, "PR", "series")


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    """The abdomen series with the key-image scene's two lesions painted in."""
    return paint_lesions(load_series(abdomen_files()))


@pytest.fixture(scope="module")
def key_images(volume: CTVolume, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[pydicom.Dataset, Path]]:
    """The key images, written as files and read back."""
    folder = tmp_path_factory.mktemp("keyimages")
    out = []
    series = KeyImageSeries(**key_image_arguments())  # type: ignore[arg-type]
    for ds in build_key_images(volume, key_image_findings(volume), KEY_IMAGE_ALGORITHM, series):
        path = folder / f"keyimage-{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((pydicom.dcmread(path), path))
    return out


@pytest.fixture(scope="module")
def gsps_written(volume: CTVolume, tmp_path_factory: pytest.TempPathFactory) -> tuple[pydicom.Dataset, Path]:
    """The GSPS, written as a file and read back."""
    series = KeyImageSeries(**key_image_arguments(  # type: ignore[arg-type]
        series_instance_uid=GSPS_SERIES_UID, series_description="AI key images GSPS - research use only"))
    (gsps,) = build_presentation_states(volume, key_image_findings(volume), KEY_IMAGE_ALGORITHM, series)
    path = tmp_path_factory.mktemp("gsps") / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def test_orthanc_stores_the_key_images_in_the_source_study(key_images: list[tuple[pydicom.Dataset, Path]],
                                                          orthanc: Orthanc, volume: CTVolume) -> None:
    written = key_images
    result = storescu(orthanc.dicom_port, [path for _, path in written], called=orthanc.aet)
    assert result.returncode == 0, result.stderr
    stored = orthanc.get("/instances?expand")
    stored_uids = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored)
    assert stored_uids == sorted(ds.SOPInstanceUID for ds, _ in written)
    (series,) = orthanc.series_in_study(volume.study_instance_uid)
    assert series["0020000E"]["Value"] == [written[0][0].SeriesInstanceUID]


def test_orthanc_accepts_the_gsps_by_c_store(gsps_written: tuple[pydicom.Dataset, Path], orthanc: Orthanc,
                                             volume: CTVolume) -> None:
    gsps, path = gsps_written
    result = storescu(orthanc.dicom_port, [path], called=orthanc.aet, extra=["-R"])
    assert result.returncode == 0, result.stderr
    (series,) = orthanc.series_in_study(volume.study_instance_uid)
    assert series["00080060"]["Value"] == ["PR"] and series["0020000E"]["Value"] == [gsps.SeriesInstanceUID]


def _process(input_dir: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "process", str(input_dir), "--output", str(output), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_process_command_honours_key_image_type(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[results]\nkey_image_type = "GSPS"\n')
    result = _process(abdomen_files()[0].parent, tmp_path / "out", "--config", str(config),
                      "--models", "reference-cascade")
    assert result.returncode == 0, result.stderr
    assert "lesion present" in result.stdout, "the test series is expected to give the cascade a lesion"
    kinds = sorted(p.name.split("_")[0] for p in (tmp_path / "out").glob("*.dcm"))
    assert kinds == ["PR", "SEG", "SR"]
    (path,) = (tmp_path / "out").glob("PR_*.dcm")
    errors, _ = dciodvfy(path)
    assert errors == [], errors


def test_node_delivers_the_gsps_to_the_pacs(orthanc: Orthanc, start_node: StartNode, tmp_path: Path) -> None:
    """key_image_type switched to "GSPS" by SIGHUP: CT in, SEG + SR + PR (no SC) out in Orthanc, the PR
    over the CT's own slices."""
    config = tmp_path / "node.toml"
    config.write_text('[results]\nkey_image_type = "SC"\n')
    node = start_node("--config", str(config), "--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                      "--quiet-seconds", "1", "--models", "reference-cascade", port=orthanc.node_port)
    config.write_text('[results]\nkey_image_type = "gsps"\n')
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded: key_image_type" in node.output(), 30, what="reload log line")
    files = abdomen_files()
    ct_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr

    def modalities() -> set[str] | None:
        found = {s.get("00080060", {}).get("Value", [""])[0] for s in orthanc.series_in_study(study_uid)}
        return found if {"SEG", "SR", "PR"} <= found else None

    assert wait_for(modalities, 90, interval=0.5, what="SEG, SR and PR in Orthanc") == {"SEG", "SR", "PR"}
    (pr_id,) = json.loads(orthanc.request("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "PR"}}).encode()))
    path = tmp_path / "pr.dcm"
    path.write_bytes(orthanc.request("GET", f"/instances/{pr_id}/file"))
    gsps = pydicom.dcmread(path)
    assert gsps.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
    referenced = {i.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for i in s.ReferencedImageSequence}
    assert referenced and referenced <= ct_uids
    errors, _ = dciodvfy(path)
    assert errors == [], errors
