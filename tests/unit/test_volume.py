"""CT series -> CTVolume: ordering, HU, geometry, and rejection of inconsistent series.

Every test works on in-memory copies of the files under ``tests/data``; the
files themselves are never modified.
"""

from __future__ import annotations

import copy
import random
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.errors import SeriesRejected
from pipelines.volume.ct import CTVolume, build_volume, load_series
from pipelines.volume.geometry import (
    ENHANCED_CT_IMAGE_STORAGE,
    SPACING_TOLERANCE,
    check_geometry,
    check_slice_spacing,
    plane_of,
)
from support.data import ABDOMEN, DATA, abdomen_files

SINGLE = DATA / "single-slices"
CHEST = DATA / "chest-3slice"


@cache
def _abdomen_originals() -> tuple[Dataset, ...]:
    datasets = tuple(pydicom.dcmread(str(p)) for p in abdomen_files())
    for ds in datasets:
        ds.pixel_array  # decode once; copies share nothing with these  # noqa: B018
    return datasets


def abdomen(start: int = 0, stop: int | None = None) -> list[Dataset]:
    """Fresh deep copies of abdomen slices ``start:stop`` (file order = ascending z)."""
    return [copy.deepcopy(ds) for ds in _abdomen_originals()[start:stop]]


def _z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _rejected(datasets: list[Dataset]) -> str:
    with pytest.raises(SeriesRejected) as info:
        build_volume(datasets)
    assert info.value.reason == str(info.value)
    return info.value.reason.lower()


# --------------------------------------------------------------------------- ordering, HU, spacing


def test_abdomen_files_load_as_one_volume() -> None:
    volume = load_series(abdomen_files())
    assert volume.shape == (112, 101, 122)
    assert volume.hu.dtype == np.float32
    assert volume.pixel_spacing == (3.0, 3.0)
    assert volume.slice_spacing == pytest.approx(3.0, abs=1e-3)
    assert volume.voxel_volume_mm3 == pytest.approx(27.0, rel=1e-3)
    np.testing.assert_allclose(volume.slice_direction, [0, 0, 1], atol=1e-9)
    assert not volume.is_multiframe
    assert volume.series_instance_uid == str(pydicom.dcmread(str(abdomen_files()[0])).SeriesInstanceUID)
    # Air outside the patient and bone inside it: a real CT HU range.
    assert volume.hu.min() < -900 and volume.hu.max() > 1000


def test_shuffled_slices_come_out_sorted_along_the_normal() -> None:
    datasets = abdomen(0, 30)
    expected_uids = [str(ds.SOPInstanceUID) for ds in sorted(datasets, key=_z)]
    shuffled = datasets[:]
    random.Random(1234).shuffle(shuffled)
    assert [str(ds.SOPInstanceUID) for ds in shuffled] != expected_uids
    volume = build_volume(shuffled)

    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == expected_uids
    distances = [float(np.dot(f.position, volume.slice_direction)) for f in volume.frames]
    assert np.all(np.diff(distances) > 0)
    for k, (frame, ds) in enumerate(zip(volume.frames, volume.datasets)):
        assert frame.dataset_index == k and frame.frame_number == 1
        np.testing.assert_allclose(frame.position, [float(v) for v in ds.ImagePositionPatient])
        # hu[k] is the pixel data of the k-th slice in that order, untouched (slope 1, intercept 0).
        np.testing.assert_array_equal(volume.hu[k], ds.pixel_array.astype(np.float32))


def test_order_follows_the_normal_not_the_z_coordinate() -> None:
    """A flipped column direction makes the normal point to the feet: order by descending z."""
    datasets = abdomen(10, 20)
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
    random.Random(5).shuffle(datasets)
    volume = build_volume(datasets)
    np.testing.assert_allclose(volume.slice_direction, [0, 0, -1], atol=1e-9)
    z = [f.position[2] for f in volume.frames]
    assert np.all(np.diff(z) < 0)
    assert volume.slice_spacing == pytest.approx(3.0, abs=1e-3)


def test_chest_series_sorted_with_1mm_spacing() -> None:
    volume = load_series(sorted(CHEST.glob("*.dcm")))
    assert volume.shape == (3, 512, 512)
    assert volume.slice_spacing == pytest.approx(1.0, abs=1e-3)
    z = [f.position[2] for f in volume.frames]
    assert z == sorted(z)


