"""Findings -> a TID 1500 Measurement Report in a Comprehensive 3D SR.

Layout (PS3.16 TID 1500, IHE AI Results):

- observation context: the algorithm as a device observer (TID 1001/1004);
- Procedure reported: the CT that was analysed, not the algorithm;
- Imaging Measurements: one TID 1411 "Volumetric ROI Measurements" group per
  segment, with tracking identifier and UID, Finding, Finding Site, the
  Referenced Segment in the SEG, Source series for segmentation, algorithm
  identification (TID 4019), Volume and mean Attenuation Coefficient;
- with ``points`` ("lesions" or "all"), for each lesion (or every segment) a
  TID 1410 "Planar ROI Measurements" group with the same tracking identifier
  and UID, whose Image Region is a SCOORD3D POINT on the segment in patient
  coordinates (the CT's Frame of Reference), for viewers that place findings
  by coordinates rather than by SEG. The node writes "all": OHIF (3.13)
  merges the groups of one tracking UID and fails on a finding that has no
  coordinate at all;
- Qualitative Evaluations (TID 1500 rows 12-14): a TEXT Comment with the
  research-use notice, since DICOM has no research-only flag; then, when
  given, one CODE per screened site (the site's finding = Present / Absent /
  Undetermined, with its score, risk tier, referral flag or the reason it was
  not evaluable), bone density, hepatic steatosis and one Lung-RADS category
  per lung nodule, each with the numbers it rests on.

Concepts without a standard code use the private scheme :data:`PRIVATE_SCHEME`,
declared in the Coding Scheme Identification Sequence (0008,0110) whenever
the document uses it (PS3.3 C.12.1.1.2.1, PS3.16 8.2).

The document is UNVERIFIED and PRELIMINARY: no person has checked it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TypedDict

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage

from pipelines.clinical.findings import (
    LESION_ROLE,
    AlgorithmIdentity,
    CodeSpec,
    SegmentFinding,
)
from pipelines.clinical.results import (
    ABSENT,
    NOT_EVALUABLE,
    NOTHING_MEASURED,
    PRESENT,
    BoneDensityResult,
    BundleMeasurements,
    LungNodule,
    SiteResult,
    SteatosisResult,
)
from pipelines.clinical.risk import RiskAssessment, RiskPolicy, RiskPolicyError
from pipelines.dicom_out.segmentation import (
    LABEL_MAP_SEGMENTATION_STORAGE,
    SEGMENTATION_STORAGE,
    algorithm_equipment,
    check_algorithm,
    check_long_string,
    coded,
    set_device_uid,
    source_character_set,
)
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume

COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"

#: UCUM units (PS3.16 CID 7181 / CID 83 use UCUM; "ml" is not a DICOM volume unit).
UNIT_MM3 = hd.sr.CodedConcept(value="mm3", scheme_designator="UCUM", meaning="cubic millimeter")
UNIT_HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")

#: TID 1500 row 12 container for evaluations of the whole report subject.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)

DEFAULT_PROCEDURE = CodeSpec("29252-4", "LN", "CT Chest WO contrast")

Relationship = hd.sr.RelationshipTypeValues

# --------------------------------------------------------------------------- codes

#: Private coding scheme of this project (PS3.16 8.2: "99" prefix), declared
#: in the Coding Scheme Identification Sequence of every SR that uses it.
PRIVATE_SCHEME = "99PACSAI"
PRIVATE_SCHEME_NAME = "PACS AI screening node private codes"
PRIVATE_SCHEME_ORGANIZATION = "PACS-AI open-source project"


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


#: Values of a site's finding: PS3.16 CID 240 "Present-Absent", extended with
#: "Undetermined" (SNOMED CT qualifier value 373068000, which SNOMED pairs with
#: Present / Absent) for a site that could not be evaluated; the reason follows
#: as a TEXT child. Never "Absent" for an organ cut off by the field of view.
PRESENT_CODE = _sct("52101004", "Present")
ABSENT_CODE = _sct("272519000", "Absent")
UNDETERMINED_CODE = _sct("373068000", "Undetermined")
STATUS_CODES = {PRESENT: PRESENT_CODE, ABSENT: ABSENT_CODE, NOT_EVALUABLE: UNDETERMINED_CODE}

#: The site score is the lesion detector's output, not a probability of
#: malignancy, so it is not DCM 111047 "Probability of cancer" (that concept is
#: used in the lesion groups for the typing stage's malignancy probability).
LESION_DETECTION_SCORE = _private("LESIONSCORE", "Lesion detection score")
#: Risk tiers are the site's operating points on an AI score, not a clinical
#: risk scale such as SNOMED's "High risk" qualifiers: private codes.
RISK_TIER = _private("RISKTIER", "Screening risk tier")
RISK_TIER_CODES = {
    "low": _private("RISKLOW", "Low screening risk"),
    "intermediate": _private("RISKINTERMEDIATE", "Intermediate screening risk"),
    "high": _private("RISKHIGH", "High screening risk"),
    "very high": _private("RISKVERYHIGH", "Very high screening risk"),
}
REFER = _private("REFER", "Refer for radiologist review")
NOT_EVALUABLE_REASON = _private("NOTEVALREASON", "Reason not evaluable")
ASSESSMENT_BASIS = _private("ASSESSBASIS", "Basis of assessment")

#: Bone density (Pickhardt et al. 2013): the finding at L1 (or T12).
OSTEOPOROSIS = _sct("64859006", "Osteoporosis")
OSTEOPENIA = _sct("312894000", "Osteopenia")
#: No SNOMED CT finding for "normal bone density" could be confirmed: private.
NORMAL_BONE_DENSITY = _private("NORMALBMD", "Normal bone density")
BONE_DENSITY_CODES = {"osteoporosis": OSTEOPOROSIS, "osteopenia": OSTEOPENIA, "normal": NORMAL_BONE_DENSITY}
VERTEBRA_CODES = {"L1": _sct("66794005", "L1 vertebra"), "T12": _sct("23215003", "T12 vertebra")}
KVP = hd.sr.CodedConcept(value="113733", scheme_designator="DCM", meaning="KVP")
UNIT_KV = hd.sr.CodedConcept(value="kV", scheme_designator="UCUM", meaning="kilovolt")

#: Hepatic steatosis: present / absent, graded in a Severity (SCT 246112005) TEXT.
STEATOSIS_OF_LIVER = _sct("197321007", "Steatosis of liver")
SEVERITY = _sct("246112005", "Severity")
STEATOSIS_GRADES = ("none", "mild", "moderate-severe")
LIVER = _sct("10200004", "Liver")
SPLEEN = _sct("78961009", "Spleen")

#: Lung-RADS v2022 has no SNOMED CT or DCM codes: private codes.
LUNG_RADS_CATEGORY = _private("LUNGRADS", "Lung-RADS v2022 category")
LUNG_RADS_CODES = {c: _private(f"LUNGRADS{c}", f"Lung-RADS {c}") for c in ("0", "1", "2", "3", "4A", "4B", "4X")}
DIAMETER = _sct("81827009", "Diameter")

#: Lesion point: TID 1410 Geometric purpose of region (PS3.16 CID 219).
#: Which segments get a SCOORD3D point group (see :func:`build_measurement_report`).
POINTS = ("none", "lesions", "all")
CENTER_OF_MASS = hd.sr.CodedConcept(value="128138", scheme_designator="DCM", meaning="Center of Mass")
REPRESENTATIVE_POINT = hd.sr.CodedConcept(value="128140", scheme_designator="DCM", meaning="Representative point")


def _finite(value: float, what: str) -> float:
    """``value`` as a float; NaN and infinity cannot be encoded as DS (PS3.5 6.2)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ResultEncodingError(f"{what} is not a number: {value!r}") from exc
    if not math.isfinite(number):
        raise ResultEncodingError(f"{what} is not finite: {value!r}")
    return number


