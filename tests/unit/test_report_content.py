"""What a radiologist sees in the SR: site answers, risk tiers, opportunistic measures, lesion points.

Findings, site answers and measurements are built by hand on the real abdomen
series, encoded as SEG + TID 1500 SR, and read back by tools nobody here wrote:
dciodvfy (IOD rules), highdicom (content tree), dcmqi's tid1500reader
(measurement groups) and DCMTK's dsrdump (the whole tree, printed to
tests/output/sr-tree.txt for the README). The risk policy is tested on its own.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pipelines.analysis import SeriesAnalyzer
from pipelines.clinical.findings import CodeSpec, LesionFacts, SegmentFinding
from pipelines.clinical.results import (
    BoneDensityResult,
    BundleMeasurements,
    LungNodule,
    SiteResult,
    SteatosisResult,
)
from pipelines.clinical.risk import (
    RISK_TIERS,
    RiskAssessment,
    RiskPolicy,
    RiskPolicyError,
    bone_density_line,
    lung_nodule_lines,
    steatosis_line,
    summary_lines,
)
from pipelines.dicom_out.report import (
    PRIVATE_SCHEME,
    build_measurement_report,
    segment_point,
    voxel_to_patient,
)
from pipelines.dicom_out.segmentation import build_segmentation
from pipelines.dicom_out.uids import derive_uid, result_uids
from pipelines.errors import ResultEncodingError
from pipelines.model.bundle import ModelBundle
from pipelines.volume.ct import CTVolume, SourceFrame, load_series
from support.data import REPO, abdomen_files
from support.findings import algorithm_identity, segment_finding
from support.validators import dciodvfy, tid1500_json

OUTPUT = Path(__file__).parent.parent / "output"
DSRDUMP = Path("/usr/bin/dsrdump")
NOTICE = "For research use only. Not for use in diagnostic procedures."
MODEL_KEY = "reference-cascade@1.0.0+0badc0de"
ALGORITHM = algorithm_identity(MODEL_KEY)
ANATOMY = CodeSpec("91723000", "SCT", "Anatomical Structure")
LESION = CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")
PANCREAS = CodeSpec("15776009", "SCT", "Pancreas")
LUNG = CodeSpec("39607008", "SCT", "Lung")
PANCREAS_CANCER = CodeSpec("363418001", "SCT", "Malignant tumor of pancreas")
LIVER_CANCER = CodeSpec("93870000", "SCT", "Malignant neoplasm of liver")
COLON_CANCER = CodeSpec("363406005", "SCT", "Malignant tumor of colon")
LUNG_NODULE = CodeSpec("786838002", "SCT", "Nodule of lung")

PRESENT = ("52101004", "SCT")
ABSENT = ("272519000", "SCT")
UNDETERMINED = ("373068000", "SCT")


def _key(code) -> tuple[str, str]:  # noqa: ANN001
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


# --------------------------------------------------------------------------- findings by hand


def _segment(volume: CTVolume, number: int, label: str, category: CodeSpec, type_: CodeSpec,
             finding_site: CodeSpec | None, mask: np.ndarray, lesion: LesionFacts | None = None) -> SegmentFinding:
    return segment_finding(
        volume, number, label, mask, category=category, type=type_, finding_site=finding_site,
        tracking_id=f"{label} (test)", tracking_uid=derive_uid("tracking", volume.series_instance_uid, label),
        role="lesion" if lesion is not None else "organ", lesion=lesion,
    )


def _ball(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    k, r, c = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (k - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= radius**2


def _crescent(shape: tuple[int, ...], centre: tuple[int, int, int]) -> np.ndarray:
    """A thick half-ring in a few axial slices: its centre of mass lies outside it."""
    k, r, c = np.ogrid[tuple(slice(0, n) for n in shape)]
    ring = ((r - centre[1]) ** 2 + (c - centre[2]) ** 2 >= 3**2) & ((r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= 5**2)
    return ring & (c >= centre[2]) & (np.abs(k - centre[0]) <= 1)


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    return load_series(abdomen_files())


@pytest.fixture(scope="module")
def segments(volume: CTVolume) -> list[SegmentFinding]:
    body = volume.hu > -500
    # Off-diagonal centres (row != column), so that a row/column swap in the geometry shows.
    pancreas_lesion = _ball(volume.shape, (60, 58, 70), 3.2) & body
    lung_lesion = _crescent(volume.shape, (70, 45, 40))
    assert pancreas_lesion.sum() > 50 and lung_lesion.sum() > 50
    return [
        _segment(volume, 1, "Body", ANATOMY, CodeSpec("38266002", "SCT", "Entire body"), None, body),
        _segment(volume, 2, "pancreas lesion 1", LESION, CodeSpec("108369006", "SCT", "Neoplasm"), PANCREAS,
                 pancreas_lesion, LesionFacts(site="pancreas", score=0.93, long_axis_mm=21.0,
                                              short_axis_mm=18.0, malignancy=0.88, type="malignant")),
        _segment(volume, 3, "lung lesion 1", LESION, CodeSpec("27925004", "SCT", "Nodule"), LUNG,
                 lung_lesion, LesionFacts(site="lung", score=0.97, long_axis_mm=8.1, short_axis_mm=6.3)),
    ]


SITES = [
    SiteResult("pancreas", PANCREAS_CANCER, "present", 0.93, lesion_labels=("pancreas lesion 1 21 mm malignant",)),
    SiteResult("liver", LIVER_CANCER, "absent", 0.12),
    SiteResult("colon", COLON_CANCER, "not evaluable", 0.05, "colon cut by the field of view"),
    SiteResult("lung", LUNG_NODULE, "present", 0.97, lesion_labels=("lung lesion 1 8 mm",)),
]
MEASUREMENTS = BundleMeasurements(
    bone_density=BoneDensityResult(
        category="osteopenia", level="T12", level_reason="T12 substitutes: L1 is cut by the field of view",
        mean_hu=131.4, high_suspicion=False, roi_area_mm2=198.0, roi_slice=80, kvp=120.0, notes=(),
    ),
    steatosis=SteatosisResult(
        grade="mild", liver_mean_hu=44.2, spleen_mean_hu=56.0, liver_minus_spleen_hu=-11.8,
        liver_spleen_ratio=0.79, supporting_criteria=("liver - spleen -11.8 HU < -10 HU",),
        reason="liver mean 44.2 HU",
    ),
    lung_nodules=(LungNodule(label="lung lesion 1", mean_diameter_mm=7.2, volume_mm3=180.0, lung_rads="3"),),
)
NOT_EVALUABLE_MEASUREMENTS = BundleMeasurements(
    bone_density=BoneDensityResult(
        category="not evaluable", level=None, mean_hu=float("nan"), high_suspicion=False, roi_area_mm2=0.0,
        roi_slice=None, kvp=None, level_reason="L1 is not in the field of view; T12 is cut by the field of view",
    ),
    steatosis=SteatosisResult(grade="not evaluable", liver_mean_hu=float("nan"), spleen_mean_hu=None,
                              liver_minus_spleen_hu=None, liver_spleen_ratio=None, supporting_criteria=(),
                              reason="liver cut by the field of view"),
    lung_nodules=(),
)
POLICY = RiskPolicy({"default": (0.3, 0.6, 0.9), "pancreas": (0.2, 0.5, 0.8)}, refer_tiers=("high", "very high"))


def _build(volume, segments, seg, sites=SITES, measurements=MEASUREMENTS, risk=POLICY,  # noqa: ANN001
           points="lesions", **kwargs):  # noqa: ANN001, ANN003
    uids = result_uids(volume.series_instance_uid, MODEL_KEY)
    return build_measurement_report(
        volume, segments, seg, ALGORITHM,
        series_instance_uid=uids.sr_series_instance_uid, sop_instance_uid=uids.sr_sop_instance_uid,
        series_number=9902, series_description="AI reference-cascade report - RESEARCH USE ONLY",
        research_notice=NOTICE, sites=sites, measurements=measurements, risk=risk, points=points,
        **kwargs,
    )


@pytest.fixture(scope="module")
def seg(volume, segments):  # noqa: ANN001, ANN201
    uids = result_uids(volume.series_instance_uid, MODEL_KEY)
    return build_segmentation(
        volume, segments, ALGORITHM,
        series_instance_uid=uids.seg_series_instance_uid, sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=9901, series_description="AI reference-cascade SEG - RESEARCH USE ONLY",
        content_description=NOTICE,
    )


@pytest.fixture(scope="module")
def sr_path(volume, segments, seg, tmp_path_factory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("report") / "sr.dcm"
    _build(volume, segments, seg).save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def sr_not_evaluable_path(volume, segments, seg, tmp_path_factory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("report-ne") / "sr.dcm"
    _build(volume, segments, seg, measurements=NOT_EVALUABLE_MEASUREMENTS).save_as(path, enforce_file_format=True)
    return path


def _evaluations(path: Path) -> list[pydicom.Dataset]:
    """The items of the TID 1500 Qualitative Evaluations container, read through highdicom."""
    sr = hd.sr.srread(path)
    (container,) = hd.sr.utils.find_content_items(
        sr, name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"))
    return list(container.ContentSequence)


def _by_concept(items, value: str, scheme: str) -> list:  # noqa: ANN001
    return [i for i in items if _key(i.ConceptNameCodeSequence[0]) == (value, scheme)]


def _child(item, value: str, scheme: str):  # noqa: ANN001, ANN202
    found = _by_concept(item.get("ContentSequence", []), value, scheme)
    assert len(found) == 1, f"expected one {scheme} {value} under {item.ConceptNameCodeSequence[0].CodeMeaning}"
    return found[0]


# --------------------------------------------------------------------------- validators


#: dciodvfy checks Coding Scheme Designator against the defined terms of PS3.16 Table 8-1,
#: which no private scheme is in (PS3.16 8.2); the scheme is declared in (0008,0110) instead.
PRIVATE_SCHEME_WARNING = (
    f"Warning - Unrecognized defined term <{PRIVATE_SCHEME}> for value 1 of attribute <Coding Scheme Designator>"
)


@pytest.mark.parametrize("which", ["sr_path", "sr_not_evaluable_path"])
def test_sr_passes_dciodvfy(which, request):  # noqa: ANN001
    path = request.getfixturevalue(which)
    errors, warnings = dciodvfy(path)
    assert errors == [], "\n".join(errors)
    others = [w for w in warnings if w != PRIVATE_SCHEME_WARNING]
    assert others == [], "\n".join(others)
    # One warning per private code in the document, none for anything else.
    ds = pydicom.dcmread(path)
    private = [e for e in ds.iterall() if e.keyword == "CodingSchemeDesignator" and e.value == PRIVATE_SCHEME]
    assert len(warnings) == len(private) > 0


def test_dsrdump_prints_the_tree(sr_path):  # noqa: ANN001
    if not DSRDUMP.exists():
        pytest.fail("DCMTK's dsrdump is not installed (apt-get install dcmtk); run the README test command")
    proc = subprocess.run([str(DSRDUMP), "+Pc", "+Pt", "+Pl", str(sr_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    tree = proc.stdout
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "sr-tree.txt").write_text(tree)
    for text in ("Qualitative Evaluations", "Malignant tumor of pancreas", "Very high screening risk",
                 "Undetermined", "colon cut by the field of view", "Osteopenia", "Steatosis of liver",
                 "Lung-RADS 3", "SCOORD3D", "POINT"):
        assert text in tree, text


def test_tid1500reader_still_reads_the_groups(volume, segments, seg, sr_path, tmp_path):  # noqa: ANN001
    doc = tid1500_json(sr_path, tmp_path)
    assert doc["VerificationFlag"] == "UNVERIFIED"
    volumetric = {g["ReferencedSegment"]: g for g in doc["Measurements"] if "ReferencedSegment" in g}
    assert sorted(volumetric) == [s.number for s in segments]
    for finding in segments:
        group = volumetric[finding.number]
        assert group["TrackingUniqueIdentifier"] == finding.tracking_uid
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        values = {i["quantity"]["CodeValue"]: float(i["value"]) for i in group["measurementItems"]}
        assert values["118565006"] == pytest.approx(finding.volume_mm3, rel=1e-9)
        assert values["112031"] == pytest.approx(finding.mean_hu, rel=1e-9)
        if finding.lesion is not None and finding.lesion.malignancy is not None:
            assert values["111047"] == pytest.approx(finding.lesion.malignancy)
        if finding.lesion is not None and finding.lesion.long_axis_mm is not None:
            assert values["103339001"] == pytest.approx(finding.lesion.long_axis_mm)
    # One point group per lesion, without measurements (they stay in the volumetric group).
    points = [g for g in doc["Measurements"] if "ReferencedSegment" not in g]
    lesions = [s for s in segments if s.lesion is not None]
    assert sorted(g["TrackingUniqueIdentifier"] for g in points) == sorted(s.tracking_uid for s in lesions)
    assert all(g["measurementItems"] == [] for g in points)


# --------------------------------------------------------------------------- content


def test_private_scheme_is_declared(sr_path):  # noqa: ANN001
    ds = pydicom.dcmread(sr_path)
    assert ds.VerificationFlag == "UNVERIFIED"
    (item,) = [i for i in ds.CodingSchemeIdentificationSequence if i.CodingSchemeDesignator == PRIVATE_SCHEME]
    assert item.CodingSchemeName and item.CodingSchemeResponsibleOrganization
    used = {e.value for e in ds.iterall() if e.keyword == "CodingSchemeDesignator"}
    assert PRIVATE_SCHEME in used
    assert used - {"DCM", "SCT", "UCUM", "LN", "UMLS", "RFC5646", PRIVATE_SCHEME} == set()


def test_defaults_keep_the_previous_report(volume, segments, seg):  # noqa: ANN001
    """No site answers, measurements or points asked for: the SR is what it was before they existed."""
    sr = build_measurement_report(
        volume, segments, seg, ALGORITHM, series_instance_uid="2.25.1", sop_instance_uid="2.25.2",
        series_number=1, series_description="x", research_notice=NOTICE)
    assert "CodingSchemeIdentificationSequence" not in sr
    (container,) = hd.sr.utils.find_content_items(
        sr, name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"))
    assert [i.TextValue for i in container.ContentSequence] == [NOTICE]
    groups = hd.sr.utils.find_content_items(sr, name=codes.DCM.MeasurementGroup, recursive=True)
    assert len(groups) == len(segments)  # no point groups


def test_site_answers_round_trip(sr_path):  # noqa: ANN001
    items = _evaluations(sr_path)
    assert items[0].TextValue == NOTICE  # the research Comment stays first
    expected = {
        "363418001": (PRESENT, "RISKVERYHIGH", "373066001", 0.93),  # pancreas: own cut points, 0.93 >= 0.8
        "93870000": (ABSENT, "RISKLOW", "373067005", 0.12),
        "786838002": (PRESENT, "RISKVERYHIGH", "373066001", 0.97),
    }
    for code, (status, tier, refer, score) in expected.items():
        (item,) = _by_concept(items, code, "SCT")
        assert _key(item.ConceptCodeSequence[0]) == status
        assert _child(item, "RISKTIER", PRIVATE_SCHEME).ConceptCodeSequence[0].CodeValue == tier
        assert _key(_child(item, "REFER", PRIVATE_SCHEME).ConceptCodeSequence[0]) == (refer, "SCT")
        num = _child(item, "LESIONSCORE", PRIVATE_SCHEME)
        assert num.RelationshipType == "INFERRED FROM"
        value = num.MeasuredValueSequence[0]
        assert float(value.NumericValue) == pytest.approx(score)
        assert _key(value.MeasurementUnitsCodeSequence[0]) == ("1", "UCUM")


def test_not_evaluable_site_has_reason_and_no_tier(sr_path):  # noqa: ANN001
    (colon,) = _by_concept(_evaluations(sr_path), "363406005", "SCT")
    assert _key(colon.ConceptCodeSequence[0]) == UNDETERMINED
    assert _child(colon, "NOTEVALREASON", PRIVATE_SCHEME).TextValue == "colon cut by the field of view"
    assert _by_concept(colon.ContentSequence, "RISKTIER", PRIVATE_SCHEME) == []
    assert _by_concept(colon.ContentSequence, "LESIONSCORE", PRIVATE_SCHEME) == []


def test_present_site_points_at_its_lesion_group(segments, sr_path):  # noqa: ANN001
    (pancreas,) = _by_concept(_evaluations(sr_path), "363418001", "SCT")
    uids = [i.UID for i in _by_concept(pancreas.ContentSequence, "112040", "DCM")]
    assert uids == [segments[1].tracking_uid]


def test_bone_density_steatosis_and_lung_rads(segments, sr_path):  # noqa: ANN001
    items = _evaluations(sr_path)
    (bone,) = _by_concept(items, "121071", "DCM")
    assert _key(bone.ConceptCodeSequence[0]) == ("312894000", "SCT")  # Osteopenia
    assert _key(_child(bone, "363698007", "SCT").ConceptCodeSequence[0]) == ("23215003", "SCT")  # T12
    hu = _child(bone, "112031", "DCM")
    assert float(hu.MeasuredValueSequence[0].NumericValue) == pytest.approx(131.4)
    assert _key(hu.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]) == ("[hnsf'U]", "UCUM")
    assert _key(_child(hu, "121401", "DCM").ConceptCodeSequence[0]) == ("373098007", "SCT")  # Mean
    kvp = _child(hu, "113733", "DCM")
    assert kvp.RelationshipType == "HAS ACQ CONTEXT" and float(kvp.MeasuredValueSequence[0].NumericValue) == 120
    basis = _child(bone, "ASSESSBASIS", PRIVATE_SCHEME).TextValue
    assert "T12 substitutes: L1 is cut by the field of view" in basis and "120 kVp" in basis

    (fat,) = _by_concept(items, "197321007", "SCT")
    assert _key(fat.ConceptCodeSequence[0]) == PRESENT
    assert _child(fat, "246112005", "SCT").TextValue == "mild"
    means = {
        _key(_child(n, "363698007", "SCT").ConceptCodeSequence[0])[0]: float(n.MeasuredValueSequence[0].NumericValue)
        for n in _by_concept(fat.ContentSequence, "112031", "DCM")
    }
    assert means == {"10200004": pytest.approx(44.2), "78961009": pytest.approx(56.0)}

    (nodule,) = _by_concept(items, "LUNGRADS", PRIVATE_SCHEME)
    assert _key(nodule.ConceptCodeSequence[0]) == ("LUNGRADS3", PRIVATE_SCHEME)
    assert nodule.ConceptCodeSequence[0].CodeMeaning == "Lung-RADS 3"
    assert float(_child(nodule, "81827009", "SCT").MeasuredValueSequence[0].NumericValue) == pytest.approx(7.2)
    assert float(_child(nodule, "118565006", "SCT").MeasuredValueSequence[0].NumericValue) == pytest.approx(180.0)
    assert _child(nodule, "112040", "DCM").UID == segments[2].tracking_uid


def test_not_evaluable_measurements(sr_not_evaluable_path):  # noqa: ANN001
    items = _evaluations(sr_not_evaluable_path)
    (bone,) = _by_concept(items, "121071", "DCM")
    assert _key(bone.ConceptCodeSequence[0]) == UNDETERMINED
    assert "T12 is cut by the field of view" in _child(bone, "NOTEVALREASON", PRIVATE_SCHEME).TextValue
    assert _by_concept(bone.ContentSequence, "112031", "DCM") == []
    (fat,) = _by_concept(items, "197321007", "SCT")
    assert _key(fat.ConceptCodeSequence[0]) == UNDETERMINED
    assert _child(fat, "NOTEVALREASON", PRIVATE_SCHEME).TextValue == "liver cut by the field of view"
    assert _by_concept(items, "LUNGRADS", PRIVATE_SCHEME) == []


def _patient_to_voxel(volume: CTVolume, point: np.ndarray) -> tuple[int, int, int]:
    """Inverse of PS3.3 C.7.6.2.1.1 from the slices' own IPP/IOP/Pixel Spacing headers."""
    normal = volume.slice_direction
    distances = [float(np.dot(ds.ImagePositionPatient, normal)) for ds in volume.datasets]
    k = int(np.argmin(np.abs(np.asarray(distances) - float(np.dot(point, normal)))))
    ds = volume.datasets[k]
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    offset = point - np.asarray(ds.ImagePositionPatient, dtype=float)
    column = float(np.dot(offset, iop[:3])) / float(ds.PixelSpacing[1])
    row = float(np.dot(offset, iop[3:])) / float(ds.PixelSpacing[0])
    return k, int(round(row)), int(round(column))


