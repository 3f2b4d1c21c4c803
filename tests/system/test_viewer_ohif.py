"""A real viewer shows our results: OHIF next to Orthanc's DICOMweb, in headless Chromium.

The node's own ``process`` command runs the reference cascade on a phantom
chest CT with planted lesions; the CT and every result object (SEG, SR, key
images) go into Orthanc by STOW-RS, the way a DICOMweb destination delivers
them (the GSPS of the ``key_image_type = "GSPS"`` option too). OHIF (npm ``@ohif/app``, its prebuilt
``dist/``, see tests/support/ohif_viewer.py) then opens the study the way a radiologist does:

- the SEG, double-clicked in the study panel, is drawn over the CT (the
  viewport changes when the overlay is hidden) and its panel lists every
  segment label of our SEG; selecting the lesion jumps to it;
- the SR, loaded into a fresh viewer and tracked, lists one measurement per
  finding of our report, and selecting the lesion shows the slice that holds
  its SCOORD3D point;
- the key image opens as an image.

Screenshots go to tests/output/ohif-*.png.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.offline import phantom
from support.data import REPO
from support.ohif_viewer import OHIF_DIST, OhifServer, chromium_driver, copy_screenshot, have_viewer, wait_until
from support.orthanc import Orthanc, running_orthanc

OUTPUT = Path(__file__).resolve().parent.parent / "output"
BUNDLE = "reference-cascade"
LOAD_TIMEOUT_S = 90


def _skip_or_fail(reason: str) -> None:
    # CI installs the viewer (tests/run.sh): a missing one there is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"viewer test cannot run: {reason}")
    pytest.skip(f"viewer test needs {reason} (tests/run.sh installs them)")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A phantom abdomen CT with planted lesions, and what ``pacs-ai-node process`` wrote for it."""
    root = tmp_path_factory.mktemp("viewer-case")
    p = phantom.sample_phantom(424242, coverage="abdomen", noise_sigma=10.0, lesions=[
        {"site": "liver", "diameter_mm": 30.0, "type": "malignant"},
        {"site": "pancreas", "diameter_mm": 20.0, "type": "malignant"}])
    grid = phantom.Grid.chest_ct(pixel_mm=1.0, slice_mm=2.5, rows=400, phantom=p)
    ct_dir = phantom.write_case(p, grid, root / "case") / "dicom"
    results = root / "results"
    # The default key images (SC), then the GSPS option's presentation state for the same findings.
    gsps_config = root / "gsps.toml"
    gsps_config.write_text('[results]\nkey_image_type = "GSPS"\n')
    for extra, out in (([], results), (["--config", str(gsps_config)], root / "results-gsps")):
        proc = subprocess.run([sys.executable, "-m", "node", "process", str(ct_dir), "--output", str(out),
                               "--models", BUNDLE, *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    presentation_states = sorted((root / "results-gsps").glob("PR_*.dcm"))
    assert len(presentation_states) == 1
    objects = [pydicom.dcmread(path) for path in [*sorted(results.glob("*.dcm")), *presentation_states]]
    by_modality: dict[str, list[pydicom.Dataset]] = {}
    for ds in objects:
        by_modality.setdefault(str(ds.Modality), []).append(ds)
    assert {"SEG", "SR", "PR"} <= set(by_modality), sorted(by_modality)
    cts = [pydicom.dcmread(path) for path in sorted(ct_dir.glob("*.dcm"))]
    return {"cts": cts, "results": objects, "by_modality": by_modality,
            "study": str(cts[0].StudyInstanceUID)}


@pytest.fixture(scope="module")
def pacs(case: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with the CT and all our results stored by STOW-RS."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    for pacs in running_orthanc(Orthanc, tmp_path_factory.mktemp("viewer-pacs"), "TESTPACS"):
        client = DICOMwebClient(f"http://127.0.0.1:{pacs.http_port}/dicom-web",
                                session=create_session_from_user_pass(pacs.user, pacs.password))
        for batch in (case["cts"], case["results"]):
            response = client.store_instances(batch)
            stored = {str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])}
            assert stored == {str(ds.SOPInstanceUID) for ds in batch}
            assert not response.get("FailedSOPSequence")
        yield pacs


def test_orthanc_lists_every_result_sent_by_stow_rs(case: dict, pacs: Orthanc) -> None:
    series = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in pacs.series_in_study(case["study"])}
    for ds in case["results"]:
        assert series.get(str(ds.SeriesInstanceUID)) == ds.Modality, ds.SeriesDescription
        instances = pacs.get(f"/dicom-web/studies/{case['study']}/series/{ds.SeriesInstanceUID}/instances")
        assert str(ds.SOPInstanceUID) in {i["00080018"]["Value"][0] for i in instances}
    assert list(series.values()).count("CT") == 1


