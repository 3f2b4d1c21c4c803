"""Findings -> the DICOM result objects of one bundle: SEG, TID 1500 SR and key images.

UIDs derive from the source series, the bundle key and the result version
(:func:`pipelines.dicom_out.uids.result_uids`), so a re-run is idempotent at the
PACS; the labels a site configures (notice, series numbers, SEG type, key image
kind, risk policy) come in one :class:`ResultLabelling`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from pipelines.clinical.findings import KEY_IMAGE_TYPES, SegmentFinding
from pipelines.clinical.results import NOTHING_MEASURED, BundleMeasurements, SiteResult
from pipelines.clinical.risk import RiskPolicy
from pipelines.dicom_out.keyimages import KeyImageSeries, build_key_images
from pipelines.dicom_out.presentation import build_presentation_states
from pipelines.dicom_out.report import build_measurement_report
from pipelines.dicom_out.segmentation import build_segmentation
from pipelines.dicom_out.uids import derive_uid, result_uids
from pipelines.model.bundle import ModelBundle
from pipelines.volume.ct import CTVolume

RESEARCH_NOTICE = "For research use only. Not for use in diagnostic procedures."


@dataclass(frozen=True)
class ResultLabelling:
    """Site-configurable labels put on every result object."""

    research_notice: str = RESEARCH_NOTICE
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    software_version: str = "0"
    #: Risk tiers and referral from site scores (None: the built-in default policy).
    risk: RiskPolicy | None = None
    #: "BINARY" or "LABELMAP" (pipelines.dicom_out.segmentation.build_segmentation).
    seg_type: str = "BINARY"
    #: Key images of lesions: "SC", "GSPS" or "NONE" (pipelines.clinical.findings.KEY_IMAGE_TYPES).
    key_image_type: str = "SC"

    def __post_init__(self) -> None:
        if self.key_image_type not in KEY_IMAGE_TYPES:
            raise ValueError(f"key_image_type: {self.key_image_type!r} is not one of {', '.join(KEY_IMAGE_TYPES)}")


def series_description(title: str, notice: str) -> str:
    """SeriesDescription (LO, 64 chars): the title and as much of the notice as fits."""
    text = f"{title} - {notice}" if notice else title
    return text if len(text) <= 64 else text[:61].rstrip() + "..."


def made_by(ds: Dataset, bundle: ModelBundle) -> bool:
    """Whether an earlier SR came from this bundle (its series description names the bundle id)."""
    return str(getattr(ds, "SeriesDescription", "")).startswith(f"AI {bundle.manifest.id} ")


def encode_seg_and_sr(
    volume: CTVolume,
    findings: Sequence[SegmentFinding],
    bundle: ModelBundle,
    labelling: ResultLabelling,
    *,
    index: int = 0,
    version: int = 1,
    previous_reports: Sequence[Dataset] = (),
    sites: Sequence[SiteResult] = (),
    measurements: BundleMeasurements = NOTHING_MEASURED,
) -> tuple[Dataset, Dataset]:
    """Build the SEG and the SR with UIDs derived from the source series, the model and the version;
    the SR also carries the per-site answers, risk tiers and measurements as qualitative evaluations."""
    # A label map is another SOP class: it (and the SR that references it) gets UIDs of its own.
    variant = "LABELMAP" if labelling.seg_type == "LABELMAP" else ""
    uids = result_uids(volume.series_instance_uid, bundle.key, version, variant)
    suffix = f" v{version}" if version > 1 else ""
    algorithm = bundle.algorithm_identity(labelling.software_version)
    notice = labelling.research_notice
    seg = build_segmentation(
        volume,
        list(findings),
        algorithm,
        series_instance_uid=uids.seg_series_instance_uid,
        sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=labelling.seg_series_number + 10 * index,
        series_description=series_description(f"AI {bundle.manifest.id} SEG{suffix}", notice),
        content_description=notice,
        segmentation_type=labelling.seg_type,
    )
    sr = build_measurement_report(
        volume,
        findings,
        seg,
        algorithm,
        series_instance_uid=uids.sr_series_instance_uid,
        sop_instance_uid=uids.sr_sop_instance_uid,
        series_number=labelling.sr_series_number + 10 * index,
        series_description=series_description(f"AI {bundle.manifest.id} report{suffix}", notice),
        research_notice=notice,
        previous_versions=previous_reports,
        sites=sites,
        measurements=measurements,
        risk=labelling.risk,
        points="all",
    )
    return seg, sr


def encode_key_images(volume: CTVolume, findings: Sequence[SegmentFinding], bundle: ModelBundle,
                      labelling: ResultLabelling, *, index: int = 0, version: int = 1) -> list[Dataset]:
    """Key images of the lesions, for viewers that show neither SEG nor SR: Secondary Captures
    (contour and label burned in) or a GSPS over the source slices, as ``key_image_type`` says;
    none when the bundle reports no lesion or the site turned them off.

    Both kinds take the same series number (one or the other is made) and UIDs derived from
    the same inputs, each in its own series: a series holds one modality (OT or PR).
    """
    kind = labelling.key_image_type
    if kind == "NONE" or not any(f.lesion is not None for f in findings):
        return []
    parts = (volume.series_instance_uid, bundle.key) + ((f"v{version}",) if version > 1 else ())
    suffix = f" v{version}" if version > 1 else ""
    build, tag, title = ((build_presentation_states, "PR", "key images GSPS") if kind == "GSPS"
                         else (build_key_images, "KI", "key images"))
    series = KeyImageSeries(
        series_instance_uid=derive_uid(*parts, tag, "series"),
        series_number=labelling.sr_series_number + 1 + 10 * index,
        series_description=series_description(f"AI {bundle.manifest.id} {title}{suffix}",
                                              labelling.research_notice),
        research_notice=labelling.research_notice,
        uid_prefix_parts=parts,
    )
    return list(build(volume, list(findings), bundle.algorithm_identity(labelling.software_version), series))