def test_hu_is_stored_value_times_slope_plus_intercept() -> None:
    datasets = abdomen(40, 44)
    stored = [ds.pixel_array.astype(np.float64) for ds in datasets]
    datasets[1].RescaleSlope = 2
    datasets[1].RescaleIntercept = -1024
    datasets[2].RescaleSlope = "0.5"
    datasets[2].RescaleIntercept = 100
    del datasets[3].RescaleSlope  # absent: slope 1
    del datasets[3].RescaleIntercept  # absent: intercept 0
    volume = build_volume(datasets[::-1])  # reversed input: the order is still by position
    np.testing.assert_allclose(volume.hu[0], stored[0])
    np.testing.assert_allclose(volume.hu[1], stored[1] * 2 - 1024)
    np.testing.assert_allclose(volume.hu[2], stored[2] * 0.5 + 100)
    np.testing.assert_allclose(volume.hu[3], stored[3])


def test_slice_spacing_comes_from_positions_not_from_slice_thickness() -> None:
    datasets = abdomen(0, 8)
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [-185.0437, -311.3190, 10.0 + 2.5 * k]
        ds.SliceThickness = 5  # ignored: spacing is measured, thickness may overlap
    volume = build_volume(datasets)
    assert volume.slice_spacing == pytest.approx(2.5, abs=1e-6)
    assert volume.spacing_zyx == pytest.approx((2.5, 3.0, 3.0))
    assert volume.voxel_volume_mm3 == pytest.approx(22.5)


@pytest.mark.parametrize(
    "orientation",
    [
        [1, 0, 0, 0, 1, 0],
        # rotated 30 degrees in the axial plane
        [np.cos(np.pi / 6), np.sin(np.pi / 6), 0, -np.sin(np.pi / 6), np.cos(np.pi / 6), 0],
        # oblique: row tilted out of the axial plane
        [1, 0, 0, 0, np.cos(0.3), np.sin(0.3)],
    ],
    ids=["axial", "rotated-in-plane", "oblique"],
)
def test_voxel_to_lps_follows_the_dicom_geometry(orientation: list[float]) -> None:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    origin = np.asarray([-100.0, 50.0, 20.0])
    datasets = abdomen(0, 6)
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in orientation]
        ds.PixelSpacing = [0.5, 0.8]  # row spacing (between rows), column spacing (between columns)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + 4.0 * k * normal]
    random.Random(7).shuffle(datasets)
    volume = build_volume(datasets)
    assert volume.pixel_spacing == (0.5, 0.8)
    assert volume.slice_spacing == pytest.approx(4.0, abs=1e-4)
    for k, ds in enumerate(volume.datasets):
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.voxel_to_lps((k, 0, 0)), ipp, atol=1e-4)
        # one row down moves by PixelSpacing[0] along the column direction ...
        np.testing.assert_allclose(volume.voxel_to_lps((k, 1, 0)) - ipp, 0.5 * col, atol=1e-4)
        # ... one column right by PixelSpacing[1] along the row direction.
        np.testing.assert_allclose(volume.voxel_to_lps((k, 0, 1)) - ipp, 0.8 * row, atol=1e-4)
        np.testing.assert_allclose(
            volume.voxel_to_lps((k, 10, 7)), ipp + 10 * 0.5 * col + 7 * 0.8 * row, atol=1e-4
        )
    np.testing.assert_allclose(volume.origin, origin, atol=1e-4)


# --------------------------------------------------------------------------- rejections


def test_missing_slice_in_the_middle_is_rejected() -> None:
    datasets = abdomen(0, 40)
    del datasets[20]
    reason = _rejected(datasets)
    assert "missing slices" in reason
    assert "6.00 mm" in reason and "3.00 mm" in reason


def test_several_missing_slices_are_counted() -> None:
    datasets = abdomen(0, 40)
    del datasets[20:23]
    reason = _rejected(datasets)
    assert "missing slices" in reason and "about 3 missing" in reason


def test_irregular_spacing_is_rejected() -> None:
    datasets = abdomen(0, 20)
    datasets[10].ImagePositionPatient = [-185.0437, -311.3190, _z(datasets[10]) + 1.0]
    reason = _rejected(datasets)
    # 4 mm then 2 mm: a misplaced slice, not a missing one
    assert "irregular slice spacing" in reason and "missing" not in reason