@pytest.fixture(scope="module")
def viewer(pacs: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    missing = have_viewer()
    if missing:
        _skip_or_fail(missing)
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    with OhifServer(OHIF_DIST, f"http://127.0.0.1:{pacs.http_port}/dicom-web", pacs.user, pacs.password) as server:
        driver = chromium_driver(tmp_path_factory.mktemp("chromium"))
        try:
            driver.set_page_load_timeout(LOAD_TIMEOUT_S)
            # The onboarding tour would cover the viewport: mark it as seen (OHIF keeps that in localStorage).
            driver.get(server.url + "/app-config.js")
            driver.execute_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            yield server, driver
        finally:
            driver.quit()
        failed = [(path, status) for path, status in server.requests if status >= 400]
        assert failed == [], failed


def _by(css: str) -> tuple[str, str]:
    return ("css selector", css)


def _open_study(driver, server: OhifServer, study: str) -> None:  # noqa: ANN001
    driver.get(f"{server.url}/viewer?StudyInstanceUIDs={study}")
    wait_until(lambda: len(driver.find_elements(*_by("[data-cy=series-description-label]"))) >= 3,
               LOAD_TIMEOUT_S, "the study panel lists the series")
    wait_until(lambda: "I:" in _viewport_text(driver), LOAD_TIMEOUT_S, "the CT is displayed")


def _viewport_text(driver) -> str:  # noqa: ANN001
    panes = driver.find_elements(*_by("[data-cy=viewport-pane]"))
    return panes[0].text if panes else ""


def _double_click_series(driver, description: str) -> None:  # noqa: ANN001
    from selenium.webdriver.common.action_chains import ActionChains

    (label,) = [e for e in driver.find_elements(*_by("[data-cy=series-description-label]"))
                if e.text.startswith(description[:40])]
    ActionChains(driver).double_click(label).perform()


def _click_when_present(driver, css: str, what: str) -> None:  # noqa: ANN001
    wait_until(lambda: [e for e in driver.find_elements(*_by(css)) if e.is_displayed()], LOAD_TIMEOUT_S, what)
    next(e for e in driver.find_elements(*_by(css)) if e.is_displayed()).click()


def _row_titles(driver, panel: str) -> list[str]:  # noqa: ANN001
    return [e.text for e in driver.find_elements(*_by(f"{panel} [data-cy=data-row-title]"))]


def _viewport_png(driver) -> bytes:  # noqa: ANN001
    return driver.find_element(*_by("[data-cy=viewport-pane] canvas")).screenshot_as_png


def _changed_fraction(a: bytes, b: bytes) -> float:
    from io import BytesIO

    from PIL import Image

    first, second = (np.asarray(Image.open(BytesIO(x)).convert("RGB"), dtype=np.int16) for x in (a, b))
    assert first.shape == second.shape
    return float((np.abs(first - second).sum(axis=2) > 30).mean())


def _shot(driver, tmp_path: Path, name: str) -> None:  # noqa: ANN001
    assert driver.save_screenshot(str(tmp_path / name))
    copy_screenshot(tmp_path / name, OUTPUT / name)


def test_ohif_overlays_our_seg_and_lists_its_segments(case: dict, viewer, tmp_path: Path) -> None:  # noqa: ANN001
    server, driver = viewer
    (seg,) = case["by_modality"]["SEG"]
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    lesion = next(str(s.SegmentLabel) for s in seg.SegmentSequence
                  if s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003")
    _open_study(driver, server, case["study"])
    _double_click_series(driver, str(seg.SeriesDescription))
    # OHIF asks before it loads a segmentation into the viewport.
    wait_until(lambda: driver.find_elements("xpath", "//button[normalize-space()='Yes']"), LOAD_TIMEOUT_S,
               "the prompt to open the segmentation")
    driver.find_element("xpath", "//button[normalize-space()='Yes']").click()
    _click_when_present(driver, "[data-cy=panelSegmentation-btn]", "the segmentation panel button")
    wait_until(lambda: _row_titles(driver, "") == labels, LOAD_TIMEOUT_S, f"segments {labels} listed")

    # Selecting the lesion jumps to it; hiding the overlay changes the picture: the SEG is drawn.
    driver.find_element("xpath", f"//span[@data-cy='data-row-title' and text()='{lesion}']").click()
    wait_until(lambda: "I:1 " not in _viewport_text(driver), 30, "the jump to the lesion")
    time.sleep(2)  # let the overlay render at its new slice
    with_overlay = _viewport_png(driver)
    _shot(driver, tmp_path, "ohif-seg.png")
    driver.find_element(*_by("[data-cy=all-segments-visibility-toggle]")).click()
    time.sleep(2)
    assert _changed_fraction(with_overlay, _viewport_png(driver)) > 0.01


def _sr_findings(sr: pydicom.Dataset) -> list[tuple[str, str, str | None, bool]]:
    """(tracking UID, finding meaning, finding site meaning, is a lesion) of each finding, in report order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    findings: dict[str, tuple[str, str, str | None, bool]] = {}
    for group in hd.sr.utils.find_content_items(sr, name=codes.DCM.MeasurementGroup, recursive=True):
        items = group.ContentSequence
        uid = next(str(i.UID) for i in items if i.ValueType == "UIDREF")
        finding = next(str(i.ConceptCodeSequence[0].CodeMeaning) for i in items
                       if i.ConceptNameCodeSequence[0].CodeValue == "121071")
        site = next((str(i.ConceptCodeSequence[0].CodeMeaning) for i in items
                     if i.ConceptNameCodeSequence[0].CodeValue == "363698007"), None)
        lesion = any(i.ConceptNameCodeSequence[0].CodeValue == "276214006"  # Finding category
                     and i.ConceptCodeSequence[0].CodeValue == "49755003" for i in items)
        findings.setdefault(uid, (uid, finding, site, lesion))
    return list(findings.values())


def _point_slice(case: dict, sr: pydicom.Dataset, tracking_uid: str) -> int:
    """Instance Number of the CT slice that holds the finding's SCOORD3D point."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for group in hd.sr.utils.find_content_items(sr, name=codes.DCM.MeasurementGroup, recursive=True):
        if any(getattr(i, "UID", None) == tracking_uid for i in group.ContentSequence):
            for item in group.ContentSequence:
                if item.ValueType == "SCOORD3D":
                    point = np.asarray(item.GraphicData, dtype=float)
                    ct = min(case["cts"], key=lambda ds: abs(_plane_distance(ds, point)))
                    assert abs(_plane_distance(ct, point)) < 1e-3, "the point lies on an acquired slice"
                    return int(ct.InstanceNumber)
    raise AssertionError(f"no SCOORD3D for {tracking_uid}")


def _plane_distance(ds: pydicom.Dataset, point: np.ndarray) -> float:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(point - np.asarray(ds.ImagePositionPatient, dtype=float), normal))


def test_ohif_lists_our_sr_findings_and_shows_the_lesion_point(case: dict, viewer, tmp_path: Path) -> None:  # noqa: ANN001
    server, driver = viewer
    (sr,) = case["by_modality"]["SR"]
    findings = _sr_findings(sr)
    # A fresh viewer: loading an SR next to a hydrated SEG is another code path of OHIF's.
    _open_study(driver, server, case["study"])
    _double_click_series(driver, str(sr.SeriesDescription))
    _click_when_present(driver, "[data-cy=yes-hydrate-btn]", "the prompt to track the report's measurements")
    _click_when_present(driver, "[data-cy=trackedMeasurements-btn]", "the measurements panel button")
    panel = "[data-cy=trackedMeasurements-panel]"
    wait_until(lambda: len(_row_titles(driver, panel)) == len(findings), LOAD_TIMEOUT_S,
               f"{len(findings)} measurements listed")
    # OHIF names each finding by its Finding code's meaning, in the report's order.
    assert _row_titles(driver, panel) == [finding for _, finding, _, _ in findings]

    lesions = [(uid, site) for uid, _, site, lesion in findings if lesion]
    assert lesions, "the phantom's lesions were not reported"
    uid, site = lesions[0]
    index = [f[0] for f in findings].index(uid)
    driver.find_elements(*_by(f"{panel} [data-cy=data-row-title]"))[index].click()
    expected = _point_slice(case, sr, uid)
    # The overlay reads "I:<n> (<position>/<count>)"; OHIF sorts the slices as our InstanceNumbers do.
    position = f"({expected}/{len(case['cts'])})"
    try:
        wait_until(lambda: position in _viewport_text(driver), 30, f"the jump to slice {position}")
    finally:
        _shot(driver, tmp_path, "ohif-sr.png")
    row = driver.find_element(*_by(f"{panel} [data-cy=measurement-table-row-{index}]"))
    assert site in row.text


def test_ohif_shows_the_key_image(case: dict, viewer, tmp_path: Path) -> None:  # noqa: ANN001
    server, driver = viewer
    key_images = case["by_modality"].get("OT", [])
    if not key_images:
        pytest.skip("the cascade found no lesion, so there is no key image")
    _open_study(driver, server, case["study"])
    # The GSPS is listed (OHIF 3.13 marks it unsupported: it does not apply presentation states).
    (pr,) = case["by_modality"]["PR"]
    assert any(e.text.startswith(str(pr.SeriesDescription)[:40])
               for e in driver.find_elements(*_by("[data-cy=series-description-label]")))
    before = _viewport_png(driver)
    _double_click_series(driver, str(key_images[0].SeriesDescription))
    wait_until(lambda: "synthetic phantom" not in _viewport_text(driver), LOAD_TIMEOUT_S, "the key image is shown")
    time.sleep(2)
    assert _changed_fraction(before, _viewport_png(driver)) > 0.05
    _shot(driver, tmp_path, "ohif-key-image.png")
