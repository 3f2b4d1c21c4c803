"""CT series -> a HU volume on the exact source grid.

The volume keeps the LPS geometry of the source (PS3.3 C.7.6.2): voxel
``hu[k, r, c]`` is the pixel at row ``r`` and column ``c`` of ``frames[k]``, and
``frames`` is sorted along the normal of the image orientation. Results computed
on this grid therefore map back onto the source pixels without resampling.

A series whose instances are inconsistent is rejected with a reason, never
repaired (mixed orientation, different Frame of Reference, missing slices...).
:func:`check_geometry` runs those checks on headers alone (read with
``stop_before_pixels``), so that the eligibility rules can report them before
any pixel data is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipelines.errors import SeriesRejected

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

#: Relative tolerance on slice spacing before a series counts as irregular.
SPACING_TOLERANCE = 0.1
#: Tolerance on direction cosines (dot product) for "same orientation".
ORIENTATION_TOLERANCE = 1e-3
#: |cos| between the slice normal and a patient axis for a plane to be named
#: after that axis (axial: head-foot); below it on every axis the plane is oblique.
PLANE_MIN_COSINE = 0.9


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of the volume comes from: a dataset and a frame (1-based)."""

    dataset_index: int
    frame_number: int
    position: tuple[float, float, float]


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
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column) axes."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(self.slice_spacing * self.pixel_spacing[0] * self.pixel_spacing[1])

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of the centre of voxel (0, 0, 0)."""
        return np.asarray(self.frames[0].position, dtype=float)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def study_instance_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def is_multiframe(self) -> bool:
        return self.first.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE

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


def plane_of(normal: Sequence[float]) -> str:
    """``AXIAL``, ``CORONAL``, ``SAGITTAL`` or ``OBLIQUE`` for a slice normal in LPS.

    A plane is named after the patient axis its normal is within
    ``acos(PLANE_MIN_COSINE)`` (about 26 degrees) of, so a slightly angled
    axial acquisition is still axial.
    """
    n = np.asarray(normal, dtype=float)
    n = n / np.linalg.norm(n)
    axis = int(np.argmax(np.abs(n)))
    if abs(n[axis]) < PLANE_MIN_COSINE:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def read_series_files(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read DICOM files; an unreadable file rejects the series (named)."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(str(path)))
        except Exception as exc:  # pydicom raises many types for bad files
            raise SeriesRejected(f"unreadable instance {Path(path).name}: {exc}") from exc
    return datasets


def load_series(paths: Iterable[Path | str]) -> CTVolume:
    """Read the files of one series and build its :class:`CTVolume`."""
    return build_volume(read_series_files(paths))


@dataclass(frozen=True)
class SeriesGeometry:
    """The checked geometry of a series, from headers only (no pixel data needed).

    ``datasets`` are the distinct instances (duplicates of one SOP Instance UID
    dropped), in slice order for single-frame CT, or the one Enhanced CT
    instance; ``frames[k]`` is slice ``k`` in order along ``slice_direction``.
    """

    datasets: list[Dataset]
    frames: list[SourceFrame]
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    rows: int
    columns: int

    @property
    def slice_count(self) -> int:
        return len(self.frames)

    @property
    def coverage_mm(self) -> float:
        """Length covered along the normal: first to last slice centre plus one spacing."""
        first, last = (float(np.dot(f.position, self.slice_direction)) for f in (self.frames[0], self.frames[-1]))
        return abs(last - first) + self.slice_spacing


def check_geometry(datasets: list[Dataset], *, require_ct: bool = True) -> SeriesGeometry:
    """Check that the headers of ``datasets`` form one consistent volume.

    One series and SOP class, one Frame of Reference, one orientation, image
    size and pixel spacing, no two slices at one position, no missing slices,
    regular spacing, no gantry tilt or shear. Raises :class:`SeriesRejected`
    with the first problem found. ``require_ct=False`` checks the geometry of
    a series whatever its SOP class (the eligibility rules report that apart).
    """
    if not datasets:
        raise SeriesRejected("no instances")
    _require_same(datasets, "SeriesInstanceUID", "more than one Series Instance UID")
    _require_same(datasets, "SOPClassUID", "mixed SOP classes")
    sop_class = datasets[0].get("SOPClassUID")
    if require_ct and sop_class not in CT_SOP_CLASSES:
        raise SeriesRejected(f"SOP class {sop_class} is not CT Image or Enhanced CT Image")
    # Duplicates (same SOP Instance UID received twice) are harmless: keep one.
    unique: dict[str, Dataset] = {}
    for i, ds in enumerate(datasets):
        unique.setdefault(str(ds.get("SOPInstanceUID") or f"#{i}"), ds)
    datasets = list(unique.values())
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        if len(datasets) != 1:
            raise SeriesRejected(f"{len(datasets)} Enhanced CT instances in one series; expected one")
        return _enhanced_geometry(datasets[0])
    return _classic_geometry(datasets)


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


def _require_same(datasets: list[Dataset], keyword: str, reason: str) -> None:
    values = {str(getattr(ds, keyword, "")) for ds in datasets}
    if len(values) > 1:
        raise SeriesRejected(f"{reason} ({len(values)} distinct values of {keyword})")


def _orientation(value: Sequence[float] | None, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if value is None or len(value) != 6:
        raise SeriesRejected(f"{where}: Image Orientation (Patient) missing or malformed")
    row = np.asarray([float(v) for v in value[:3]])
    col = np.asarray([float(v) for v in value[3:]])
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-2) and np.isclose(np.linalg.norm(col), 1, atol=1e-2)):
        raise SeriesRejected(f"{where}: Image Orientation (Patient) is not made of unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal


def _sort_and_check_positions(
    positions: list[np.ndarray], normal: np.ndarray
) -> tuple[np.ndarray, float]:
    """Order slices along ``normal``; reject duplicates, gaps and uneven spacing."""
    if len(positions) < 2:
        raise SeriesRejected(f"only {len(positions)} slice; a volume needs at least 2")
    distances = np.asarray([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(distances, kind="stable")
    sorted_d = distances[order]
    steps = np.diff(sorted_d)
    if np.any(steps < 1e-3):
        raise SeriesRejected("two slices share one position (overlapping or duplicate slices)")
    spacing = float(np.median(steps))
    if np.any(np.abs(steps - spacing) > SPACING_TOLERANCE * spacing):
        worst = int(np.argmax(np.abs(steps - spacing)))
        # A gap of about a whole number of spacings is missing slices; a step
        # that is merely uneven (a misplaced slice) is irregular spacing.
        missing = round(steps[worst] / spacing) - 1
        if missing >= 1:
            raise SeriesRejected(
                f"missing slices: gap of {steps[worst]:.2f} mm between slices {worst + 1} and {worst + 2} "
                f"where the spacing is {spacing:.2f} mm (about {missing} missing)"
            )
        raise SeriesRejected(
            f"irregular slice spacing: {steps[worst]:.2f} mm between slices {worst + 1} and {worst + 2}, "
            f"median {spacing:.2f} mm"
        )
    # In-plane offsets between consecutive slices mean gantry tilt or a sheared stack.
    sorted_pos = np.asarray(positions)[order]
    offsets = np.diff(sorted_pos, axis=0) - np.outer(steps, normal)
    if np.max(np.linalg.norm(offsets, axis=1)) > 0.05 * spacing + 1e-3:
        raise SeriesRejected("slice positions are not along the image normal (gantry tilt or sheared stack)")
    return order, spacing


def _hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _pixel_array(ds: Dataset, where: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # missing decoder, truncated pixel data, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesRejected(f"{where}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc


def _classic_geometry(datasets: list[Dataset]) -> SeriesGeometry:
    first = datasets[0]
    _require_same(datasets, "FrameOfReferenceUID", "different Frame of Reference UIDs")
    if not getattr(first, "FrameOfReferenceUID", None):
        raise SeriesRejected("Frame of Reference UID missing")
    row, col, normal = _orientation(getattr(first, "ImageOrientationPatient", None), "first slice")
    rows, cols = _size(first, "first slice")
    spacing_rc = getattr(first, "PixelSpacing", None)
    if spacing_rc is None or len(spacing_rc) != 2:
        raise SeriesRejected("Pixel Spacing missing")
    positions = []
    for i, ds in enumerate(datasets):
        r2, c2, _ = _orientation(getattr(ds, "ImageOrientationPatient", None), f"instance {i + 1}")
        if np.dot(r2, row) < 1 - ORIENTATION_TOLERANCE or np.dot(c2, col) < 1 - ORIENTATION_TOLERANCE:
            raise SeriesRejected("mixed image orientations in one series")
        size = _size(ds, f"instance {i + 1}")
        if size != (rows, cols):
            raise SeriesRejected(f"mixed image sizes ({rows}x{cols} and {size[0]}x{size[1]})")
        if [float(v) for v in (getattr(ds, "PixelSpacing", None) or [])] != [float(v) for v in spacing_rc]:
            raise SeriesRejected("mixed pixel spacings in one series")
        ipp = getattr(ds, "ImagePositionPatient", None)
        if ipp is None or len(ipp) != 3:
            raise SeriesRejected(f"instance {i + 1}: Image Position (Patient) missing")
        positions.append(np.asarray([float(v) for v in ipp]))
    order, spacing = _sort_and_check_positions(positions, normal)
    return SeriesGeometry(
        datasets=[datasets[i] for i in order],
        frames=[
            SourceFrame(dataset_index=k, frame_number=1, position=tuple(positions[i]))
            for k, i in enumerate(order)
        ],
        row_direction=row,
        column_direction=col,
        slice_direction=normal,
        pixel_spacing=(float(spacing_rc[0]), float(spacing_rc[1])),
        slice_spacing=spacing,
        rows=rows,
        columns=cols,
    )


def _size(ds: Dataset, where: str) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise SeriesRejected(f"{where}: Rows or Columns missing")
    return int(rows), int(cols)


def _functional(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """A functional group item for one frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value):
            return item[sequence].value[0]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and sequence in shared[0] and len(shared[0][sequence].value):
        return shared[0][sequence].value[0]
    return None