def test_lesion_points_lie_inside_their_masks(volume, segments, sr_path):  # noqa: ANN001
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_planar_roi_measurement_groups()
    by_uid = {s.tracking_uid: s for s in segments}
    assert sorted(g.tracking_uid for g in groups) == sorted(s.tracking_uid for s in segments[1:])
    purposes = {}
    for group in groups:
        (region,) = group.roi if isinstance(group.roi, list) else [group.roi]
        assert region.GraphicType == "POINT" and region.ValueType == "SCOORD3D"
        assert region.ReferencedFrameOfReferenceUID == volume.frame_of_reference_uid
        point = np.asarray(region.GraphicData, dtype=float)
        lesion = by_uid[group.tracking_uid]
        assert lesion.mask[_patient_to_voxel(volume, point)], lesion.label
        (purpose,) = group.get_qualitative_evaluations(name=codes.DCM.GeometricPurposeOfRegion)
        purposes[lesion.label] = purpose.value.value
        assert group.finding_type.value == lesion.type.value
    # The ball's centre of mass is on the ball; the crescent's is not, so a lesion voxel stands in.
    assert purposes == {"pancreas lesion 1": "128138", "lung lesion 1": "128140"}


def test_every_segment_gets_a_point_on_it_when_asked(volume, segments, seg, tmp_path):  # noqa: ANN001
    """points="all" (what the node writes): OHIF 3.13 fails on a finding with no coordinate at all."""
    _build(volume, segments, seg, points="all").save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    groups = {g.tracking_uid: g for g in hd.sr.srread(tmp_path / "sr.dcm").content.get_planar_roi_measurement_groups()}
    assert sorted(groups) == sorted(s.tracking_uid for s in segments)
    planes = np.asarray([float(np.dot(ds.ImagePositionPatient, volume.slice_direction)) for ds in volume.datasets])
    for segment in segments:
        (region,) = [groups[segment.tracking_uid].roi]
        point = np.asarray(region.GraphicData, dtype=float)
        assert segment.mask[_patient_to_voxel(volume, point)], segment.label
        # On an acquired slice: OHIF shows no point that lies between two.
        assert np.abs(planes - float(np.dot(point, volume.slice_direction))).min() < 1e-3, segment.label
    with pytest.raises(ValueError, match="points must be one of none, lesions, all"):
        _build(volume, segments, seg, points="organs")