def _check_segmentation(
    volume: CTVolume, segments: Sequence[SegmentFinding], segmentation: hd.seg.Segmentation
) -> None:
    """The SEG must be ours for this volume: same study, same CT series, all segments present."""
    if str(segmentation.SOPClassUID) not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
        raise ResultEncodingError(
            f"segmentation has SOP class {segmentation.SOPClassUID}, expected {SEGMENTATION_STORAGE} "
            f"or {LABEL_MAP_SEGMENTATION_STORAGE}"
        )
    if str(segmentation.StudyInstanceUID) != volume.study_instance_uid:
        raise ResultEncodingError(
            f"segmentation is in study {segmentation.StudyInstanceUID}, the CT in {volume.study_instance_uid}"
        )
    referenced = {str(item.SeriesInstanceUID) for item in segmentation.get("ReferencedSeriesSequence", [])}
    if volume.series_instance_uid not in referenced:
        raise ResultEncodingError(
            f"segmentation does not reference CT series {volume.series_instance_uid} "
            f"(it references {sorted(referenced)})"
        )
    in_seg = {int(item.SegmentNumber): item for item in segmentation.SegmentSequence}
    for seg in segments:
        item = in_seg.get(seg.number)
        if item is None:
            raise ResultEncodingError(
                f"segment {seg.number} ({seg.label!r}) is not in the segmentation (segments {sorted(in_seg)})"
            )
        if str(item.get("TrackingUID", "")) != seg.tracking_uid:
            raise ResultEncodingError(
                f"segment {seg.number}: Tracking UID {item.get('TrackingUID')!r} in the SEG, "
                f"{seg.tracking_uid!r} in the finding"
            )