def _frame_rescale(ds: Dataset, frame_index: int) -> tuple[float, float]:
    """Rescale slope and intercept of one Enhanced CT frame (Pixel Value Transformation)."""
    transform = _functional(ds, frame_index, "PixelValueTransformationSequence")
    if transform is None:
        return 1.0, 0.0
    return float(getattr(transform, "RescaleSlope", 1) or 1), float(getattr(transform, "RescaleIntercept", 0) or 0)


def _rescale(ds: Dataset, frame_number: int) -> tuple[float, float]:
    """Rescale slope and intercept of one frame (1-based) of a CT or Enhanced CT instance."""
    if ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE:
        return _frame_rescale(ds, frame_number - 1)
    return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)


def _enhanced_geometry(ds: Dataset) -> SeriesGeometry:
    if not getattr(ds, "FrameOfReferenceUID", None):
        raise SeriesRejected("Frame of Reference UID missing")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    row = col = normal = None
    spacing_rc = None
    positions = []
    for f in range(n_frames):
        orient = _functional(ds, f, "PlaneOrientationSequence")
        measures = _functional(ds, f, "PixelMeasuresSequence")
        position = _functional(ds, f, "PlanePositionSequence")
        if orient is None or measures is None or position is None:
            raise SeriesRejected(f"frame {f + 1}: plane orientation, position or pixel measures missing")
        r2, c2, n2 = _orientation(orient.get("ImageOrientationPatient"), f"frame {f + 1}")
        pixel_spacing = [float(v) for v in (measures.get("PixelSpacing") or [])]
        if len(pixel_spacing) != 2:
            raise SeriesRejected(f"frame {f + 1}: Pixel Spacing missing")
        if row is None:
            row, col, normal, spacing_rc = r2, c2, n2, pixel_spacing
        elif np.dot(r2, row) < 1 - ORIENTATION_TOLERANCE or np.dot(c2, col) < 1 - ORIENTATION_TOLERANCE:
            raise SeriesRejected("mixed image orientations in one series")
        elif pixel_spacing != spacing_rc:
            raise SeriesRejected("mixed pixel spacings in one series")
        ipp = position.get("ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            raise SeriesRejected(f"frame {f + 1}: Image Position (Patient) missing")
        positions.append(np.asarray([float(v) for v in ipp]))
    order, spacing = _sort_and_check_positions(positions, normal)
    rows, cols = _size(ds, "Enhanced CT")
    return SeriesGeometry(
        datasets=[ds],
        frames=[SourceFrame(dataset_index=0, frame_number=int(f) + 1, position=tuple(positions[f])) for f in order],
        row_direction=row,
        column_direction=col,
        slice_direction=normal,
        pixel_spacing=(spacing_rc[0], spacing_rc[1]),
        slice_spacing=spacing,
        rows=rows,
        columns=cols,
    )
