"""CT series -> a HU volume on the exact source grid.

The volume keeps the LPS geometry of the source (PS3.3 C.7.6.2): voxel
``hu[k, r, c]`` is the pixel at row ``r`` and column ``c`` of ``frames[k]``, and
``frames`` is sorted along the normal of the image orientation. Results computed
on this grid therefore map back onto the source pixels without resampling.

A series whose instances are inconsistent is rejected with a reason, never
repaired (mixed orientation, different Frame of Reference, missing slices...).
Those checks run on headers alone, in :mod:`pipelines.volume.geometry`
(:func:`check_geometry`), so that the eligibility rules can report them before
any pixel data is decoded; this module decodes the pixels into HU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipelines.errors import SeriesRejected
from pipelines.volume.geometry import (
    CT_SOP_CLASSES,
    ENHANCED_CT_IMAGE_STORAGE,
    SourceFrame,
    check_geometry,
    functional_group_item,
)

# CT_SOP_CLASSES and SourceFrame (pipelines.volume.geometry) stay importable from here,
# next to the CTVolume whose frames they describe.
__all__ = [
    "CT_SOP_CLASSES",
    "ENHANCED_CT_IMAGE_STORAGE",
    "CTVolume",
    "SourceFrame",
    "build_volume",
    "load_series",
    "read_series_files",
]


@dataclass
class CTVolume:
    """A CT series as HU voxels with its geometry and its source headers.

    ``datasets`` holds the source instances (full datasets, pixel data
    included) in slice order for single-frame CT, or the one Enhanced CT
    instance. ``frames[k]`` says where slice ``k`` of ``hu`` comes from.
    """

    datasets: list[Dataset]
    frames: list[SourceFrame]
    hu: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) of :attr:`hu`."""
        slices, rows, columns = self.hu.shape
        return int(slices), int(rows), int(columns)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column) axes."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return float(self.slice_spacing * self.pixel_spacing[0] * self.pixel_spacing[1])

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of the centre of voxel (0, 0, 0)."""
        return np.asarray(self.frames[0].position, dtype=float)

    @property
    def first(self) -> Dataset:
        """The first source instance (the one Enhanced CT instance, or the first slice)."""
        return self.datasets[0]

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID of the source series."""
        return str(self.first.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID of the source series."""
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        """Frame of Reference UID of the source series."""
        return str(self.first.FrameOfReferenceUID)

    @property
    def is_multiframe(self) -> bool:
        """Whether the volume comes from one Enhanced CT instance."""
        return bool(self.first.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE)

    def voxel_to_lps(self, index_zyx: Sequence[float]) -> np.ndarray:
        """LPS coordinates (mm) of a (slice, row, column) voxel index."""
        k, r, c = (float(v) for v in index_zyx)
        return (
            self.origin
            + k * self.slice_spacing * self.slice_direction
            + r * self.pixel_spacing[0] * self.column_direction
            + c * self.pixel_spacing[1] * self.row_direction
        )

    def rescale(self, k: int) -> tuple[float, float]:
        """(Rescale Slope, Rescale Intercept) that turn the stored pixel values of slice ``k`` into HU."""
        frame = self.frames[k]
        return _rescale(self.datasets[frame.dataset_index], frame.frame_number)


def read_series_files(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read DICOM files; an unreadable file rejects the series (named)."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(str(path)))
        except Exception as exc:  # pydicom raises many types for bad files
            raise SeriesRejected(f"unreadable instance {Path(path).name}: {exc}") from exc
    return datasets


def load_series(paths: Iterable[Path | str]) -> CTVolume:
    """Read the files of one series and build its :class:`CTVolume`."""
    return build_volume(read_series_files(paths))


def build_volume(datasets: list[Dataset]) -> CTVolume:
    """Check that ``datasets`` form one consistent CT volume and build it.

    Raises :class:`SeriesRejected` with a human-readable reason otherwise.
    """
    geometry = check_geometry(datasets)
    hu = np.empty((geometry.slice_count, geometry.rows, geometry.columns), dtype=np.float32)
    if geometry.datasets[0].SOPClassUID == ENHANCED_CT_IMAGE_STORAGE:
        ds = geometry.datasets[0]
        pixels = _pixel_array(ds, "Enhanced CT")
        if pixels.ndim == 2:
            pixels = pixels[np.newaxis]
        for k, frame in enumerate(geometry.frames):
            index = frame.frame_number - 1
            hu[k] = _hu(pixels[index], *_frame_rescale(ds, index))
    else:
        for k, ds in enumerate(geometry.datasets):
            hu[k] = _hu(_pixel_array(ds, f"slice {k + 1}"), *_rescale(ds, 1))
    return CTVolume(
        datasets=geometry.datasets,
        frames=geometry.frames,
        hu=hu,
        row_direction=geometry.row_direction,
        column_direction=geometry.column_direction,
        slice_direction=geometry.slice_direction,
        pixel_spacing=geometry.pixel_spacing,
        slice_spacing=geometry.slice_spacing,
    )


def _hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _pixel_array(ds: Dataset, where: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # missing decoder, truncated pixel data, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesRejected(f"{where}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc


def _frame_rescale(ds: Dataset, frame_index: int) -> tuple[float, float]:
    """Rescale slope and intercept of one Enhanced CT frame (Pixel Value Transformation)."""
    transform = functional_group_item(ds, frame_index, "PixelValueTransformationSequence")
    if transform is None:
        return 1.0, 0.0
    return float(getattr(transform, "RescaleSlope", 1) or 1), float(getattr(transform, "RescaleIntercept", 0) or 0)


def _rescale(ds: Dataset, frame_number: int) -> tuple[float, float]:
    """Rescale slope and intercept of one frame (1-based) of a CT or Enhanced CT instance."""
    if ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE:
        return _frame_rescale(ds, frame_number - 1)
    return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