def test_voxel_to_patient_on_an_oblique_grid():
    # A rotated, anisotropic grid: compare with the closed form of PS3.3 C.7.6.2.1.1.
    angle = np.deg2rad(20)
    row_dir = np.array([np.cos(angle), np.sin(angle), 0.0])
    col_dir = np.array([-np.sin(angle) * np.cos(0.3), np.cos(angle) * np.cos(0.3), np.sin(0.3)])
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-120.0, 35.5, 410.0])
    frames = [SourceFrame(0, 1, tuple(origin + k * 2.5 * normal)) for k in range(4)]
    volume = CTVolume([], frames, np.zeros((4, 6, 8), np.float32), row_dir, col_dir, normal, (0.7, 0.9), 2.5)
    for index in [(0, 0, 0), (3, 5, 7), (1.5, 2.25, 6.0)]:
        k, r, c = index
        expected = origin + k * 2.5 * normal + r * 0.7 * col_dir + c * 0.9 * row_dir
        assert voxel_to_patient(volume, index) == pytest.approx(expected, abs=1e-9)
        assert voxel_to_patient(volume, index) == pytest.approx(volume.voxel_to_lps(index), abs=1e-9)
    with pytest.raises(ResultEncodingError, match="outside"):
        voxel_to_patient(volume, (4, 0, 0))


