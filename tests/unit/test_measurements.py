"""Opportunistic measurements: synthetic phantoms for the rules, real TotalSegmentator data as golden.

The golden case (``tests/data/totalsegmentator/``) is TotalSegmentator's own
reference segmentation of a real non-contrast CT with per-structure volume and
median HU; :func:`organ_stats` must reproduce every value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipelines.clinical.measurements import (
    TOTALSEGMENTATOR_TOTAL_LABELS,
    OrganStats,
    bone_density_assessment,
    bone_density_category,
    field_of_view_cut,
    lung_rads_category,
    lung_rads_category_from_volume,
    nodule_measurements,
    organ_stats,
    steatosis_assessment,
    steatosis_grade,
    trabecular_roi,
    vertebral_levels_from_ribs,
)

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "totalsegmentator"
LABEL_OF = {name: label for label, name in TOTALSEGMENTATOR_TOTAL_LABELS.items()}
LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


#: Half the reference's 0.1 ml rounding step (plus float noise: 190.35 ml was written as 190.3).
VOLUME_ROUNDING_ML = 0.05 + 1e-9


def _close(value: float, reference: float, floor: float) -> bool:
    """Within 1 % of the reference, or within ``floor`` (the reference's rounding) near 0."""
    return abs(value - reference) <= max(0.01 * abs(reference), floor)


# ---------------------------------------------------------------------------
# golden: TotalSegmentator on a real CT


@pytest.fixture(scope="module")
def real_case() -> dict:
    nibabel = pytest.importorskip("nibabel")
    ct_image = nibabel.load(GOLDEN / "example_ct_sm.nii.gz")
    seg_image = nibabel.load(GOLDEN / "example_seg.nii.gz")
    # Axis-aligned RAS with +z toward the head: transposing (x, y, z) to
    # (z, y, x) gives the node's order, slice 0 the most inferior.
    for image in (ct_image, seg_image):
        assert nibabel.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.count_nonzero(image.affine[:3, :3] - np.diag(np.diag(image.affine[:3, :3]))) == 0
    assert np.array_equal(ct_image.affine, seg_image.affine)
    hu = np.asarray(ct_image.get_fdata(dtype=np.float64)).transpose(2, 1, 0)
    labels = np.asarray(seg_image.dataobj).transpose(2, 1, 0)
    spacing = tuple(float(z) for z in reversed(ct_image.header.get_zooms()[:3]))
    reference = json.loads((GOLDEN / "reference_seg_stats.json").read_text())["example_seg_on_example_ct_sm"]
    return {
        "hu": hu,
        "labels": labels,
        "spacing": spacing,
        "reference": reference,
        "nifti_shape": ct_image.shape,
    }


def test_label_map_covers_exactly_the_reference_structures(real_case: dict) -> None:
    reference = real_case["reference"]
    assert tuple(reference["shape"]) == real_case["nifti_shape"]
    assert sorted(TOTALSEGMENTATOR_TOTAL_LABELS) == list(range(1, 118))
    present = {TOTALSEGMENTATOR_TOTAL_LABELS[int(v)] for v in np.unique(real_case["labels"]) if v}
    assert present == set(reference["structures"])


def test_golden_volume_and_median_hu_of_every_structure(real_case: dict) -> None:
    """Each value within 1 % of the reference, or within the reference's rounding near 0.

    The reference counts voxels times the NIfTI zooms (3 x 3 x 3 mm) and takes
    numpy's median of the HU in the mask, both rounded to 0.1: so the floor is
    0.05 ml for volumes (small ribs and the 0.027 ml middle lobe, reported as
    0.0, differ by more than 1 % through rounding alone) and 0.5 HU for medians,
    and rounding our values must give every reference value exactly.
    """
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    mismatches = []
    for name, expected in real_case["reference"]["structures"].items():
        stats = organ_stats(hu, labels == LABEL_OF[name], spacing)
        checks = (("volume_ml", stats.volume_ml, VOLUME_ROUNDING_ML), ("median_HU", stats.median_hu, 0.5))
        for key, value, floor in checks:
            if not _close(value, expected[key], floor) or round(value, 1) != expected[key]:
                mismatches.append(f"{name} {key}: computed {value:.4f}, reference {expected[key]}")
    assert not mismatches, "\n".join(mismatches)


def test_golden_total_lung_volume(real_case: dict) -> None:
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    lobes = {name: organ_stats(hu, labels == LABEL_OF[name], spacing).volume_ml for name in LUNG_LOBES}
    total = organ_stats(hu, np.isin(labels, [LABEL_OF[n] for n in LUNG_LOBES]), spacing).volume_ml
    expected = real_case["reference"]["total_lung_ml"]
    assert total == pytest.approx(sum(lobes.values()))
    assert _close(total, expected, VOLUME_ROUNDING_ML), f"total_lung_ml: computed {total:.4f}, reference {expected}"
    # The reference adds the lobe volumes after rounding them (116.289 ml unrounded).
    assert round(sum(round(v, 1) for v in lobes.values()), 1) == expected


def test_real_organs_are_flagged_cut_by_the_30_slice_crop(real_case: dict) -> None:
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    for name in ("liver", "spleen", "kidney_right", "vertebrae_T12", "vertebrae_L2"):
        assert organ_stats(hu, labels == LABEL_OF[name], spacing).cut_by_field_of_view, name
    for name in ("vertebrae_L1", "pancreas", "gallbladder", "adrenal_gland_left"):
        assert not organ_stats(hu, labels == LABEL_OF[name], spacing).cut_by_field_of_view, name


def test_real_bone_density_uses_l1(real_case: dict) -> None:
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    l1, t12 = labels == LABEL_OF["vertebrae_L1"], labels == LABEL_OF["vertebrae_T12"]
    result = bone_density_assessment({"L1": l1, "T12": t12}, hu, spacing, kvp=120.0)
    assert result.level == "L1" and result.evaluable
    # Trabecular bone only: well below the whole vertebra's mean (cortex, posterior elements).
    assert 100.0 < result.mean_hu < organ_stats(hu, l1, spacing).mean_hu
    assert result.mean_hu == pytest.approx(147.05, abs=0.01)  # regression value on this case
    assert result.category == bone_density_category(result.mean_hu) == "osteopenia"
    assert not result.high_suspicion and result.notes == ()
    assert 150.0 <= result.roi_area_mm2 <= 220.0  # 21 pixels of 9 mm^2
    assert result.roi_mask is not None and not (result.roi_mask & ~l1).any()
    z_range = np.flatnonzero(l1.any(axis=(1, 2)))
    assert result.roi_slice == (z_range[0] + z_range[-1]) // 2


def test_real_bone_density_turns_to_t12_when_l1_is_removed(real_case: dict) -> None:
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    t12 = labels == LABEL_OF["vertebrae_T12"]
    # In this 30-slice crop T12 reaches the top slice, so the fallback finds it cut.
    result = bone_density_assessment({"T12": t12}, hu, spacing, kvp=None)
    assert result.category == "not evaluable" and result.level is None
    assert "L1 is not in the field of view" in result.level_reason
    assert "T12 is cut by the field of view" in result.level_reason
    roi, mean = trabecular_roi(hu, t12, spacing)
    assert 100.0 < mean < organ_stats(hu, t12, spacing).mean_hu and not (roi & ~t12).any()


def test_real_vertebral_levels_from_ribs(real_case: dict) -> None:
    labels, spacing = real_case["labels"], real_case["spacing"]
    names = ("vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11")
    # Whole-vertebra labels touch at the facets: remove contact voxels so that
    # each vertebra is its own component, as body masks separated by discs are.
    vertebrae = np.zeros(labels.shape, dtype=bool)
    for name in names:
        others = np.isin(labels, [LABEL_OF[n] for n in names if n != name])
        vertebrae |= (labels == LABEL_OF[name]) & ~ndimage.binary_dilation(others)
    ribs = np.isin(labels, [LABEL_OF[f"rib_{side}_{i}"] for side in ("left", "right") for i in range(1, 13)])
    # TotalSegmentator's 12th rib stops 9 mm from T12 at this 3 mm resolution.
    assert vertebral_levels_from_ribs(vertebrae, ribs, spacing, touch_mm=5.0) == {}
    levels = vertebral_levels_from_ribs(vertebrae, ribs, spacing, touch_mm=10.0)
    assert list(levels) == ["T11", "T12", "L1", "L2"]
    for level, mask in levels.items():
        found = {TOTALSEGMENTATOR_TOTAL_LABELS[int(v)] for v in np.unique(labels[mask])}
        assert found == {f"vertebrae_{level}"}, level


def test_real_steatosis(real_case: dict) -> None:
    hu, labels, spacing = real_case["hu"], real_case["labels"], real_case["spacing"]
    liver = organ_stats(hu, labels == LABEL_OF["liver"], spacing)
    spleen = organ_stats(hu, labels == LABEL_OF["spleen"], spacing)
    result = steatosis_assessment(liver, spleen)
    assert result.grade == "not evaluable" and result.reason == "liver cut by the field of view"
    # The same HU as if both organs were whole: mean 45.3 HU grades "mild".
    whole = steatosis_assessment(
        dataclasses.replace(liver, cut_by_field_of_view=False),
        dataclasses.replace(spleen, cut_by_field_of_view=False),
    )
    assert whole.grade == "mild" and whole.liver_mean_hu == pytest.approx(45.29, abs=0.01)
    assert whole.liver_minus_spleen_hu == pytest.approx(liver.mean_hu - spleen.mean_hu)
    assert whole.liver_spleen_ratio == pytest.approx(liver.mean_hu / spleen.mean_hu)
    assert whole.liver_minus_spleen_hu > 0 and whole.supporting_criteria == ()


# ---------------------------------------------------------------------------
# organ statistics and field of view


def test_organ_stats_of_a_known_mask() -> None:
    hu = np.zeros((4, 5, 6))
    mask = np.zeros(hu.shape, dtype=bool)
    mask[1:3, 1:3, 1:3] = True
    hu[mask] = [10, 20, 30, 40, 50, 60, 70, 80]
    stats = organ_stats(hu, mask, (2.0, 0.5, 0.5))
    assert stats.voxel_count == 8
    assert stats.volume_mm3 == pytest.approx(4.0) and stats.volume_ml == pytest.approx(0.004)
    assert stats.mean_hu == pytest.approx(45.0) and stats.median_hu == pytest.approx(45.0)
    assert stats.std_hu == pytest.approx(np.std([10, 20, 30, 40, 50, 60, 70, 80]))
    assert not stats.cut_by_field_of_view


def test_organ_stats_of_an_empty_mask() -> None:
    stats = organ_stats(np.zeros((3, 3, 3)), np.zeros((3, 3, 3), dtype=bool), (1, 1, 1))
    assert stats.is_empty and stats.voxel_count == 0 and stats.volume_ml == 0.0
    assert math.isnan(stats.mean_hu) and math.isnan(stats.median_hu) and math.isnan(stats.std_hu)
    assert not stats.cut_by_field_of_view


@pytest.mark.parametrize(
    "index",
    [(0, 2, 2), (4, 2, 2), (2, 0, 2), (2, 4, 2), (2, 2, 0), (2, 2, 4)],
    ids=["first-slice", "last-slice", "top-row", "bottom-row", "left-column", "right-column"],
)
def test_field_of_view_cut_on_every_border(index: tuple[int, int, int]) -> None:
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[2, 2, 2] = True
    assert not field_of_view_cut(mask)
    mask[index] = True
    assert field_of_view_cut(mask)


def test_inputs_are_validated_with_the_value_named() -> None:
    hu = np.zeros((3, 3, 3))
    with pytest.raises(TypeError, match="int64"):
        organ_stats(hu, np.zeros((3, 3, 3), dtype=np.int64), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(3, 3, 4\)"):
        organ_stats(hu, np.zeros((3, 3, 4), dtype=bool), (1, 1, 1))
    with pytest.raises(ValueError, match="-1"):
        organ_stats(hu, np.zeros((3, 3, 3), dtype=bool), (1, -1, 1))
    with pytest.raises(ValueError, match="touch_mm"):
        vertebral_levels_from_ribs(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool), (1, 1, 1), touch_mm=0)
    with pytest.raises(ValueError, match="kvp"):
        bone_density_assessment({}, hu, (1, 1, 1), kvp=-120)
    with pytest.raises(TypeError, match="liver"):
        steatosis_assessment(None, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# vertebral levels


def _spine(rib_gap_mm: dict[int, float], bodies: int = 6) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``bodies`` boxes 16 mm high with 4 mm discs, slice 0 at the feet; ribs by body (0 = top)."""
    shape = (bodies * 10 + 4, 40, 70)
    vertebrae, ribs, boxes = np.zeros(shape, bool), np.zeros(shape, bool), []
    for k in range(bodies):  # k = 0 is the most cranial body
        top = shape[0] - 2 - 10 * k
        box = np.zeros(shape, bool)
        box[top - 8 : top, 10:30, 20:40] = True
        vertebrae |= box
        boxes.append(box)
        if k in rib_gap_mm:  # a rib leaving the body's side, ``gap`` mm away (x spacing 1 mm)
            start = 40 + int(rib_gap_mm[k])
            ribs[top - 6 : top - 3, 18:22, start : start + 25] = True
    return vertebrae, ribs, boxes


SPINE_SPACING = (2.0, 1.0, 1.0)


def test_levels_count_from_the_lowest_rib_bearing_body() -> None:
    vertebrae, ribs, boxes = _spine({0: 0, 1: 0, 2: 0})
    levels = vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING)
    assert list(levels) == ["T10", "T11", "T12", "L1", "L2", "L3"]
    for mask, box in zip(levels.values(), boxes):
        assert np.array_equal(mask, box)


def test_levels_rib_within_touch_distance() -> None:
    vertebrae, ribs, _ = _spine({0: 0, 1: 0, 2: 4})  # the third rib 4 mm from its body: touches
    assert list(vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING))[:3] == ["T10", "T11", "T12"]
    vertebrae, ribs, _ = _spine({0: 0, 1: 0, 2: 8})  # 8 mm: that body counts as rib-free, L1
    assert list(vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING))[:3] == ["T11", "T12", "L1"]
    assert list(vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING, touch_mm=10.0))[:3] == [
        "T10",
        "T11",
        "T12",
    ]


def test_levels_unknown_without_ribs_or_without_a_rib_free_body_below() -> None:
    vertebrae, ribs, _ = _spine({})
    assert vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING) == {}
    # Every visible body bears a rib: the scan may end above T12.
    vertebrae, ribs, _ = _spine({k: 0 for k in range(6)})
    assert vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING) == {}
    assert vertebral_levels_from_ribs(np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool), (1, 1, 1)) == {}


def test_levels_ignore_small_fragments() -> None:
    vertebrae, ribs, boxes = _spine({0: 0})
    vertebrae[30, 2:4, 2:4] = True  # 8 mm^3 of noise beside the spine
    levels = vertebral_levels_from_ribs(vertebrae, ribs, SPINE_SPACING)
    assert list(levels) == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert np.array_equal(levels["L1"], boxes[1])


# ---------------------------------------------------------------------------
# trabecular bone and osteoporosis

BONE_SPACING = (1.0, 0.7, 0.7)


def _vertebra(core_hu: float, semi_axes_mm: tuple[float, float] = (15.0, 20.0), shell_mm: float = 2.0):
    """An elliptic-cylinder body, 25 slices high, with a cortical shell of 600 HU around ``core_hu``."""
    shape = (40, 90, 100)
    centre = (45.0, 50.0)
    rows, cols = np.ogrid[: shape[1], : shape[2]]
    y, x = (rows - centre[0]) * BONE_SPACING[1], (cols - centre[1]) * BONE_SPACING[2]
    outer = (y / semi_axes_mm[0]) ** 2 + (x / semi_axes_mm[1]) ** 2 <= 1.0
    inner = (y / (semi_axes_mm[0] - shell_mm)) ** 2 + (x / (semi_axes_mm[1] - shell_mm)) ** 2 <= 1.0
    hu = np.full(shape, -50.0)
    mask = np.zeros(shape, bool)
    hu[5:30][:, outer] = 600.0
    hu[5:30][:, inner] = core_hu
    mask[5:30][:, outer] = True
    return hu, mask, centre


def test_trabecular_roi_is_200_mm2_centred_and_excludes_the_cortex() -> None:
    hu, mask, centre = _vertebra(120.0)
    roi, mean = trabecular_roi(hu, mask, BONE_SPACING)
    slices = np.flatnonzero(roi.any(axis=(1, 2)))
    assert list(slices) == [17]  # the middle of slices 5..29
    area = roi.sum() * BONE_SPACING[1] * BONE_SPACING[2]
    assert area == pytest.approx(200.0, rel=0.05)
    assert mean == pytest.approx(120.0)
    assert np.allclose(ndimage.center_of_mass(roi[17]), centre, atol=0.5)


def test_trabecular_roi_shrinks_inside_a_small_body() -> None:
    hu, mask, _ = _vertebra(120.0, semi_axes_mm=(8.0, 8.0))
    roi, mean = trabecular_roi(hu, mask, BONE_SPACING)
    area = roi.sum() * BONE_SPACING[1] * BONE_SPACING[2]
    assert 50.0 < area < 150.0 and mean == pytest.approx(120.0)
    # Every ROI pixel lies more than the shell (2.5 mm) inside the body.
    depth = ndimage.distance_transform_edt(mask[17], sampling=BONE_SPACING[1:])
    assert depth[roi[17]].min() > 2.5
    result = bone_density_assessment({"L1": mask}, hu, BONE_SPACING, kvp=120)
    assert result.roi_area_mm2 == pytest.approx(area) and any("shrunk" in n for n in result.notes)


def test_bone_density_refuses_a_tiny_trabecular_roi() -> None:
    hu, t12, _ = _vertebra(120.0)
    _, l1, _ = _vertebra(120.0, semi_axes_mm=(5.0, 5.0))  # ~2 mm of trabecular bone left in radius
    result = bone_density_assessment({"L1": l1, "T12": t12}, hu, BONE_SPACING, kvp=120.0)
    assert result.level == "T12" and "trabecular ROI of only" in result.level_reason


def test_trabecular_roi_of_nothing() -> None:
    roi, mean = trabecular_roi(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert not roi.any() and math.isnan(mean)


@pytest.mark.parametrize(
    ("mean_hu", "category"),
    [(60.0, "osteoporosis"), (110.0, "osteoporosis"), (110.5, "osteopenia"), (160.0, "osteopenia"),
     (160.5, "normal"), (250.0, "normal")],
)
def test_bone_density_category_boundaries(mean_hu: float, category: str) -> None:
    assert bone_density_category(mean_hu) == category


@pytest.mark.parametrize(("core_hu", "suspicion"), [(99.0, True), (100.0, False), (105.0, False)])
def test_bone_density_assessment_on_l1(core_hu: float, suspicion: bool) -> None:
    hu, mask, _ = _vertebra(core_hu)
    result = bone_density_assessment({"L1": mask}, hu, BONE_SPACING, kvp=120.0)
    assert result.level == "L1" and result.level_reason.startswith("L1")
    assert result.mean_hu == pytest.approx(core_hu) and result.category == "osteoporosis"
    assert result.high_suspicion is suspicion and result.kvp == 120.0 and result.notes == ()


def test_bone_density_falls_back_to_t12_and_says_why() -> None:
    hu, t12, _ = _vertebra(150.0)
    result = bone_density_assessment({"T12": t12}, hu, BONE_SPACING, kvp=120.0)
    assert (result.level, result.category) == ("T12", "osteopenia")
    assert result.level_reason == "T12 substitutes: L1 is not in the field of view"
    l1_cut = np.zeros_like(t12)
    l1_cut[0:3, 40:50, 45:55] = True  # L1 leaves the volume at its first (lowest) slice
    result = bone_density_assessment({"L1": l1_cut, "T12": t12}, hu, BONE_SPACING, kvp=120.0)
    assert result.level == "T12" and result.level_reason == "T12 substitutes: L1 is cut by the field of view"


def test_bone_density_not_evaluable_with_both_reasons() -> None:
    hu, mask, _ = _vertebra(150.0)
    t12_cut = mask.copy()
    t12_cut[-1, 40:50, 45:55] = True
    result = bone_density_assessment({"L1": np.zeros_like(mask), "T12": t12_cut}, hu, BONE_SPACING, kvp=None)
    assert result.category == "not evaluable" and not result.evaluable and result.level is None
    assert result.level_reason == "L1 is not in the field of view; T12 is cut by the field of view"
    assert math.isnan(result.mean_hu) and result.roi_mask is None


def test_bone_density_records_kvp() -> None:
    hu, mask, _ = _vertebra(150.0)
    unknown = bone_density_assessment({"L1": mask}, hu, BONE_SPACING, kvp=None)
    assert unknown.kvp is None and unknown.notes == ("kVp not recorded: thresholds assume 120 kVp",)
    low = bone_density_assessment({"L1": mask}, hu, BONE_SPACING, kvp=100)
    assert low.kvp == 100.0 and len(low.notes) == 1 and "100 kVp" in low.notes[0] and "120 kVp" in low.notes[0]


# ---------------------------------------------------------------------------
# hepatic steatosis


def _organ(mean_hu: float, volume_ml: float = 1500.0, cut: bool = False) -> OrganStats:
    count = int(volume_ml * 1000 / 27)
    return OrganStats(count, count * 27.0, count * 0.027, mean_hu, mean_hu, 10.0, cut)


@pytest.mark.parametrize(
    ("liver_hu", "grade"),
    [(25.0, "moderate-severe"), (40.0, "moderate-severe"), (40.1, "mild"), (47.9, "mild"), (48.0, "none"),
     (60.0, "none")],
)
def test_steatosis_grade_boundaries(liver_hu: float, grade: str) -> None:
    assert steatosis_grade(liver_hu) == grade
    result = steatosis_assessment(_organ(liver_hu), None)
    assert result.grade == grade and result.evaluable and result.liver_spleen_ratio is None


@pytest.mark.parametrize(
    ("liver_hu", "spleen_hu", "grade", "criteria"),
    [
        (55.0, 66.0, "mild", 2),  # L-S -11 and ratio 0.83
        (55.0, 65.0, "mild", 1),  # L-S exactly -10: only the ratio (0.85) criterion
        (60.0, 50.0, "none", 0),
        (60.0, 60.0, "none", 0),  # ratio exactly 1.0
        (38.0, 60.0, "moderate-severe", 2),  # never changes a higher grade
        (45.0, 60.0, "mild", 2),
    ],
)
def test_steatosis_with_the_spleen(liver_hu: float, spleen_hu: float, grade: str, criteria: int) -> None:
    result = steatosis_assessment(_organ(liver_hu), _organ(spleen_hu, volume_ml=200.0))
    assert result.grade == grade and len(result.supporting_criteria) == criteria
    assert result.liver_minus_spleen_hu == pytest.approx(liver_hu - spleen_hu)
    assert result.liver_spleen_ratio == pytest.approx(liver_hu / spleen_hu)
    assert result.spleen_mean_hu == spleen_hu


def test_steatosis_not_evaluable_and_unused_spleen() -> None:
    assert steatosis_assessment(_organ(30.0, cut=True), None).reason == "liver cut by the field of view"
    small = steatosis_assessment(_organ(30.0, volume_ml=99.0), None)
    assert small.grade == "not evaluable" and "< 100 ml" in small.reason
    empty = steatosis_assessment(_organ(math.nan, volume_ml=0.0), None)
    assert empty.grade == "not evaluable" and not empty.evaluable
    cut_spleen = steatosis_assessment(_organ(55.0), _organ(70.0, volume_ml=200.0, cut=True))
    assert cut_spleen.grade == "none" and cut_spleen.liver_minus_spleen_hu is None
    assert "spleen cut by the field of view" in cut_spleen.reason


# ---------------------------------------------------------------------------
# lung nodules


@pytest.mark.parametrize(
    ("diameter", "category"),
    [(0.0, "2"), (5.9, "2"), (6.0, "3"), (7.9, "3"), (8.0, "4A"), (14.9, "4A"), (15.0, "4B"), (40.0, "4B")],
)
def test_lung_rads_by_diameter(diameter: float, category: str) -> None:
    assert lung_rads_category(diameter) == category


@pytest.mark.parametrize(
    ("volume", "category"),
    [(112.9, "2"), (113.0, "3"), (267.9, "3"), (268.0, "4A"), (1766.9, "4A"), (1767.0, "4B")],
)
def test_lung_rads_by_volume(volume: float, category: str) -> None:
    assert lung_rads_category_from_volume(volume) == category


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_lung_rads_rejects_impossible_sizes(bad: float) -> None:
    with pytest.raises(ValueError, match="diameter_mm"):
        lung_rads_category(bad)


def _sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radius_mm: float, spacing: float):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) * spacing**2 <= radius_mm**2


def test_nodule_diameters_of_a_10_mm_sphere() -> None:
    spacing = 0.7
    for centre in [(20.0, 20.0, 20.0), (20.3, 19.6, 20.45), (19.8, 20.25, 20.1)]:
        mask = _sphere((40, 40, 40), centre, 5.0, spacing)
        [nodule] = nodule_measurements(np.where(mask, 30.0, -850.0), mask, (spacing,) * 3)
        for value in (nodule.long_axis_mm, nodule.short_axis_mm, nodule.mean_diameter_mm):
            assert value == pytest.approx(10.0, abs=0.5), (centre, nodule)
        assert nodule.volume_mm3 == pytest.approx(4 / 3 * math.pi * 125, rel=0.03)
        assert (nodule.lung_rads, nodule.lung_rads_by_volume) == ("4A", "4A")
        assert nodule.mean_hu == 30.0 and not nodule.cut_by_field_of_view
        assert abs(nodule.axial_slice - centre[0]) <= 1
        assert np.allclose(nodule.centroid_zyx, centre, atol=0.2)
        assert np.allclose(nodule.centroid_offset_mm_zyx, np.array(centre) * spacing, atol=0.15)


def test_nodules_are_measured_separately() -> None:
    spacing = 0.7
    small = _sphere((40, 60, 60), (20, 15, 15), 2.0, spacing)  # 4 mm
    large = _sphere((40, 60, 60), (20, 40, 42), 8.0, spacing)  # 16 mm
    nodules = nodule_measurements(np.zeros(small.shape), small | large, (spacing,) * 3)
    assert len(nodules) == 2
    by_size = sorted(nodules, key=lambda n: n.volume_mm3)
    assert [n.lung_rads for n in by_size] == ["2", "4B"]
    assert [n.lung_rads_by_volume for n in by_size] == ["2", "4B"]
    assert by_size[0].mean_diameter_mm == pytest.approx(4.0, abs=0.5)
    assert by_size[1].mean_diameter_mm == pytest.approx(16.0, abs=0.5)
    assert {n.index for n in nodules} == {1, 2}


def test_nodule_long_and_short_axis_of_an_elongated_nodule() -> None:
    # One slice, 12 pixels by 1 pixel at 1 mm: centres 11 mm apart, plus half a pixel each.
    mask = np.zeros((3, 10, 20), bool)
    mask[1, 5, 4:16] = True
    [nodule] = nodule_measurements(np.zeros(mask.shape), mask, (1.0, 1.0, 1.0))
    assert (nodule.long_axis_mm, nodule.short_axis_mm) == (11.5, 0.5)
    assert nodule.mean_diameter_mm == 6.0 and nodule.lung_rads == "3"  # 6.0 exactly: category 3
    assert nodule.axial_slice == 1


def test_nodule_mean_diameter_rounds_half_up() -> None:
    # 8 x 5 pixels at 1 mm: long axis = diagonal between centres (7, 4) + 0.5, short the
    # perpendicular extent + 0.5; the mean is rounded to 0.1 mm, halves up.
    mask = np.zeros((3, 12, 14), bool)
    mask[1, 3:8, 3:11] = True
    [nodule] = nodule_measurements(np.zeros(mask.shape), mask, (1.0, 1.0, 1.0))
    assert nodule.long_axis_mm == pytest.approx(math.hypot(7, 4) + 0.5)
    expected = math.floor((nodule.long_axis_mm + nodule.short_axis_mm) / 2 * 10 + 0.5) / 10
    assert nodule.mean_diameter_mm == pytest.approx(expected)


def test_nodule_cut_by_the_field_of_view() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[0:3, 4:6, 4:6] = True
    [nodule] = nodule_measurements(np.zeros(mask.shape), mask, (1.0, 1.0, 1.0))
    assert nodule.cut_by_field_of_view
    assert nodule_measurements(np.zeros(mask.shape), np.zeros_like(mask), (1.0, 1.0, 1.0)) == []