def _measurement_group(
    volume: CTVolume,
    seg: SegmentFinding,
    segmentation: hd.seg.Segmentation,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group for one segment."""
    # Built explicitly: ReferencedSegment.from_segmentation() raises
    # AttributeError on single-segment SEGs in highdicom 0.28.2.
    referenced_segment = hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=seg.number,
        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=_finite(seg.volume_mm3, f"segment {seg.number} volume_mm3"),
            unit=UNIT_MM3,
        ),
        hd.sr.Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=_finite(seg.mean_hu, f"segment {seg.number} mean_hu"),
            unit=UNIT_HU,
            derivation=codes.SCT.Mean,
        ),
    ]
    # Lesions: axial long and short axes, and the typing stage's probability of cancer.
    lesion = seg.lesion
    if lesion is not None:
        for key, name, axis in (("long_axis_mm", codes.SCT.LongAxis, lesion.long_axis_mm),
                                ("short_axis_mm", codes.SCT.ShortAxis, lesion.short_axis_mm)):
            if axis is not None:
                measurements.append(hd.sr.Measurement(
                    name=name, value=_finite(axis, f"segment {seg.number} {key}"), unit=codes.UCUM.Millimeter))
        if lesion.malignancy is not None:
            measurements.append(hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=_finite(lesion.malignancy, f"segment {seg.number} probability of cancer"),
                unit=codes.UCUM.NoUnits,
            ))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=referenced_segment, measurements=measurements, **_finding_identity(seg, algorithm_id))


class _FindingIdentity(TypedDict):
    """Keyword arguments of a TID 1410 / 1411 measurement group that identify its finding."""

    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: hd.sr.CodedConcept
    finding_category: hd.sr.CodedConcept
    finding_sites: list[hd.sr.FindingSite] | None
    algorithm_id: hd.sr.AlgorithmIdentification


def _finding_identity(seg: SegmentFinding, algorithm_id: hd.sr.AlgorithmIdentification) -> _FindingIdentity:
    """What every measurement group of one segment says alike: tracking identifier and UID, finding,
    category, site and algorithm. Viewers (OHIF) merge a finding's groups by its tracking UID."""
    finding_sites = [hd.sr.FindingSite(anatomic_location=coded(seg.finding_site))] if seg.finding_site else None
    return {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=seg.tracking_uid, identifier=seg.tracking_id),
        "finding_type": coded(seg.type),
        "finding_category": coded(seg.category),
        "finding_sites": finding_sites,
        "algorithm_id": algorithm_id,
    }


# --------------------------------------------------------------------------- lesion points


def is_lesion(seg: SegmentFinding) -> bool:
    """Whether a segment is a lesion (analysis role, or the SEG lesion category SCT 49755003)."""
    return seg.role == LESION_ROLE or seg.category.value == "49755003"