def test_segment_point_of_an_empty_mask_is_refused():
    with pytest.raises(ResultEncodingError, match="non-empty"):
        segment_point(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0))


def test_bad_site_answers_are_refused(volume, segments, seg):  # noqa: ANN001
    # The typed results refuse bad values when they are built, naming them.
    with pytest.raises(ValueError, match="maybe"):
        replace(SITES[0], status="maybe")
    with pytest.raises(ValueError, match="within 0..1"):
        replace(SITES[1], score=1.5)
    with pytest.raises(TypeError, match="CodeSpec"):
        replace(SITES[1], finding="liver cancer")
    with pytest.raises(ValueError, match="lung_rads"):
        replace(MEASUREMENTS.lung_nodules[0], lung_rads="7")
    with pytest.raises(ValueError, match="finite"):
        replace(MEASUREMENTS.steatosis, liver_mean_hu=float("nan"))
    with pytest.raises(ValueError, match="lesion"):
        replace(segments[0], role="lesion")
    with pytest.raises(ResultEncodingError, match="BundleMeasurements"):
        _build(volume, segments, seg, measurements={"lung_nodules": []})
    with pytest.raises(TypeError, match="RiskPolicy"):
        _build(volume, segments, seg, risk={"default": [0.1, 0.2, 0.3]})


