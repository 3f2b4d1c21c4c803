"""Golden SEG: TotalSegmentator's own masks, written by the node, read back by dcmqi and highdicom.

For the real TotalSegmentator reference segmentation (``tests/data/totalsegmentator/``),
the SEG that :func:`build_segmentation` writes over the real 112-slice DICOM series
and what independent readers decode from it must agree voxel for voxel.

The golden masks live on ``example_ct_sm.nii.gz``, a 30-slice crop of the CT the
DICOM series was made from. Where the crop sits is not assumed: it is found by
matching the crop's int16 HU voxels against the DICOM HU volume over every slice
offset and every axis flip, and the test requires exactly one exact match.
(The crop's NIfTI affine agrees with the DICOM geometry in plane, but its z origin
is the full image's origin, so the affine alone would put the crop at slice 0;
the voxels show it is the 30 most superior slices. See ``crop_mapping``.)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from pipelines.clinical.findings import CodeSpec, SegmentFinding
from pipelines.clinical.measurements import TOTALSEGMENTATOR_TOTAL_LABELS
from pipelines.dicom_out.segmentation import build_segmentation
from pipelines.dicom_out.uids import derive_uid, result_uids
from pipelines.volume.ct import CTVolume, load_series
from support.data import abdomen_files
from support.findings import algorithm_identity, segment_finding
from support.validators import dciodvfy, dcmqi_seg_masks

nibabel = pytest.importorskip("nibabel")

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "totalsegmentator"
LABEL_OF = {name: label for label, name in TOTALSEGMENTATOR_TOTAL_LABELS.items()}
NOTICE = "For research use only. Not for use in diagnostic procedures."
MODEL_KEY = "totalsegmentator-golden@2.0.0+golden00"
ANATOMICAL_STRUCTURE = CodeSpec("91723000", "SCT", "Anatomical Structure")
ALGORITHM = algorithm_identity(MODEL_KEY, name="TotalSegmentator", model_name="TotalSegmentator total")

#: TotalSegmentator class -> (segment label, SNOMED CT property type).
STRUCTURES: dict[str, tuple[str, CodeSpec]] = {
    "liver": ("Liver", CodeSpec("10200004", "SCT", "Liver")),
    "spleen": ("Spleen", CodeSpec("78961009", "SCT", "Spleen")),
    "pancreas": ("Pancreas", CodeSpec("15776009", "SCT", "Pancreas")),
    "kidney_left": ("Left kidney", CodeSpec("64033007", "SCT", "Kidney")),
    "kidney_right": ("Right kidney", CodeSpec("64033007", "SCT", "Kidney")),
    "stomach": ("Stomach", CodeSpec("69695003", "SCT", "Stomach")),
    "vertebrae_L1": ("L1 vertebra", CodeSpec("66794005", "SCT", "L1 vertebra")),
    "aorta": ("Aorta", CodeSpec("15825003", "SCT", "Aorta")),
}


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    return load_series(abdomen_files())


@pytest.fixture(scope="module")
def crop_mapping(volume: CTVolume) -> dict:
    """Where the 30-slice crop sits in the DICOM volume, proven by exact HU equality.

    Returns ``{"offset": k0, "flips": (flip_slices, flip_rows, flip_columns)}`` such that
    ``volume.hu[k0:k0 + n] == orient(crop)``, where ``orient`` transposes the NIfTI
    (i, j, l) array to (l, j, i) and then reverses the flipped axes.
    """
    ct_image = nibabel.load(GOLDEN / "example_ct_sm.nii.gz")
    seg_image = nibabel.load(GOLDEN / "example_seg.nii.gz")
    assert np.array_equal(ct_image.affine, seg_image.affine)
    assert ct_image.shape == seg_image.shape
    crop = np.asarray(ct_image.dataobj)
    assert crop.dtype == np.int16
    crop_zyx = crop.transpose(2, 1, 0).astype(volume.hu.dtype)  # (l, j, i)
    n = crop_zyx.shape[0]
    assert crop_zyx.shape[1:] == volume.hu.shape[1:]
    # The DICOM HU values are integers too (int16 stored values, slope 1).
    assert np.array_equal(volume.hu, np.round(volume.hu))

    matches = []
    for flips in itertools.product((False, True), repeat=3):
        oriented = crop_zyx[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
        for offset in range(volume.hu.shape[0] - n + 1):
            if np.array_equal(volume.hu[offset : offset + n], oriented):
                matches.append((offset, flips))
    assert len(matches) == 1, f"crop matches the DICOM HU volume at {matches}; expected exactly one placement"
    (offset, flips), = matches

    # In plane, the NIfTI affine (RAS) says the same as the voxels: convert a crop
    # voxel's position to LPS and then to a DICOM (column, row) index.
    lps = np.diag([-1.0, -1.0, 1.0]) @ ct_image.affine[:3]
    for i, j in ((0, 0), (crop.shape[0] - 1, 0), (0, crop.shape[1] - 1)):
        point = lps @ np.array([i, j, 0, 1.0])
        column = (point - volume.origin) @ volume.row_direction / volume.pixel_spacing[1]
        row = (point - volume.origin) @ volume.column_direction / volume.pixel_spacing[0]
        expected_column = volume.hu.shape[2] - 1 - i if flips[2] else i
        expected_row = volume.hu.shape[1] - 1 - j if flips[1] else j
        assert np.allclose([column, row], [expected_column, expected_row], atol=1e-3)
    return {"offset": offset, "flips": flips, "affine": ct_image.affine, "labels": np.asarray(seg_image.dataobj)}


@pytest.fixture(scope="module")
def golden_masks(volume: CTVolume, crop_mapping: dict) -> dict[str, np.ndarray]:
    """Each chosen structure's golden mask on the DICOM grid, zero outside the crop."""
    labels = crop_mapping["labels"].transpose(2, 1, 0)
    labels = labels[tuple(slice(None, None, -1) if f else slice(None) for f in crop_mapping["flips"])]
    offset = crop_mapping["offset"]
    present = set(np.unique(labels).tolist())
    masks = {}
    for name in STRUCTURES:
        if LABEL_OF[name] not in present:
            continue
        mask = np.zeros(volume.hu.shape, dtype=bool)
        mask[offset : offset + labels.shape[0]] = labels == LABEL_OF[name]
        masks[name] = mask
    assert len(masks) >= 5, f"only {sorted(masks)} of the chosen structures are in the golden map"
    return masks


