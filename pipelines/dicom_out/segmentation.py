"""Findings -> a DICOM Segmentation instance (BINARY, PS3.3 A.51).

The SEG is pixel-aligned with the CT it was computed on: one SEG frame per
(source frame, segment) pair that contains the segment, each frame referencing
its source image (Derivation Image / Source Image, PS3.3 C.7.6.16.2.6), in the
same Frame of Reference. BINARY is chosen over LABELMAP (...66.7) because far
more viewers and PACS read it, and because organ masks may overlap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.clinical.findings import AlgorithmIdentity, CodeSpec, SegmentFinding
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Label Map Segmentation Storage ([results] seg_type = "LABELMAP").
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: Maximum length of a Long String (LO) value, PS3.5 Table 6.2-1.
LO_MAX_CHARS = 64

#: Device UID (0018,1002) is a Type 3 attribute of the General Equipment Module
#: (PS3.3 C.7.5.1) but not of Contributing Equipment Sequence items (SOP Common,
#: C.12.1): dciodvfy flags it there as "not present in standard DICOM IOD". So
#: it goes at the top level, and the item carries it as Device Serial Number.
#: highdicom 0.28 has no argument for it, so it is set on the dataset directly.
_DEVICE_UID_KEYWORD = "DeviceUID"

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

#: Distinct display colours (sRGB), cycled by segment number, so that viewers
#: show every segment in its own colour (Recommended Display CIELab Value,
#: PS3.3 C.8.20.2; dcmqi and OHIF otherwise fall back to one default colour).
_DISPLAY_RGB = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def coded(code: CodeSpec) -> hd.sr.CodedConcept:
    """A highdicom coded concept for one of our :class:`CodeSpec`."""
    if not isinstance(code, CodeSpec):
        raise TypeError(f"expected a CodeSpec, got {type(code).__name__}: {code!r}")
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def fit_long_string(text: str) -> str:
    """``text`` made a valid single LO value: one line, no backslash, <= 64 chars.

    Backslash is the value separator of string VRs (PS3.5 6.2) and control
    characters are not allowed in LO, so they are replaced; text that is too
    long is cut at a word boundary and marked with ``...``.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}: {text!r}")
    clean = " ".join(_CONTROL_CHARS.sub(" ", text.replace("\\", "/")).split())
    if len(clean) <= LO_MAX_CHARS:
        return clean
    cut = clean[: LO_MAX_CHARS - 3]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" .,;:") + "..."


def check_long_string(value: str, name: str) -> str:
    """Return ``value`` if it is a valid LO value, else raise naming ``name``.

    Used where shortening would silently drop meaning (e.g. the research
    notice in SeriesDescription): the caller must pass a value that fits.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > LO_MAX_CHARS:
        raise ValueError(f"{name} is {len(value)} characters, more than the {LO_MAX_CHARS} of VR LO: {value!r}")
    if "\\" in value or _CONTROL_CHARS.search(value):
        raise ValueError(f"{name} contains a backslash or a control character: {value!r}")
    return value


def algorithm_equipment(algorithm: AlgorithmIdentity) -> hd.ContributingEquipment:
    """A Contributing Equipment Sequence item (PS3.3 C.12.1) naming the AI model.

    Purpose of Reference is DCM 109102 "Processing Equipment" (CID 7005:
    equipment that processed instances to create new ones); 109103 "Modifying
    Equipment" is for equipment that changed an existing instance, which the
    node never does. The Device UID, which changes whenever the model changes
    (IHE AIR), is carried as Device Serial Number (see ``_DEVICE_UID_KEYWORD``).
    """
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        device_serial_number=algorithm.device_uid,
        contribution_description=f"AI algorithm {algorithm.name} version {algorithm.version}",
    )


def set_device_uid(dataset: Dataset, algorithm: AlgorithmIdentity) -> None:
    """Put the model's Device UID in the General Equipment Module (PS3.3 C.7.5.1)."""
    setattr(dataset, _DEVICE_UID_KEYWORD, algorithm.device_uid)