def test_real_analysis_output_encodes(volume, tmp_path):  # noqa: ANN001
    """The reference cascade's own findings, site answers and measurement dicts, as SeriesAnalyzer makes them."""
    bundle = ModelBundle(REPO / "onnx_models" / "reference-cascade", providers=["CPUExecutionProvider"])
    findings, sites, measurements = SeriesAnalyzer(bundle).findings(volume)
    assert sites and None not in (measurements.bone_density, measurements.steatosis, measurements.lung_nodules)
    uids = result_uids(volume.series_instance_uid, bundle.key)
    seg = build_segmentation(
        volume, findings, ALGORITHM, series_instance_uid=uids.seg_series_instance_uid,
        sop_instance_uid=uids.seg_sop_instance_uid, series_number=9901, series_description="AI SEG",
        content_description=NOTICE)
    sr = build_measurement_report(
        volume, findings, seg, ALGORITHM, series_instance_uid=uids.sr_series_instance_uid,
        sop_instance_uid=uids.sr_sop_instance_uid, series_number=9902, series_description="AI report",
        research_notice=NOTICE, sites=sites, measurements=measurements, points="all")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == [] and [w for w in warnings if w != PRIVATE_SCHEME_WARNING] == []
    items = _evaluations(path)
    statuses = {"present": PRESENT, "absent": ABSENT, "not evaluable": UNDETERMINED}
    for site in sites:
        (item,) = _by_concept(items, site.finding.value, site.finding.scheme)
        assert _key(item.ConceptCodeSequence[0]) == statuses[site.status], site.site
    by_uid = {f.tracking_uid: f for f in findings}
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert sorted(g.tracking_uid for g in groups) == sorted(by_uid)
    for group in groups:
        (region,) = group.roi if isinstance(group.roi, list) else [group.roi]
        assert by_uid[group.tracking_uid].mask[_patient_to_voxel(volume, np.asarray(region.GraphicData, float))]


