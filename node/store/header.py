"""The header facts of one received instance, read once at intake and recorded in the state store.

It sits below both the intake, which produces an :class:`InstanceHeader` from a
received dataset, and the state store, which records it; it imports neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from node.store.spool import check_uid


@dataclass(frozen=True)
class InstanceHeader:
    """The header facts the node needs before the pipeline runs (completion, routing)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    position: float | None  # Image Position projected on the slice normal (mm)
    orientation: str | None  # Image Orientation (Patient), rounded, as text
    images_in_acquisition: int | None
    number_of_frames: int | None


def _float_list(value: object) -> list[float] | None:
    if not isinstance(value, Iterable):
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def read_header(ds: Dataset) -> InstanceHeader:
    """Extract and check the identifying attributes; raises SpoolError / ValueError."""
    study = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    series = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
    sop = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
    sop_class = check_uid(ds.get("SOPClassUID"), "SOP Class UID")
    position = orientation = None
    iop = _float_list(ds.get("ImageOrientationPatient"))
    ipp = _float_list(ds.get("ImagePositionPatient"))
    if iop is not None and len(iop) == 6 and ipp is not None and len(ipp) == 3:
        row, col = iop[:3], iop[3:]
        normal = (
            row[1] * col[2] - row[2] * col[1],
            row[2] * col[0] - row[0] * col[2],
            row[0] * col[1] - row[1] * col[0],
        )
        position = sum(p * n for p, n in zip(ipp, normal))
        orientation = "\\".join(f"{v:.4f}" for v in iop)

    def positive_int(keyword: str) -> int | None:
        try:
            value = int(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None

    return InstanceHeader(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        position=position,
        orientation=orientation,
        images_in_acquisition=positive_int("ImagesInAcquisition"),
        number_of_frames=positive_int("NumberOfFrames"),
    )


#: What the intake reads of a received dataset: identity, geometry for early completion, pixel size checks.
HEADER_TAGS: list[BaseTag | int] = [
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
        "ImagesInAcquisition", "ImagePositionPatient", "ImageOrientationPatient", "SamplesPerPixel", "Rows",
        "Columns", "BitsAllocated", "NumberOfFrames", "PixelData",
    )
]

