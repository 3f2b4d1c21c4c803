"""Series geometry from headers alone: orientation, plane, slice order, spacing and gaps.

Everything here reads the geometry attributes of a series (PS3.3 C.7.6.2
Image Plane, and for Enhanced CT the Plane Orientation / Plane Position /
Pixel Measures functional groups of C.7.6.16) and no pixel data, so it can run
on headers read with ``stop_before_pixels``.

One rule decides whether the slice positions of a series form an evenly
spaced run without gaps, :func:`check_slice_spacing`, with one tolerance,
:data:`SPACING_TOLERANCE`. Three places ask it:

- :mod:`pipelines.volume.ct` before it builds a volume (a gap rejects the series);
- :mod:`pipelines.rules.ruleset` for the derived values ``slice_spacing_mm``,
  ``coverage_mm``, ``orientation`` and ``geometry_problem``;
- ``node.store.state.gap_free``, to queue a series as soon as the association
  that carried it whole is released.

With one rule, a series the node calls complete early is one whose spacing
the pipeline accepts, and every real gap stops both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipelines.errors import SeriesRejected

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

#: Largest deviation of one slice step from the median step, relative to the
#: median, for slice positions to count as one evenly spaced run. A missing
#: slice makes a step of about twice the spacing (a deviation of 1.0 or more),
#: far above it; what stays below it is the rounding and reconstruction jitter
#: of the recorded positions, which must not reject a series.
SPACING_TOLERANCE = 0.1
#: Steps shorter than this (mm) mean two slices at one position.
SAME_POSITION_MM = 1e-3
#: Tolerance on direction cosines (dot product) for "same orientation".
ORIENTATION_TOLERANCE = 1e-3
#: |cos| between the slice normal and a patient axis for a plane to be named
#: after that axis (axial: head-foot); below it on every axis the plane is oblique.
PLANE_MIN_COSINE = 0.9
#: Largest in-plane offset between neighbouring slices, relative to the spacing,
#: before the stack counts as tilted or sheared.
SHEAR_TOLERANCE = 0.05


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of the volume comes from: a dataset and a frame (1-based)."""

    dataset_index: int
    frame_number: int
    position: tuple[float, float, float]


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
        """Number of slices (instances, or frames of the one Enhanced CT instance)."""
        return len(self.frames)

    @property
    def coverage_mm(self) -> float:
        """Length covered along the normal: first to last slice centre plus one spacing."""
        first, last = (distance_along(f.position, self.slice_direction) for f in (self.frames[0], self.frames[-1]))
        return coverage_mm(first, last, self.slice_spacing)


# --------------------------------------------------------------------------- orientation and plane


def plane_of(normal: Sequence[float] | np.ndarray) -> str:
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


def orientation_vectors(
    value: Sequence[float] | None, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, normal) LPS directions of an Image Orientation (Patient) value.

    The row and column cosines must be unit vectors (within 1 %); they are
    normalised and the normal is their cross product. Raises
    :class:`SeriesRejected` naming ``where`` otherwise.
    """
    if value is None or len(value) != 6:
        raise SeriesRejected(f"{where}: Image Orientation (Patient) missing or malformed")
    row = np.asarray([float(v) for v in value[:3]])
    col = np.asarray([float(v) for v in value[3:]])
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-2) and np.isclose(np.linalg.norm(col), 1, atol=1e-2)):
        raise SeriesRejected(f"{where}: Image Orientation (Patient) is not made of unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal


def slice_normal(value: Sequence[float] | np.ndarray) -> np.ndarray | None:
    """The unit slice normal of six direction cosines, or None when they give none.

    Lenient on purpose, unlike :func:`orientation_vectors`: the eligibility
    rules report the plane of a series even when its geometry is rejected.
    """
    if len(value) != 6:
        return None
    cosines = np.asarray(value, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    if not np.linalg.norm(normal) > 0.5:
        return None
    return np.asarray(normal / np.linalg.norm(normal))


def same_orientation(row: np.ndarray, col: np.ndarray, other_row: np.ndarray, other_col: np.ndarray) -> bool:
    """Whether two (unit) row/column direction pairs are the same orientation."""
    return bool(np.dot(other_row, row) >= 1 - ORIENTATION_TOLERANCE
                and np.dot(other_col, col) >= 1 - ORIENTATION_TOLERANCE)


# --------------------------------------------------------------------------- positions, spacing, gaps


def distance_along(position: Sequence[float] | np.ndarray, normal: np.ndarray) -> float:
    """Signed distance (mm) of an LPS position along the slice normal."""
    return float(np.dot(position, normal))


def median_step(sorted_distances: Sequence[float] | np.ndarray) -> float:
    """Median distance between neighbouring slice positions, given sorted along the normal."""
    return float(np.median(np.diff(np.asarray(sorted_distances, dtype=float))))


def coverage_mm(first: float, last: float, spacing: float) -> float:
    """Length a run of slices covers: first to last slice centre plus one spacing."""
    return abs(last - first) + spacing


def check_slice_spacing(distances: Sequence[float] | np.ndarray) -> tuple[np.ndarray, float]:
    """Order slices by their distance along the normal; reject duplicates, gaps and uneven spacing.

    Returns (the slice indices in order along the normal, the median
    spacing in mm). Raises :class:`SeriesRejected` with a human-readable
    reason: fewer than 2 slices, two slices at one position, missing slices
    (a step of about a whole number of spacings), or irregular spacing (a
    step off the median by more than :data:`SPACING_TOLERANCE`).
    """
    if len(distances) < 2:
        raise SeriesRejected(f"only {len(distances)} slice; a volume needs at least 2")
    d = np.asarray(distances, dtype=float)
    order = np.argsort(d, kind="stable")
    sorted_d = d[order]
    steps = np.diff(sorted_d)
    if np.any(steps < SAME_POSITION_MM):
        raise SeriesRejected("two slices share one position (overlapping or duplicate slices)")
    spacing = median_step(sorted_d)
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
    return order, spacing


def check_positions(positions: Sequence[np.ndarray], normal: np.ndarray) -> tuple[np.ndarray, float]:
    """Order slice positions (LPS) along ``normal``; reject gaps, uneven spacing and tilt.

    :func:`check_slice_spacing` on the distances along the normal, then the
    in-plane offsets between neighbouring slices: beyond
    :data:`SHEAR_TOLERANCE` of the spacing the stack has gantry tilt or is
    sheared. Returns (slice indices in order, spacing in mm).
    """
    distances = np.asarray([distance_along(p, normal) for p in positions])
    order, spacing = check_slice_spacing(distances)
    steps = np.diff(distances[order])
    sorted_pos = np.asarray(positions)[order]
    offsets = np.diff(sorted_pos, axis=0) - np.outer(steps, normal)
    if np.max(np.linalg.norm(offsets, axis=1)) > SHEAR_TOLERANCE * spacing + SAME_POSITION_MM:
        raise SeriesRejected("slice positions are not along the image normal (gantry tilt or sheared stack)")
    return order, spacing


# --------------------------------------------------------------------------- whole series


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


def functional_group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """A functional group item for one frame (0-based): per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index]
        if sequence in item and len(item[sequence].value):
            found: Dataset = item[sequence].value[0]
            return found
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and sequence in shared[0] and len(shared[0][sequence].value):
        found = shared[0][sequence].value[0]
        return found
    return None