def source_character_set(dataset: Dataset) -> str | list[str] | None:
    """Specific Character Set (0008,0005) of ``dataset`` in a form highdicom accepts.

    An absent or empty value means the default repertoire (PS3.3 C.12.1.1.2):
    return ``None`` (highdicom 0.28 raises on ``''``, which real scanners
    write). An empty first value of a multi-valued set is the default
    repertoire with code extensions, i.e. ``ISO 2022 IR 6``.
    """
    value = dataset.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value.strip() or None
    values = [str(v).strip() for v in value]
    if not any(values):
        return None
    return [v or "ISO 2022 IR 6" for v in values]


def check_algorithm(algorithm: AlgorithmIdentity) -> None:
    """Raise if ``algorithm`` cannot be encoded (LO fields, Device UID)."""
    if not isinstance(algorithm, AlgorithmIdentity):
        raise TypeError(f"algorithm must be an AlgorithmIdentity, got {type(algorithm).__name__}")
    for name in ("name", "version", "manufacturer", "model_name", "software_version"):
        check_long_string(getattr(algorithm, name), f"algorithm.{name}")
    uid = algorithm.device_uid
    if not isinstance(uid, str) or len(uid) > 64 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid):
        raise ValueError(f"algorithm.device_uid is not a valid UID: {uid!r}")


def _ordered_segments(volume: CTVolume, segments: Sequence[SegmentFinding]) -> list[SegmentFinding]:
    """Segments sorted by number, checked against the rules of PS3.3 C.8.20.2.

    Segment Numbers start at 1 and increase by 1 (highdicom enforces it too);
    every mask must lie on the volume grid and contain at least one voxel: an
    empty segment would have no frames at all, and "structure not found" is a
    result for the SR, not a segment.
    """
    if not segments:
        raise ResultEncodingError("no segments to encode")
    ordered = sorted(segments, key=lambda s: s.number)
    numbers = [s.number for s in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        raise ResultEncodingError(f"segment numbers must be 1..{len(ordered)} without gaps or repeats, got {numbers}")
    for seg in ordered:
        mask = np.asarray(seg.mask)
        if mask.dtype != np.bool_:
            raise ResultEncodingError(
                f"segment {seg.number} ({seg.label!r}): mask dtype is {mask.dtype}, expected bool"
            )
        if mask.shape != volume.hu.shape:
            raise ResultEncodingError(
                f"segment {seg.number} ({seg.label!r}): mask shape {mask.shape} differs from volume {volume.hu.shape}"
            )
        if not mask.any():
            raise ResultEncodingError(f"segment {seg.number} ({seg.label!r}) is empty; leave it out of the SEG")
    return ordered


def _segment_description(seg: SegmentFinding, algorithm: AlgorithmIdentity) -> hd.seg.SegmentDescription:
    """Segment Sequence item (PS3.3 C.8.20.2): codes, AUTOMATIC, algorithm, tracking."""
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=coded(algorithm.family),
        version=algorithm.version,
        source=algorithm.manufacturer,
    )
    return hd.seg.SegmentDescription(
        segment_number=seg.number,
        segment_label=check_long_string(seg.label, f"segment {seg.number} label"),
        segmented_property_category=coded(seg.category),
        segmented_property_type=coded(seg.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_id,
        tracking_uid=seg.tracking_uid,
        tracking_id=seg.tracking_id,
        anatomic_regions=[coded(seg.finding_site)] if seg.finding_site is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*_DISPLAY_RGB[(seg.number - 1) % len(_DISPLAY_RGB)]),
    )


def _segment_array(ordered: Sequence[SegmentFinding]) -> np.ndarray:
    """The masks in the form highdicom takes, as small as the overlap allows.

    Disjoint segments go in one label array (value = segment number), one
    byte per voxel; overlapping ones (e.g. body and an organ inside it) need
    one boolean plane per segment on a last axis, n bytes per voxel. Both
    encode the same BINARY frames.
    """
    dtype = np.uint8 if len(ordered) < 256 else np.uint16
    labels = np.zeros(ordered[0].mask.shape, dtype=dtype)
    for seg in ordered:
        mask = np.asarray(seg.mask, dtype=bool)
        if labels[mask].any():
            return np.stack([np.asarray(s.mask, dtype=bool) for s in ordered], axis=-1)
        labels[mask] = seg.number
    return labels