@pytest.fixture(scope="module")
def golden_findings(volume: CTVolume, golden_masks: dict[str, np.ndarray]) -> list[SegmentFinding]:
    findings = []
    for number, (name, mask) in enumerate(golden_masks.items(), start=1):
        label, type_ = STRUCTURES[name]
        findings.append(segment_finding(
            volume, number, label, mask, category=ANATOMICAL_STRUCTURE, type=type_, finding_site=None,
            tracking_id=f"{label} #{number}",
            tracking_uid=derive_uid(volume.series_instance_uid, MODEL_KEY, "tracking", str(number)),
        ))
    return findings


@pytest.fixture(scope="module")
def golden_seg(volume, golden_findings, tmp_path_factory):
    uids = result_uids(volume.series_instance_uid, MODEL_KEY)
    seg = build_segmentation(
        volume,
        golden_findings,
        ALGORITHM,
        series_instance_uid=uids.seg_series_instance_uid,
        sop_instance_uid=uids.seg_sop_instance_uid,
        series_number=9911,
        series_description="AI segmentation - RESEARCH USE ONLY",
        content_description=NOTICE,
    )
    out = tmp_path_factory.mktemp("golden-seg")
    path = out / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path, out


# --------------------------------------------------------------------------- tests


def test_crop_is_the_most_superior_slices_flipped_in_plane(volume, crop_mapping):
    # Recorded so that a change to the test data is noticed: the crop is the top
    # 30 slices (lung bases to L2), rows and columns reversed against the NIfTI
    # (i, j) order, slices in the same inferior-to-superior order.
    assert crop_mapping["offset"] == volume.hu.shape[0] - 30 == 82
    assert crop_mapping["flips"] == (False, True, True)