# --------------------------------------------------------------------------- risk policy


def test_tier_boundaries():
    policy = RiskPolicy({"default": (0.3, 0.6, 0.9)})
    cases = {0.0: "low", 0.2999: "low", 0.3: "intermediate", 0.5999: "intermediate", 0.6: "high",
             0.8999: "high", 0.9: "very high", 1.0: "very high"}
    for score, tier in cases.items():
        assert policy.tier("liver", score) == tier, score
    assert RiskPolicy().cut_points("anything") == (0.3, 0.6, 0.9)
    site_specific = RiskPolicy({"pancreas": (0.2, 0.5, 0.8)})
    assert site_specific.tier("pancreas", 0.8) == "very high"
    assert site_specific.tier("liver", 0.8) == "high"  # the default cut points
    for bad in (-0.01, 1.01, float("nan"), True, "0.5"):
        with pytest.raises(RiskPolicyError, match="liver"):
            policy.tier("liver", bad)


@pytest.mark.parametrize(
    ("thresholds", "refer", "message"),
    [
        ({"pancreas": (0.5, 0.4, 0.9)}, None, r"'pancreas'.*ascending"),
        ({"pancreas": (0.2, 0.2, 0.9)}, None, r"'pancreas'.*ascending"),
        ({"liver": (0.2, 0.5, 1.2)}, None, r"'liver'.*0\.\.1"),
        ({"liver": (-0.1, 0.5, 0.9)}, None, r"'liver'.*0\.\.1"),
        ({"colon": (0.2, 0.5)}, None, r"'colon'.*three"),
        ({"colon": "0.2, 0.5, 0.9"}, None, r"'colon'.*three"),
        ({"colon": (0.2, "x", 0.9)}, None, r"'colon'.*number"),
        ({"default": (0.2, 0.5, float("inf"))}, None, r"'default'.*finite"),
        ({"": (0.2, 0.5, 0.9)}, None, "site names"),
        ({}, ("urgent",), "urgent"),
        ({}, ("intermediate",), "highest tiers"),
        ({}, ("very high", "very high"), "twice"),
        ({}, "high", "list of tier names"),
    ],
)
def test_policy_validation_names_the_offender(thresholds, refer, message):  # noqa: ANN001
    with pytest.raises(RiskPolicyError, match=message):
        RiskPolicy(thresholds, refer) if refer is not None else RiskPolicy(thresholds)
    assert issubclass(RiskPolicyError, ValueError)