def test_mixed_orientation_is_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # one coronal slice
    assert "mixed image orientations" in _rejected(datasets)


def test_slightly_rotated_slice_is_rejected() -> None:
    datasets = abdomen(0, 12)
    a = np.deg2rad(5)
    datasets[7].ImageOrientationPatient = [np.cos(a), np.sin(a), 0, -np.sin(a), np.cos(a), 0]
    assert "mixed image orientations" in _rejected(datasets)


def test_different_frame_of_reference_is_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[6].FrameOfReferenceUID = generate_uid()
    assert "different frame of reference" in _rejected(datasets)


def test_missing_frame_of_reference_is_rejected() -> None:
    ds = pydicom.dcmread(str(SINGLE / "693_UNCR.dcm"))  # a CT slice without a Frame of Reference UID
    assert "FrameOfReferenceUID" not in ds
    second = copy.deepcopy(ds)
    second.SOPInstanceUID = generate_uid()
    second.ImagePositionPatient = [-122.5, -112.4, 50.0]
    assert "frame of reference uid missing" in _rejected([ds, second])


def test_mixed_series_uids_are_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[3].SeriesInstanceUID = generate_uid()
    assert "more than one series instance uid" in _rejected(datasets)


def test_non_ct_sop_class_is_rejected() -> None:
    datasets = abdomen(0, 12)
    for ds in datasets:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert "is not ct image" in _rejected(datasets)


def test_mixed_sop_classes_are_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[2].SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    assert "mixed sop classes" in _rejected(datasets)


def test_mixed_pixel_spacing_is_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[4].PixelSpacing = [2.5, 2.5]
    assert "mixed pixel spacings" in _rejected(datasets)


def test_pixel_spacing_missing_on_a_later_slice_is_a_rejection() -> None:
    datasets = abdomen(0, 12)
    del datasets[4].PixelSpacing
    assert "pixel spacing" in _rejected(datasets)
    datasets = abdomen(0, 12)
    del datasets[0].PixelSpacing
    assert "pixel spacing missing" in _rejected(datasets)


def test_mixed_image_sizes_are_rejected() -> None:
    datasets = abdomen(0, 12)
    datasets[4].Rows = 100
    assert "mixed image sizes" in _rejected(datasets)


def test_missing_position_is_rejected() -> None:
    datasets = abdomen(0, 12)
    del datasets[4].ImagePositionPatient
    assert "image position (patient) missing" in _rejected(datasets)


def test_duplicate_sop_instances_are_deduplicated() -> None:
    datasets = abdomen(0, 20)
    doubled = datasets + [copy.deepcopy(datasets[3]), copy.deepcopy(datasets[17])]
    random.Random(3).shuffle(doubled)
    volume = build_volume(doubled)
    assert volume.shape == (20, 101, 122)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    assert len(set(uids)) == 20
    assert uids == [str(ds.SOPInstanceUID) for ds in sorted(datasets, key=_z)]


def test_two_slices_at_the_same_position_are_rejected() -> None:
    datasets = abdomen(0, 20)
    extra = copy.deepcopy(datasets[8])
    extra.SOPInstanceUID = generate_uid()  # a different instance at slice 8's position
    reason = _rejected(datasets + [extra])
    assert "share one position" in reason


def test_gantry_tilt_shear_is_rejected() -> None:
    datasets = abdomen(0, 20)
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        # a 10 degree gantry tilt: each 3 mm step also moves 0.53 mm along y
        ds.ImagePositionPatient = [x, y + k * 3.0 * np.tan(np.deg2rad(10)), z]
    assert "gantry tilt" in _rejected(datasets)


def test_a_single_slice_is_not_a_volume() -> None:
    assert "at least 2" in _rejected(abdomen(0, 1))


def test_no_instances_is_rejected() -> None:
    assert "no instances" in _rejected([])


def test_unreadable_file_is_rejected_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"this is not DICOM at all" * 3)
    with pytest.raises(SeriesRejected) as info:
        load_series([*abdomen_files()[:3], bad])
    assert "unreadable instance broken.dcm" in info.value.reason


# --------------------------------------------------------------------------- other encodings