def _label_map(ordered: Sequence[SegmentFinding]) -> np.ndarray:
    """One label per voxel (LABELMAP): where segments overlap, the later one wins, so a lesion
    (listed after its organ) keeps its voxels and the organ loses them."""
    dtype = np.uint8 if len(ordered) < 256 else np.uint16
    labels = np.zeros(ordered[0].mask.shape, dtype=dtype)
    for seg in ordered:
        labels[np.asarray(seg.mask, dtype=bool)] = seg.number
    return labels


def _source_and_pixels(volume: CTVolume, masks: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """Source images and the segment array (label or one plane per segment) in their order.

    highdicom pairs pixel frame i with source frame i. For classic CT that is
    one dataset per slice; for Enhanced CT it is frame i of the one dataset,
    whose frame order need not be the volume's slice order.
    """
    if volume.is_multiframe:
        n_frames = int(getattr(volume.first, "NumberOfFrames", 1) or 1)
        if n_frames != len(volume.frames):
            raise ResultEncodingError(
                f"Enhanced CT has {n_frames} frames but the volume has {len(volume.frames)} slices"
            )
        pixels = np.zeros((n_frames,) + masks.shape[1:], dtype=masks.dtype)
        for k, frame in enumerate(volume.frames):
            pixels[frame.frame_number - 1] = masks[k]
        return [volume.first], pixels
    sources = [volume.datasets[frame.dataset_index] for frame in volume.frames]
    return sources, masks


def build_segmentation(
    volume: CTVolume,
    segments: Sequence[SegmentFinding],
    algorithm: AlgorithmIdentity,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    content_description: str,
    segmentation_type: str = "BINARY",
) -> hd.seg.Segmentation:
    """A BINARY (default) or LABELMAP Segmentation of ``segments`` over the CT ``volume``.

    LABELMAP (Label Map Segmentation Storage, ...66.7) holds one segment per
    voxel: where segments overlap, the later one (lesions come after organs)
    keeps the voxel. Fewer viewers read it than BINARY.

    Study, patient and Frame of Reference come from the source (highdicom
    copies them); empty frames are omitted. ``series_description`` must fit
    in 64 characters (LO) and is used as is; ``content_description`` (the
    research notice) is shortened to 64 characters if needed.
    """
    check_algorithm(algorithm)
    check_long_string(series_description, "series_description")
    if segmentation_type not in ("BINARY", "LABELMAP"):
        raise ValueError(f"segmentation_type: {segmentation_type!r} is not 'BINARY' or 'LABELMAP'")
    ordered = _ordered_segments(volume, segments)
    labelmap = segmentation_type == "LABELMAP"
    sources, pixels = _source_and_pixels(volume, _label_map(ordered) if labelmap else _segment_array(ordered))
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues[segmentation_type],
            segment_descriptions=[_segment_description(s, algorithm) for s in ordered],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.software_version,
            # Type 1 in the Enhanced General Equipment Module (PS3.3 C.7.5.2);
            # software has no serial number, so the model build's Device UID
            # identifies the exact "device".
            device_serial_number=algorithm.device_uid,
            # Type 2 (Content Identification Macro, PS3.3 Table 10-12): empty if no notice.
            content_description=fit_long_string(content_description) or None,
            content_label="AI_SEGMENTATION",
            omit_empty_frames=True,
            series_description=series_description,
            contributing_equipment=[algorithm_equipment(algorithm)],
            specific_character_set=source_character_set(volume.first),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(
            f"highdicom refused the segmentation of series {volume.series_instance_uid}: {exc}"
        ) from exc
    set_device_uid(seg, algorithm)
    return seg