def test_golden_seg_passes_dciodvfy(golden_seg):
    errors, warnings = dciodvfy(golden_seg[0])
    for line in warnings:
        print(f"dciodvfy: {line}")
    assert errors == [], "dciodvfy errors:\n" + "\n".join(errors)


def test_golden_seg_read_by_dcmqi_equals_golden_masks(volume, golden_findings, golden_seg):
    path, out = golden_seg
    masks = dcmqi_seg_masks(path, out, volume)
    assert sorted(masks) == [f.number for f in golden_findings]
    for finding in golden_findings:
        assert np.array_equal(masks[finding.number], finding.mask), (
            f"segment {finding.number} ({finding.label}): dcmqi has {int(masks[finding.number].sum())} voxels, "
            f"golden {finding.voxel_count}, {int((masks[finding.number] ^ finding.mask).sum())} differ"
        )


def test_golden_seg_read_by_highdicom_source_instances(volume, golden_findings, golden_seg):
    seg = hd.seg.segread(golden_seg[0])
    numbers = [f.number for f in golden_findings]
    assert seg.get_segment_numbers() == numbers
    uids = [str(volume.datasets[frame.dataset_index].SOPInstanceUID) for frame in volume.frames]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    # Slices the SEG does not reference (if any) are empty by construction here.
    pixels = np.zeros(volume.hu.shape + (len(numbers),), dtype=bool)
    rows = [k for k, uid in enumerate(uids) if uid in referenced]
    pixels[rows] = seg.get_pixels_by_source_instance(
        [uids[k] for k in rows], segment_numbers=numbers, dtype=bool
    )
    for index, finding in enumerate(golden_findings):
        assert np.array_equal(pixels[..., index], finding.mask), f"segment {finding.number} ({finding.label}) differs"


def test_golden_seg_read_by_highdicom_volume(volume, golden_findings, golden_seg):
    """highdicom's geometric reading (plane positions, not source references)."""
    seg = hd.seg.segread(golden_seg[0])
    numbers = [f.number for f in golden_findings]
    hd_volume = seg.get_volume(segment_numbers=numbers, dtype=bool)
    array = hd_volume.array
    assert array.shape[-1] == len(numbers)
    # Map hd voxel (s, r, c) -> LPS -> CT (k, r, c); must be an integer grid shift.
    to_index = np.stack(
        [
            volume.slice_direction / volume.slice_spacing,
            volume.column_direction / volume.pixel_spacing[0],
            volume.row_direction / volume.pixel_spacing[1],
        ]
    )
    affine = np.asarray(hd_volume.affine, dtype=float)
    transform = to_index @ affine[:3, :3]
    offset = to_index @ (affine[:3, 3] - volume.origin)
    assert np.allclose(transform, np.round(transform), atol=1e-3)
    assert np.allclose(offset, np.round(offset), atol=1e-2)
    transform, offset = np.round(transform).astype(int), np.round(offset).astype(int)
    for index, finding in enumerate(golden_findings):
        idx = np.argwhere(array[..., index]).T
        k, r, c = transform @ idx + offset[:, None]
        assert ((k >= 0) & (k < volume.hu.shape[0]) & (r >= 0) & (r < volume.hu.shape[1])
                & (c >= 0) & (c < volume.hu.shape[2])).all(), f"segment {finding.number} leaves the CT grid"
        mask = np.zeros(volume.hu.shape, dtype=bool)
        mask[k, r, c] = True
        assert np.array_equal(mask, finding.mask), f"segment {finding.number} ({finding.label}) differs"