def test_enhanced_ct_loads_with_two_frames() -> None:
    volume = load_series([SINGLE / "eCT_Supplemental.dcm"])
    ds = volume.first
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
    assert volume.is_multiframe
    assert volume.shape == (2, 512, 512)
    assert len(volume.datasets) == 1
    assert all(f.dataset_index == 0 for f in volume.frames)
    assert sorted(f.frame_number for f in volume.frames) == [1, 2]
    distances = [float(np.dot(f.position, volume.slice_direction)) for f in volume.frames]
    assert distances[1] > distances[0]
    assert volume.slice_spacing == pytest.approx(10.0)
    assert volume.pixel_spacing == pytest.approx((0.388672, 0.388672))
    # Shared Pixel Value Transformation: slope 1, intercept -1024, applied per frame.
    pixels = ds.pixel_array
    for k, frame in enumerate(volume.frames):
        np.testing.assert_array_equal(volume.hu[k], pixels[frame.frame_number - 1].astype(np.float32) - 1024)
        np.testing.assert_allclose(volume.voxel_to_lps((k, 0, 0)), frame.position, atol=1e-6)


def test_enhanced_ct_per_frame_position_missing_is_rejected() -> None:
    ds = pydicom.dcmread(str(SINGLE / "eCT_Supplemental.dcm"))
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(SeriesRejected) as info:
        build_volume([ds])
    assert "frame 2" in info.value.reason


def test_two_enhanced_ct_instances_in_one_series_are_rejected() -> None:
    ds = pydicom.dcmread(str(SINGLE / "eCT_Supplemental.dcm"))
    other = copy.deepcopy(ds)
    other.SOPInstanceUID = generate_uid()
    with pytest.raises(SeriesRejected) as info:
        build_volume([ds, other])
    assert "2 enhanced ct instances" in info.value.reason.lower()


def test_jpeg2000_slices_decode_into_a_volume() -> None:
    source = pydicom.dcmread(str(SINGLE / "explicit_VR-UN.dcm"))
    assert source.file_meta.TransferSyntaxUID.is_compressed
    reference = source.pixel_array.astype(np.float32)
    assert reference.shape == (512, 512) and reference.std() > 10  # real image content decoded
    copies = []
    for k in range(3):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = generate_uid()
        x, y, z = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z - 5.0 * k]  # the normal is -z for this orientation
        copies.append(ds)
    volume = build_volume(copies[::-1])
    assert volume.shape == (3, 512, 512)
    assert volume.slice_spacing == pytest.approx(5.0)
    assert [f.position[2] for f in volume.frames] == [-121.0, -126.0, -131.0]
    slope = float(source.get("RescaleSlope", 1))
    intercept = float(source.get("RescaleIntercept", 0))
    for k in range(3):
        np.testing.assert_allclose(volume.hu[k], reference * slope + intercept)


# --------------------------------------------------------------------------- geometry from headers only


def _headers(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(str(p), stop_before_pixels=True) for p in paths]


def test_check_geometry_needs_no_pixel_data() -> None:
    headers = _headers(abdomen_files())
    assert all("PixelData" not in ds for ds in headers)
    shuffled = headers[:]
    random.Random(11).shuffle(shuffled)
    geometry = check_geometry(shuffled)
    volume = load_series(abdomen_files())
    assert geometry.slice_count == 112 and (geometry.rows, geometry.columns) == (101, 122)
    assert [str(ds.SOPInstanceUID) for ds in geometry.datasets] == [str(ds.SOPInstanceUID) for ds in volume.datasets]
    assert geometry.frames == volume.frames
    assert geometry.slice_spacing == pytest.approx(volume.slice_spacing)
    assert geometry.pixel_spacing == volume.pixel_spacing
    np.testing.assert_allclose(geometry.slice_direction, volume.slice_direction)
    assert geometry.coverage_mm == pytest.approx(112 * 3.0)


def test_check_geometry_on_enhanced_ct_headers() -> None:
    geometry = check_geometry(_headers([SINGLE / "eCT_Supplemental.dcm"]))
    assert geometry.slice_count == 2 and geometry.slice_spacing == pytest.approx(10.0)
    # frame 1 is at z -159, frame 2 at -149; the normal points to the feet (-z), so frame 2 comes first
    assert [f.frame_number for f in geometry.frames] == [2, 1]
    assert geometry.coverage_mm == pytest.approx(20.0)


