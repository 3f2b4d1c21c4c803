"""Findings -> a TID 1500 Measurement Report in a Comprehensive 3D SR.

Layout (PS3.16 TID 1500, IHE AI Results):

- observation context: the algorithm as a device observer (TID 1001/1004);
- Procedure reported: the CT that was analysed, not the algorithm;
- Imaging Measurements: one TID 1411 "Volumetric ROI Measurements" group per
  segment, with tracking identifier and UID, Finding, Finding Site, the
  Referenced Segment in the SEG, Source series for segmentation, algorithm
  identification (TID 4019), Volume and mean Attenuation Coefficient;
- Qualitative Evaluations (TID 1500 rows 12 and 14): a TEXT Comment with the
  research-use notice, since DICOM has no research-only flag.

The document is UNVERIFIED and PRELIMINARY: no person has checked it.
"""

from __future__ import annotations

import math
from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.errors import ResultEncodingError
from pipelines.findings import AlgorithmIdentity, CodeSpec, SegmentFinding
from pipelines.segmentation import (
    SEGMENTATION_STORAGE,
    algorithm_equipment,
    check_algorithm,
    check_long_string,
    coded,
    set_device_uid,
    source_character_set,
)
from pipelines.volume import CTVolume

COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"

#: UCUM units (PS3.16 CID 7181 / CID 83 use UCUM; "ml" is not a DICOM volume unit).
UNIT_MM3 = hd.sr.CodedConcept(value="mm3", scheme_designator="UCUM", meaning="cubic millimeter")
UNIT_HU = hd.sr.CodedConcept(value="[hnsf'U]", scheme_designator="UCUM", meaning="Hounsfield unit")

#: TID 1500 row 12 container for evaluations of the whole report subject.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)

DEFAULT_PROCEDURE = CodeSpec("29252-4", "LN", "CT Chest WO contrast")


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
    if str(segmentation.SOPClassUID) != SEGMENTATION_STORAGE:
        raise ResultEncodingError(
            f"segmentation has SOP class {segmentation.SOPClassUID}, expected {SEGMENTATION_STORAGE}"
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
    # Lesions (pipelines.analysis): axial long and short axes, and the typing stage's probability of cancer.
    for key, name in (("long_axis_mm", codes.SCT.LongAxis), ("short_axis_mm", codes.SCT.ShortAxis)):
        if key in seg.extra:
            measurements.append(hd.sr.Measurement(
                name=name, value=_finite(seg.extra[key], f"segment {seg.number} {key}"), unit=codes.UCUM.Millimeter))
    if "malignancy" in seg.extra:
        measurements.append(hd.sr.Measurement(
            name=codes.DCM.ProbabilityOfCancer,
            value=_finite(seg.extra["malignancy"], f"segment {seg.number} probability of cancer"),
            unit=codes.UCUM.NoUnits,
        ))
    finding_sites = [hd.sr.FindingSite(anatomic_location=coded(seg.finding_site))] if seg.finding_site else None
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=seg.tracking_uid, identifier=seg.tracking_id),
        referenced_segment=referenced_segment,
        finding_type=coded(seg.type),
        finding_category=coded(seg.category),
        finding_sites=finding_sites,
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _research_comment(research_notice: str) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container holding a row 14 TEXT item: Comment (DCM 121106)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=research_notice,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


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
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Comprehensive 3D SR with one measurement group per segment.

    ``segmentation`` is the SEG built from the same ``segments`` (its SOP
    Instance UID and segment numbers are referenced). ``series_description``
    must fit in 64 characters (LO) and should contain the research notice;
    ``research_notice`` is also written as a Comment content item (none if
    it is empty). ``previous_versions`` are the earlier SRs of the same source
    series that this one supersedes (Predecessor Documents Sequence).
    """
    check_algorithm(algorithm)
    check_long_string(series_description, "series_description")
    if not isinstance(research_notice, str):
        raise TypeError(f"research_notice must be a string, got {type(research_notice).__name__}: {research_notice!r}")
    if not segments:
        raise ResultEncodingError("no segments to report")
    ordered = sorted(segments, key=lambda s: s.number)
    _check_segmentation(volume, ordered, segmentation)

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
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=coded(procedure_reported),
            imaging_measurements=[_measurement_group(volume, s, segmentation, algorithm_id) for s in ordered],
        )
        if research_notice.strip():  # an empty notice (labelling turned off) writes no Comment
            report[0].ContentSequence.append(_research_comment(research_notice.strip()))
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
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(
            f"highdicom refused the measurement report for series {volume.series_instance_uid}: {exc}"
        ) from exc
    set_device_uid(sr, algorithm)
    return sr