def test_policy_from_toml_table():
    import tomllib

    table = tomllib.loads(
        '[results.risk]\ndefault = [0.3, 0.6, 0.9]\npancreas = [0.2, 0.5, 0.8]\nrefer = ["very high"]\n'
    )["results"]["risk"]
    policy = RiskPolicy.from_mapping(table)
    assert policy.cut_points("pancreas") == (0.2, 0.5, 0.8)
    assert policy.cut_points("liver") == (0.3, 0.6, 0.9)
    assert policy.refer_tiers == ("very high",)
    assert RiskPolicy.from_mapping(None) == RiskPolicy() == RiskPolicy.from_mapping({})
    assert RiskPolicy().refer_tiers == ("high", "very high")
    assert RiskPolicy({}, ()).refer_tiers == ()
    with pytest.raises(RiskPolicyError, match="'stomach'"):
        RiskPolicy.from_mapping({"stomach": [0.9, 0.5, 0.1]})
    with pytest.raises(RiskPolicyError, match="table"):
        RiskPolicy.from_mapping([0.1, 0.2, 0.3])  # type: ignore[arg-type]


def test_assessments_and_summary_lines():
    policy = RiskPolicy({"pancreas": (0.2, 0.5, 0.8)})
    pancreas, liver, colon, lung = (policy.assess(s) for s in SITES)
    assert pancreas == RiskAssessment("pancreas", "present", 0.93, "very high", True,
                                      "pancreas: lesion present, score 0.93, risk very high \u2014 abnormal: refer")
    assert liver.line == "liver: no lesion, score 0.12, risk low" and not liver.refer
    assert colon == RiskAssessment("colon", "not evaluable", 0.05, None, False,
                                   "colon: not evaluable (colon cut by the field of view)")
    absent_but_high = policy.assess(SiteResult("liver", LIVER_CANCER, "absent", 0.95))
    assert absent_but_high.refer and absent_but_high.line.endswith("refer for review")
    low_present = policy.assess(SiteResult("liver", LIVER_CANCER, "present", 0.55))
    assert low_present.tier == "intermediate" and not low_present.refer
    assert [t for t in RISK_TIERS] == ["low", "intermediate", "high", "very high"]

    assert MEASUREMENTS.bone_density is not None and NOT_EVALUABLE_MEASUREMENTS.bone_density is not None
    bone = replace(MEASUREMENTS.bone_density, level="L1", mean_hu=131.0)
    assert bone_density_line(bone) == "bone density: osteopenia (L1 trabecular 131 HU at 120 kVp)"
    assert bone_density_line(replace(bone, kvp=None)).endswith("HU kVp not recorded)")
    assert bone_density_line(NOT_EVALUABLE_MEASUREMENTS.bone_density) == (
        "bone density: not evaluable (L1 is not in the field of view; T12 is cut by the field of view)")
    assert MEASUREMENTS.steatosis is not None and NOT_EVALUABLE_MEASUREMENTS.steatosis is not None
    assert steatosis_line(MEASUREMENTS.steatosis) == (
        "hepatic steatosis: mild (liver mean 44 HU, liver - spleen -12 HU)")
    assert steatosis_line(NOT_EVALUABLE_MEASUREMENTS.steatosis) == (
        "hepatic steatosis: not evaluable (liver cut by the field of view)")
    assert lung_nodule_lines(MEASUREMENTS.lung_nodules or ()) == ["lung nodule: 7.2 mm, Lung-RADS 3"]
    assert lung_nodule_lines([]) == ["lung nodules: none found"]
    lines = summary_lines(SITES, MEASUREMENTS, policy)
    assert lines[:4] == [a.line for a in (pancreas, liver, colon, lung)]
    assert lines[4:] == [bone_density_line(MEASUREMENTS.bone_density), steatosis_line(MEASUREMENTS.steatosis),
                         "lung nodule: 7.2 mm, Lung-RADS 3"]