def test_check_geometry_gives_build_volumes_reasons_on_headers() -> None:
    headers = _headers(abdomen_files()[:40])
    del headers[20]
    with pytest.raises(SeriesRejected, match="missing slices: gap of 6.00 mm"):
        check_geometry(headers)
    headers = _headers(abdomen_files()[:12])
    headers[4].FrameOfReferenceUID = generate_uid()
    with pytest.raises(SeriesRejected, match="different Frame of Reference UIDs"):
        check_geometry(headers)


def test_check_geometry_of_a_non_ct_series_only_when_asked() -> None:
    headers = _headers(abdomen_files()[:12])
    for ds in headers:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    with pytest.raises(SeriesRejected, match="is not CT Image"):
        check_geometry(headers)
    assert check_geometry(headers, require_ct=False).slice_count == 12


def test_instances_without_sop_instance_uid_are_not_merged() -> None:
    headers = _headers(abdomen_files()[:12])
    for ds in headers:
        del ds.SOPInstanceUID
    assert check_geometry(headers).slice_count == 12


def test_spacing_jitter_below_the_tolerance_is_accepted() -> None:
    # Recorded positions carry rounding and reconstruction jitter; it is not a gap.
    jitter = 0.8 * SPACING_TOLERANCE
    distances = [0.0, 1.0, 2.0 + jitter, 3.0, 4.0 - jitter, 5.0]
    order, spacing = check_slice_spacing(distances[::-1])
    assert list(order) == [5, 4, 3, 2, 1, 0] and spacing == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("distances", "reason"),
    [
        ([0.0, 1.0, 3.0, 4.0], "missing slices: gap of 2.00 mm between slices 2 and 3"),
        ([0.0, 2.5, 5.0, 12.5, 15.0], "about 2 missing"),
        ([0.0, 1.0, 1.0, 2.0], "two slices share one position"),
        ([0.0, 1.0, 2.0 + 1.5 * SPACING_TOLERANCE, 3.0, 4.0], "irregular slice spacing"),
        ([0.0], "only 1 slice"),
    ],
)
def test_spacing_rule_rejects_gaps_duplicates_and_uneven_steps(distances: list[float], reason: str) -> None:
    with pytest.raises(SeriesRejected, match=reason):
        check_slice_spacing(distances)


@pytest.mark.parametrize(
    ("normal", "plane"),
    [
        ((0, 0, 1), "AXIAL"),
        ((0, 0, -1), "AXIAL"),
        ((0, -np.sin(np.deg2rad(15)), np.cos(np.deg2rad(15))), "AXIAL"),  # tilted 15 degrees
        ((0, 1, 0), "CORONAL"),
        ((-1, 0, 0), "SAGITTAL"),
        ((0, np.sin(np.deg2rad(40)), np.cos(np.deg2rad(40))), "OBLIQUE"),
    ],
)
def test_plane_of_a_slice_normal(normal: tuple[float, float, float], plane: str) -> None:
    assert plane_of(normal) == plane


def test_volume_is_plain_data() -> None:
    """CTVolume built by hand behaves like one built from files (used by other modules)."""
    hu = np.zeros((2, 3, 4), dtype=np.float32)
    volume = CTVolume(
        datasets=[Dataset()],
        frames=[],
        hu=hu,
        row_direction=np.array([1.0, 0, 0]),
        column_direction=np.array([0, 1.0, 0]),
        slice_direction=np.array([0, 0, 1.0]),
        pixel_spacing=(0.5, 0.7),
        slice_spacing=2.0,
    )
    assert volume.shape == (2, 3, 4)
    assert volume.spacing_zyx == (2.0, 0.5, 0.7)
    assert volume.voxel_volume_mm3 == pytest.approx(0.7)


def test_source_files_are_untouched() -> None:
    """The tests above work on copies: the cached originals still match the files."""
    for path, ds in zip(abdomen_files()[:5], _abdomen_originals()[:5]):
        on_disk = pydicom.dcmread(str(path))
        assert on_disk.ImagePositionPatient == ds.ImagePositionPatient
        assert on_disk.SOPInstanceUID == ds.SOPInstanceUID
    assert ABDOMEN.is_dir()