def voxel_to_patient(volume: CTVolume, index_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
    """Patient (LPS, mm) coordinates of a possibly fractional (slice, row, column) index.

    PS3.3 C.7.6.2.1.1: a pixel at row ``r``, column ``c`` of a frame lies at
    ``IPP + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] * column_direction``.
    ``IPP`` is the frame's own Image Position (Patient) (``volume.frames``),
    interpolated linearly between frames for a fractional slice index.
    """
    k, r, c = (float(v) for v in index_zyx)
    count = len(volume.frames)
    if not (-0.5 <= k <= count - 0.5 and -0.5 <= r <= volume.shape[1] - 0.5 and -0.5 <= c <= volume.shape[2] - 0.5):
        raise ResultEncodingError(f"voxel index {(k, r, c)} is outside the volume of shape {volume.shape}")
    positions = np.asarray([frame.position for frame in volume.frames], dtype=float)
    if count == 1:
        base = positions[0] + k * volume.slice_spacing * volume.slice_direction
    else:
        k0 = min(max(int(math.floor(k)), 0), count - 2)
        base = positions[k0] + (k - k0) * (positions[k0 + 1] - positions[k0])
    return np.asarray(
        base
        + r * volume.pixel_spacing[0] * np.asarray(volume.column_direction, dtype=float)
        + c * volume.pixel_spacing[1] * np.asarray(volume.row_direction, dtype=float)
    )


def segment_point(mask: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, hd.sr.CodedConcept]:
    """A point of ``mask`` (voxel index, slice/row/column) and its geometric purpose.

    The centre of mass when the voxel it falls in belongs to the segment
    (DCM 128138 "Center of Mass"); otherwise (a crescent, a ring, both lungs)
    the segment voxel nearest to it in mm (DCM 128140 "Representative point"),
    so that the point always lies on the lesion or organ.

    The point is moved along the slice axis onto the nearest acquired slice
    (at most half a slice spacing): viewers that draw SCOORD3D on the source
    images (OHIF) find no image for a point between two slices.
    """
    if mask.dtype != bool or mask.ndim != 3 or not mask.any():
        raise ResultEncodingError(f"segment mask must be a non-empty 3-D boolean array, got {mask.dtype} {mask.shape}")
    centre = np.asarray(ndimage.center_of_mass(mask), dtype=float)
    centre[0] = float(np.rint(centre[0]))
    nearest = tuple(int(v) for v in np.clip(np.rint(centre), 0, np.asarray(mask.shape) - 1))
    if mask[nearest]:
        return centre, CENTER_OF_MASS
    voxels = np.argwhere(mask)
    distance = (((voxels - centre) * np.asarray(spacing_zyx, dtype=float)) ** 2).sum(axis=1)
    return voxels[int(np.argmin(distance))].astype(float), REPRESENTATIVE_POINT


def _point_group(
    volume: CTVolume, seg: SegmentFinding, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group locating one segment by a SCOORD3D POINT in the CT's Frame of Reference.

    TID 1411 allows one ROI reference per group (the Referenced Segment here),
    and its SCOORD3D "Volume Surface" is meant for surfaces; TID 1410's Image
    Region may be SCOORD3D, so the point gets a planar group of its own with
    the segment's Tracking Identifier and Tracking UID (one finding, two
    representations) and no measurements (they are in the TID 1411 group).
    """
    if seg.mask.shape != volume.shape:
        raise ResultEncodingError(
            f"segment {seg.number}: mask shape {seg.mask.shape} is not the volume's {volume.shape}")
    index, purpose = segment_point(seg.mask, volume.spacing_zyx)
    point = voxel_to_patient(volume, index)
    region = hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=point.reshape(1, 3),
        frame_of_reference_uid=volume.frame_of_reference_uid,
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=region, geometric_purpose=purpose, **_finding_identity(seg, algorithm_id))


# --------------------------------------------------------------------------- qualitative evaluations


def _code(name: hd.sr.CodedConcept, value: hd.sr.CodedConcept, relationship: Relationship,
          children: Sequence[hd.sr.ContentItem] = ()) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(name=name, value=value, relationship_type=relationship)
    if children:
        item.ContentSequence = hd.sr.ContentSequence(list(children))
    return item


def _text(name: hd.sr.CodedConcept, value: str, relationship: Relationship) -> hd.sr.TextContentItem:
    if not isinstance(value, str) or not value.strip():
        raise ResultEncodingError(f"{name.meaning}: expected a non-empty text, got {value!r}")
    return hd.sr.TextContentItem(name=name, value=value.strip(), relationship_type=relationship)


def _num(
    name: hd.sr.CodedConcept | Code,
    value: float,
    unit: hd.sr.CodedConcept | Code,
    what: str,
    *,
    relationship: Relationship = Relationship.INFERRED_FROM,
    derivation: Code | None = None,
    site: hd.sr.CodedConcept | None = None,
    context: Sequence[hd.sr.ContentItem] = (),
) -> hd.sr.ContentItem:
    """A TID 300 NUM (derivation and finding site as concept modifiers) under a qualitative evaluation."""
    measurement = hd.sr.Measurement(
        name=name,
        value=_finite(value, what),
        unit=unit,
        derivation=derivation,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)] if site is not None else None,
    )
    item = measurement[0]
    if not isinstance(item, hd.sr.ContentItem):  # highdicom types the sequence items as Dataset
        raise ResultEncodingError(f"{what}: highdicom made a {type(item).__name__}, not a NUM content item")
    item.RelationshipType = relationship.value
    if context:
        # e.g. the tube voltage a HU value was measured at (HAS ACQ CONTEXT, PS3.3 Table A.35.13-2)
        existing = list(item.get("ContentSequence", []))
        item.ContentSequence = hd.sr.ContentSequence([*existing, *context])
    return item


def _site_evaluation(
    site: SiteResult, assessment: RiskAssessment, lesions: Sequence[SegmentFinding]
) -> hd.sr.CodeContentItem:
    """One screened site: its finding code = Present / Absent / Undetermined, with why."""
    children: list[hd.sr.ContentItem] = []
    if assessment.status == NOT_EVALUABLE:
        children.append(_text(NOT_EVALUABLE_REASON, site.reason or "reason not recorded", Relationship.HAS_PROPERTIES))
    else:
        children.append(_num(LESION_DETECTION_SCORE, assessment.score, codes.UCUM.NoUnits,
                             f"site {site.site!r} score"))
        assert assessment.tier is not None  # RiskPolicy gives every evaluable site a tier
        tier = RISK_TIER_CODES[assessment.tier]
        children.append(_code(RISK_TIER, tier, Relationship.HAS_PROPERTIES))
        children.append(_code(REFER, codes.SCT.Yes if assessment.refer else codes.SCT.No, Relationship.HAS_PROPERTIES))
        # The lesions behind a "present" answer, by the Tracking UID of their measurement groups.
        for lesion in lesions:
            children.append(hd.sr.UIDRefContentItem(
                name=codes.DCM.TrackingUniqueIdentifier, value=lesion.tracking_uid,
                relationship_type=Relationship.HAS_PROPERTIES))
    return _code(coded(site.finding), STATUS_CODES[assessment.status], Relationship.CONTAINS, children)


def _bone_density_evaluation(bone: BoneDensityResult) -> hd.sr.CodeContentItem:
    """Finding (DCM 121071) = Osteoporosis / Osteopenia / Normal bone density / Undetermined at L1 or T12."""
    if not bone.evaluable or bone.level is None:
        return _code(codes.DCM.Finding, UNDETERMINED_CODE, Relationship.CONTAINS,
                     [_text(NOT_EVALUABLE_REASON, bone.level_reason or "reason not recorded",
                            Relationship.HAS_PROPERTIES)])
    if bone.category not in BONE_DENSITY_CODES:
        raise ResultEncodingError(f"bone_density.category {bone.category!r} is not one of {sorted(BONE_DENSITY_CODES)}")
    vertebra = VERTEBRA_CODES[bone.level]
    kvp = bone.kvp
    context = []
    if kvp is not None:
        context.append(_num(KVP, kvp, UNIT_KV, "bone_density.kvp", relationship=Relationship.HAS_ACQ_CONTEXT))
    # Which level and why, the tube voltage (HU thresholds hold at 120 kVp) and the caveats.
    basis = [bone.level_reason or bone.level]
    if kvp is not None:
        basis.append(f"acquired at {_finite(kvp, 'bone_density.kvp'):g} kVp")
    if bone.high_suspicion:
        basis.append("trabecular mean below 100 HU: high suspicion of osteoporosis")
    basis.extend(bone.notes)
    if kvp is None and not any("kVp" in note for note in bone.notes):
        basis.append("kVp not recorded")
    children = [
        _code(codes.SCT.FindingSite, vertebra, Relationship.HAS_CONCEPT_MOD),
        _num(codes.DCM.AttenuationCoefficient, bone.mean_hu, UNIT_HU, "bone_density.mean_hu",
             derivation=codes.SCT.Mean, site=vertebra, context=context),
        _text(ASSESSMENT_BASIS, "; ".join(basis), Relationship.HAS_PROPERTIES),
    ]
    return _code(codes.DCM.Finding, BONE_DENSITY_CODES[bone.category], Relationship.CONTAINS, children)


def _steatosis_evaluation(fat: SteatosisResult) -> hd.sr.CodeContentItem:
    """Steatosis of liver (SCT 197321007) = Present / Absent / Undetermined, graded, with the means."""
    if not fat.evaluable:
        return _code(STEATOSIS_OF_LIVER, UNDETERMINED_CODE, Relationship.CONTAINS,
                     [_text(NOT_EVALUABLE_REASON, fat.reason or "reason not recorded", Relationship.HAS_PROPERTIES)])
    grade = fat.grade
    if grade not in STEATOSIS_GRADES:
        raise ResultEncodingError(f"steatosis.grade {grade!r} is not one of {list(STEATOSIS_GRADES)}")
    children: list[hd.sr.ContentItem] = []
    if grade != "none":
        children.append(_text(SEVERITY, grade, Relationship.HAS_PROPERTIES))
    children.append(_num(codes.DCM.AttenuationCoefficient, fat.liver_mean_hu, UNIT_HU,
                         "steatosis.liver_mean_hu", derivation=codes.SCT.Mean, site=LIVER))
    if fat.spleen_mean_hu is not None:
        children.append(_num(codes.DCM.AttenuationCoefficient, fat.spleen_mean_hu, UNIT_HU,
                             "steatosis.spleen_mean_hu", derivation=codes.SCT.Mean, site=SPLEEN))
    if fat.reason:
        children.append(_text(ASSESSMENT_BASIS, fat.reason, Relationship.HAS_PROPERTIES))
    value = ABSENT_CODE if grade == "none" else PRESENT_CODE
    return _code(STEATOSIS_OF_LIVER, value, Relationship.CONTAINS, children)


def _lung_nodule_evaluation(
    nodule: LungNodule, index: int, by_label: dict[str, SegmentFinding]
) -> hd.sr.CodeContentItem:
    """Lung-RADS v2022 category (private code) of one nodule, with its size and its lesion's Tracking UID."""
    if nodule.lung_rads not in LUNG_RADS_CODES:
        raise ResultEncodingError(
            f"lung_nodules[{index}].lung_rads {nodule.lung_rads!r} is not one of {sorted(LUNG_RADS_CODES)}")
    children: list[hd.sr.ContentItem] = [
        _num(DIAMETER, nodule.mean_diameter_mm, codes.UCUM.Millimeter,
             f"lung_nodules[{index}].mean_diameter_mm", derivation=codes.SCT.Mean),
    ]
    if nodule.volume_mm3 is not None:
        children.append(_num(codes.SCT.Volume, nodule.volume_mm3, UNIT_MM3, f"lung_nodules[{index}].volume_mm3"))
    lesion = by_label.get(nodule.label)
    if lesion is not None:
        children.append(hd.sr.UIDRefContentItem(
            name=codes.DCM.TrackingUniqueIdentifier, value=lesion.tracking_uid,
            relationship_type=Relationship.HAS_PROPERTIES))
    return _code(LUNG_RADS_CATEGORY, LUNG_RADS_CODES[nodule.lung_rads], Relationship.CONTAINS, children)


def qualitative_evaluation_items(
    segments: Sequence[SegmentFinding],
    sites: Sequence[SiteResult],
    measurements: BundleMeasurements,
    risk: RiskPolicy,
) -> list[hd.sr.ContentItem]:
    """The patient-level items of the Qualitative Evaluations container (after the research Comment)."""
    items: list[hd.sr.ContentItem] = []
    for site in sites:
        try:
            assessment = risk.assess(site)
        except RiskPolicyError as exc:
            raise ResultEncodingError(f"site {site.site!r}: {exc}") from exc
        lesions = [s for s in segments if s.lesion is not None and s.lesion.site == site.site]
        items.append(_site_evaluation(site, assessment, lesions if assessment.status == PRESENT else []))
    if not isinstance(measurements, BundleMeasurements):
        raise ResultEncodingError(f"measurements must be BundleMeasurements, got {type(measurements).__name__}")
    if measurements.bone_density is not None:
        items.append(_bone_density_evaluation(measurements.bone_density))
    if measurements.steatosis is not None:
        items.append(_steatosis_evaluation(measurements.steatosis))
    by_label = {s.label: s for s in segments}
    for index, nodule in enumerate(measurements.lung_nodules or ()):
        items.append(_lung_nodule_evaluation(nodule, index, by_label))
    return items


def _qualitative_evaluations(
    research_notice: str, items: Sequence[hd.sr.ContentItem]
) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12 container: the research Comment (DCM 121106, row 14) first, then ``items``."""
    content: list[hd.sr.ContentItem] = []
    if research_notice.strip():  # an empty notice (labelling turned off) writes no Comment
        content.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=research_notice.strip(), relationship_type=Relationship.CONTAINS))
    content.extend(items)
    if not content:
        return None
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=Relationship.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(content)
    return container


def _uses_scheme(items: Iterable[Dataset], designator: str) -> bool:
    """Whether any code in the content tree (names, values, units) is from ``designator``."""
    for item in items:
        for element in item.iterall():
            if element.keyword == "CodingSchemeDesignator" and element.value == designator:
                return True
    return False


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item declaring :data:`PRIVATE_SCHEME` (PS3.3 C.12.1.1.2.1)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


def build_measurement_report(
    volume: CTVolume,
    segments: Sequence[SegmentFinding],
    segmentation: hd.seg.Segmentation,
    algorithm: AlgorithmIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    research_notice: str,
    procedure_reported: CodeSpec = DEFAULT_PROCEDURE,
    previous_versions: Sequence[Dataset] = (),
    sites: Sequence[SiteResult] = (),
    measurements: BundleMeasurements = NOTHING_MEASURED,
    risk: RiskPolicy | None = None,
    points: str = "none",
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Comprehensive 3D SR with one measurement group per segment.

    ``segmentation`` is the SEG built from the same ``segments`` (its SOP
    Instance UID and segment numbers are referenced). ``series_description``
    must fit in 64 characters (LO) and should contain the research notice;
    ``research_notice`` is also written as a Comment content item (none if
    it is empty). ``previous_versions`` are the earlier SRs of the same source
    series that this one supersedes (Predecessor Documents Sequence).

    ``sites`` (per-site answers, :class:`pipelines.clinical.results.SiteResult`) and
    ``measurements`` (:class:`pipelines.clinical.results.BundleMeasurements`: bone density,
    steatosis, lung nodules) are encoded as qualitative evaluations;
    ``risk`` gives the tiers and referral flags of the sites (the default
    :class:`RiskPolicy` when None). ``points`` is one of :data:`POINTS`:
    with "lesions" each lesion segment (:func:`is_lesion`), with "all" every
    segment, also gets a TID 1410 group with a SCOORD3D point on it
    (:func:`_point_group`).
    """
    check_algorithm(algorithm)
    check_long_string(series_description, "series_description")
    if not isinstance(research_notice, str):
        raise TypeError(f"research_notice must be a string, got {type(research_notice).__name__}: {research_notice!r}")
    if not segments:
        raise ResultEncodingError("no segments to report")
    if points not in POINTS:
        raise ValueError(f"points must be one of {', '.join(POINTS)}, got {points!r}")
    ordered = sorted(segments, key=lambda s: s.number)
    _check_segmentation(volume, ordered, segmentation)
    if risk is not None and not isinstance(risk, RiskPolicy):
        raise TypeError(f"risk must be a RiskPolicy or None, got {type(risk).__name__}: {risk!r}")
    try:
        evaluations = qualitative_evaluation_items(ordered, list(sites), measurements, risk or RiskPolicy())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ResultEncodingError(
            f"cannot encode the qualitative evaluations of series {volume.series_instance_uid}: {exc!r}"
        ) from exc

    # TID 1004 device observer: the model build, identified by its Device UID.
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.model_name,
        ),
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=coded(algorithm.family)
    )
    try:
        groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                     | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
        for seg in ordered:
            groups.append(_measurement_group(volume, seg, segmentation, algorithm_id))
            if points == "all" or (points == "lesions" and is_lesion(seg)):
                groups.append(_point_group(volume, seg, algorithm_id))
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=coded(procedure_reported),
            imaging_measurements=groups,
        )
        container = _qualitative_evaluations(research_notice, evaluations)
        if container is not None:
            report[0].ContentSequence.append(container)
        coding_schemes = [private_coding_scheme()] if _uses_scheme(report, PRIVATE_SCHEME) else None
        sr = hd.sr.Comprehensive3DSR(
            # The CT first: highdicom copies patient and study from evidence[0].
            evidence=[*volume.datasets, segmentation],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.software_version,
            device_serial_number=algorithm.device_uid,
            series_description=series_description,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[algorithm_equipment(algorithm)],
            previous_versions=list(previous_versions) or None,
            specific_character_set=source_character_set(volume.first),
            coding_schemes=coding_schemes,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(
            f"highdicom refused the measurement report for series {volume.series_instance_uid}: {exc}"
        ) from exc
    set_device_uid(sr, algorithm)
    return sr
