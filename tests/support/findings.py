"""SegmentFinding and AlgorithmIdentity builders, and the key-image tests' two painted lesions.

Findings are built by hand on a real volume: the mask is the test's, the voxel
count, volume and mean HU are measured from it the way the pipeline does.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from scipy import ndimage

from pipelines.clinical.findings import AlgorithmIdentity, CodeSpec, LesionFacts, SegmentFinding
from pipelines.dicom_out.uids import derive_uid
from pipelines.volume.ct import CTVolume

NOTICE = "For research use only. Not for use in diagnostic procedures."
AI_FAMILY = CodeSpec("123110", "DCM", "Artificial Intelligence")
ANATOMICAL_STRUCTURE = CodeSpec("91723000", "SCT", "Anatomical Structure")
LESION_CATEGORY = CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")


def algorithm_identity(model_key: str, name: str | None = None, model_name: str | None = None) -> AlgorithmIdentity:
    """The identity of a model ``model_key`` (``NAME@VERSION+BUILD``), as the node derives it.

    ``name`` and ``model_name`` default to the key's NAME; the device UID is derived from the key.
    """
    key_name, at, software_version = model_key.partition("@")
    version, plus, build = software_version.partition("+")
    if not (key_name and at and version and plus and build):
        raise ValueError(f"model key {model_key!r} is not NAME@VERSION+BUILD")
    return AlgorithmIdentity(
        name=name or key_name,
        version=version,
        family=AI_FAMILY,
        manufacturer="PACS-AI open-source project",
        model_name=model_name or name or key_name,
        software_version=software_version,
        device_uid=derive_uid("device", model_key),
    )


def segment_finding(volume: CTVolume, number: int, label: str, mask: np.ndarray, *, category: CodeSpec,
                    type: CodeSpec, finding_site: CodeSpec | None, tracking_id: str, tracking_uid: str,
                    role: str = "organ", median_hu: float | None = None,
                    lesion: LesionFacts | None = None) -> SegmentFinding:
    """A finding with ``mask`` on ``volume``'s grid; voxel count, volume (mm³) and mean HU measured from it."""
    count = int(mask.sum())
    return SegmentFinding(
        number=number,
        label=label,
        category=category,
        type=type,
        finding_site=finding_site,
        mask=mask,
        tracking_id=tracking_id,
        tracking_uid=tracking_uid,
        volume_mm3=count * volume.voxel_volume_mm3,
        mean_hu=float(volume.hu[mask].mean()),
        voxel_count=count,
        role=role,
        median_hu=median_hu,
        lesion=lesion,
    )


# -- the key-image scene: the abdomen series with two lesions painted in -------------------------

KEY_IMAGE_MODEL_KEY = "reference-cascade@1.0.0+3fa2c1d0"
KEY_IMAGE_ALGORITHM = algorithm_identity(KEY_IMAGE_MODEL_KEY)
#: The UID prefix parts of the key images (source series UID, model key).
PREFIX = ("1.2.826.0.1.3680043.8.498.20618380718132701474776061857022813903", KEY_IMAGE_MODEL_KEY)
WHEN = datetime(2024, 5, 6, 7, 8, 9)
#: (slice, row, column) centres and radii (mm): inside the liver, and in the
#: posterior right lung base (checked on the images).
LIVER_CENTRE, LIVER_RADIUS_MM = (100, 46, 30), 9.5
LUNG_CENTRE, LUNG_RADIUS_MM = (109, 76, 33), 5.0
#: The Patient and Study attributes a result object copies from its source.
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)
LIVER = CodeSpec("10200004", "SCT", "Liver")
LUNG = CodeSpec("39607008", "SCT", "Lung")


def sphere(volume: CTVolume, centre: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    """The voxels within ``radius_mm`` of the voxel ``centre`` (slice, row, column), in mm."""
    z, y, x = np.indices(volume.shape)
    sz, sy, sx = volume.spacing_zyx
    inside: np.ndarray = ((z - centre[0]) * sz) ** 2 + ((y - centre[1]) * sy) ** 2 + ((x - centre[2]) * sx) ** 2 \
        <= radius_mm**2
    return inside


def paint_lesions(volume: CTVolume) -> CTVolume:
    """Paint a 0 HU liver lesion and a 25 HU lung nodule into ``volume.hu`` (in place); returns it."""
    volume.hu[sphere(volume, LIVER_CENTRE, LIVER_RADIUS_MM)] = 0.0
    volume.hu[sphere(volume, LUNG_CENTRE, LUNG_RADIUS_MM)] = 25.0
    return volume


def lesion_finding(volume: CTVolume, number: int, label: str, type_: CodeSpec, finding_site: CodeSpec,
                   mask: np.ndarray, lesion: LesionFacts) -> SegmentFinding:
    """A lesion finding of the key-image scene's model."""
    return segment_finding(
        volume, number, label, mask, category=LESION_CATEGORY, type=type_, finding_site=finding_site,
        tracking_id=f"{label} (reference-cascade)",
        tracking_uid=derive_uid("tracking", volume.series_instance_uid, KEY_IMAGE_MODEL_KEY, label),
        role="lesion", lesion=lesion,
    )


def key_image_findings(volume: CTVolume) -> list[SegmentFinding]:
    """The liver (an organ: it gets no key image), the liver lesion and the lung nodule, on ``volume``."""
    liver_mask = sphere(volume, LIVER_CENTRE, LIVER_RADIUS_MM)
    lung_mask = sphere(volume, LUNG_CENTRE, LUNG_RADIUS_MM)
    organ = segment_finding(
        volume, 1, "Liver", ndimage.binary_dilation(liver_mask, iterations=3), category=LESION_CATEGORY, type=LIVER,
        finding_site=LIVER, tracking_id="Liver (reference-cascade)",
        tracking_uid=derive_uid("tracking", volume.series_instance_uid, KEY_IMAGE_MODEL_KEY, "Liver"),
        role="liver", median_hu=45.0,
    )
    return [
        organ,
        lesion_finding(volume, 2, "liver lesion 1", CodeSpec("108369006", "SCT", "Neoplasm"), LIVER, liver_mask,
                       LesionFacts(site="liver", score=0.93, long_axis_mm=18.4, short_axis_mm=17.1, type="malignant",
                                   malignancy=0.81)),
        lesion_finding(volume, 3, "lung lesion 1", CodeSpec("27925004", "SCT", "Nodule"), LUNG, lung_mask,
                       LesionFacts(site="lung", score=0.71, long_axis_mm=9.2, short_axis_mm=8.8, type="nodule",
                                   lung_rads="4A")),
    ]


def key_image_arguments(**kwargs: object) -> dict[str, object]:
    """The KeyImageSeries fields of the key-image scene, with ``kwargs`` overriding them."""
    args: dict[str, object] = dict(
        series_instance_uid=derive_uid(*PREFIX, "KI", "series"),
        series_number=903,
        series_description="AI key images - research use only",
        research_notice=NOTICE,
        uid_prefix_parts=PREFIX,
        content_datetime=WHEN,
    )
    args.update(kwargs)
    return args