def _require_same(datasets: list[Dataset], keyword: str, reason: str) -> None:
    values = {str(getattr(ds, keyword, "")) for ds in datasets}
    if len(values) > 1:
        raise SeriesRejected(f"{reason} ({len(values)} distinct values of {keyword})")


def _size(ds: Dataset, where: str) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise SeriesRejected(f"{where}: Rows or Columns missing")
    return int(rows), int(cols)


def _position(value: np.ndarray) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in value)
    return x, y, z


def _classic_geometry(datasets: list[Dataset]) -> SeriesGeometry:
    first = datasets[0]
    _require_same(datasets, "FrameOfReferenceUID", "different Frame of Reference UIDs")
    if not getattr(first, "FrameOfReferenceUID", None):
        raise SeriesRejected("Frame of Reference UID missing")
    row, col, normal = orientation_vectors(getattr(first, "ImageOrientationPatient", None), "first slice")
    rows, cols = _size(first, "first slice")
    spacing_rc = getattr(first, "PixelSpacing", None)
    if spacing_rc is None or len(spacing_rc) != 2:
        raise SeriesRejected("Pixel Spacing missing")
    positions = []
    for i, ds in enumerate(datasets):
        r2, c2, _ = orientation_vectors(getattr(ds, "ImageOrientationPatient", None), f"instance {i + 1}")
        if not same_orientation(row, col, r2, c2):
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
    order, spacing = check_positions(positions, normal)
    return SeriesGeometry(
        datasets=[datasets[i] for i in order],
        frames=[
            SourceFrame(dataset_index=k, frame_number=1, position=_position(positions[i]))
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


def _enhanced_geometry(ds: Dataset) -> SeriesGeometry:
    if not getattr(ds, "FrameOfReferenceUID", None):
        raise SeriesRejected("Frame of Reference UID missing")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    first: tuple[np.ndarray, np.ndarray, np.ndarray, list[float]] | None = None
    positions = []
    for f in range(n_frames):
        orient = functional_group_item(ds, f, "PlaneOrientationSequence")
        measures = functional_group_item(ds, f, "PixelMeasuresSequence")
        position = functional_group_item(ds, f, "PlanePositionSequence")
        if orient is None or measures is None or position is None:
            raise SeriesRejected(f"frame {f + 1}: plane orientation, position or pixel measures missing")
        r2, c2, n2 = orientation_vectors(orient.get("ImageOrientationPatient"), f"frame {f + 1}")
        pixel_spacing = [float(v) for v in (measures.get("PixelSpacing") or [])]
        if len(pixel_spacing) != 2:
            raise SeriesRejected(f"frame {f + 1}: Pixel Spacing missing")
        if first is None:
            first = (r2, c2, n2, pixel_spacing)
        elif not same_orientation(first[0], first[1], r2, c2):
            raise SeriesRejected("mixed image orientations in one series")
        elif pixel_spacing != first[3]:
            raise SeriesRejected("mixed pixel spacings in one series")
        ipp = position.get("ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            raise SeriesRejected(f"frame {f + 1}: Image Position (Patient) missing")
        positions.append(np.asarray([float(v) for v in ipp]))
    if first is None:
        raise SeriesRejected("Enhanced CT instance without frames")
    row, col, normal, spacing_rc = first
    order, spacing = check_positions(positions, normal)
    rows, cols = _size(ds, "Enhanced CT")
    return SeriesGeometry(
        datasets=[ds],
        frames=[
            SourceFrame(dataset_index=0, frame_number=int(f) + 1, position=_position(positions[f])) for f in order
        ],
        row_direction=row,
        column_direction=col,
        slice_direction=normal,
        pixel_spacing=(spacing_rc[0], spacing_rc[1]),
        slice_spacing=spacing,
        rows=rows,
        columns=cols,
    )
