"""Deterministic opportunistic measurements from segmentations.

Pure functions on numpy arrays: ``hu`` is a (z, y, x) volume of Hounsfield
units, masks are boolean arrays of the same shape and ``spacing_zyx`` is the
voxel size in mm. Slice 0 is the most inferior slice and the index grows
toward the head (the order of :class:`pipelines.volume.ct.CTVolume` for axial
series sorted along the head-foot normal).

What is measured, and the published rules it rests on:

* organ volume and attenuation (:func:`organ_stats`), with a flag for organs
  cut by the field of view: such an organ is "not evaluable", never "negative";
* vertebral levels by counting from the lowest rib-bearing vertebra
  (:func:`vertebral_levels_from_ribs`);
* trabecular bone attenuation of L1 (or T12) for osteoporosis
  (Pickhardt et al., Ann Intern Med 2013;158:588-595);
* hepatic steatosis from liver attenuation (Boyce et al., AJR 2010;194:623-628;
  Pickhardt et al., Eur Radiol 2012;22:1075-1082) and the liver-spleen
  comparison;
* solid lung nodule size and its Lung-RADS v2022 size category (ACR).

Nothing here reads files or logs; the same inputs give the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from pipelines.clinical.results import BoneDensityResult, NoduleMeasurement, OrganStats, SteatosisResult

#: TotalSegmentator v2 class map ``"total"`` (117 structures): label value ->
#: structure name. Source: ``totalsegmentator/map_to_binary.py``, ``class_map["total"]``
#: in github.com/wasserth/TotalSegmentator (Apache-2.0); Wasserthal et al.,
#: Radiology: Artificial Intelligence 2023;5:e230024. Checked against the
#: reference statistics shipped with the project's golden data
#: (``tests/data/totalsegmentator/``): every present label reproduces the
#: reference volume of the structure of that name.
TOTALSEGMENTATOR_TOTAL_LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "pancreas",
    8: "adrenal_gland_right",
    9: "adrenal_gland_left",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    15: "esophagus",
    16: "trachea",
    17: "thyroid_gland",
    18: "small_bowel",
    19: "duodenum",
    20: "colon",
    21: "urinary_bladder",
    22: "prostate",
    23: "kidney_cyst_left",
    24: "kidney_cyst_right",
    25: "sacrum",
    26: "vertebrae_S1",
    **{27 + i: f"vertebrae_L{5 - i}" for i in range(5)},  # 27 L5 ... 31 L1
    **{32 + i: f"vertebrae_T{12 - i}" for i in range(12)},  # 32 T12 ... 43 T1
    **{44 + i: f"vertebrae_C{7 - i}" for i in range(7)},  # 44 C7 ... 50 C1
    51: "heart",
    52: "aorta",
    53: "pulmonary_vein",
    54: "brachiocephalic_trunk",
    55: "subclavian_artery_right",
    56: "subclavian_artery_left",
    57: "common_carotid_artery_right",
    58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left",
    60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left",
    62: "superior_vena_cava",
    63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
    65: "iliac_artery_left",
    66: "iliac_artery_right",
    67: "iliac_vena_left",
    68: "iliac_vena_right",
    69: "humerus_left",
    70: "humerus_right",
    71: "scapula_left",
    72: "scapula_right",
    73: "clavicula_left",
    74: "clavicula_right",
    75: "femur_left",
    76: "femur_right",
    77: "hip_left",
    78: "hip_right",
    79: "spinal_cord",
    80: "gluteus_maximus_left",
    81: "gluteus_maximus_right",
    82: "gluteus_medius_left",
    83: "gluteus_medius_right",
    84: "gluteus_minimus_left",
    85: "gluteus_minimus_right",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    90: "brain",
    91: "skull",
    **{92 + i: f"rib_left_{i + 1}" for i in range(12)},  # 92 rib_left_1 ... 103 rib_left_12
    **{104 + i: f"rib_right_{i + 1}" for i in range(12)},  # 104 ... 115 rib_right_12
    116: "sternum",
    117: "costal_cartilages",
}

#: Spine levels from head to foot, the names :func:`vertebral_levels_from_ribs` returns.
SPINE_LEVELS: tuple[str, ...] = (
    tuple(f"C{i}" for i in range(1, 8))
    + tuple(f"T{i}" for i in range(1, 13))
    + tuple(f"L{i}" for i in range(1, 6))
    + ("S1",)
)

# Pickhardt et al., Ann Intern Med 2013: L1 trabecular attenuation at 120 kVp.
#: <= this: osteoporosis (threshold >90 % specific).
OSTEOPOROSIS_MAX_HU = 110.0
#: <= this (and above :data:`OSTEOPOROSIS_MAX_HU`): osteopenia (threshold 90 % sensitive).
OSTEOPENIA_MAX_HU = 160.0
#: Below this: flagged "high suspicion" of osteoporosis.
HIGH_SUSPICION_BELOW_HU = 100.0
#: The tube voltage the bone thresholds were derived at.
REFERENCE_KVP = 120.0
#: Target trabecular ROI area (Pickhardt's ~200 mm^2 oval in the L1 body).
TRABECULAR_ROI_AREA_MM2 = 200.0
#: Thickness excluded at the body's outline so the ROI holds no cortical bone.
CORTICAL_SHELL_MM = 2.5
#: A smaller trabecular ROI (a collapsed or tiny body) is too noisy to grade.
MIN_TRABECULAR_ROI_MM2 = 50.0

#: Liver mean attenuation at or below this: moderate-severe steatosis (Boyce, AJR 2010).
LIVER_MODERATE_SEVERE_MAX_HU = 40.0
#: Liver mean attenuation below this: >=30 % fat, specific (Pickhardt, Eur Radiol 2012).
LIVER_MILD_BELOW_HU = 48.0
#: Liver minus spleen below this supports steatosis.
LIVER_MINUS_SPLEEN_BELOW_HU = -10.0
#: Liver/spleen attenuation ratio below this supports steatosis.
LIVER_SPLEEN_RATIO_BELOW = 1.0
#: Less visible liver than this is not evaluable.
MIN_LIVER_ML = 100.0
#: Less visible spleen than this is not used as the reference.
MIN_SPLEEN_ML = 20.0

# Lung-RADS v2022 (ACR), baseline solid nodules: (upper bound exclusive, category).
_LUNG_RADS_BY_DIAMETER_MM: tuple[tuple[float, str], ...] = ((6.0, "2"), (8.0, "3"), (15.0, "4A"))
_LUNG_RADS_BY_VOLUME_MM3: tuple[tuple[float, str], ...] = ((113.0, "2"), (268.0, "3"), (1767.0, "4A"))


# --------------------------------------------------------------------------
# input checks


def _check_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing_zyx)
    except (TypeError, ValueError):
        raise TypeError(f"spacing_zyx must be three numbers in mm, got {spacing_zyx!r}") from None
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing_zyx must be three positive finite mm values, got {spacing_zyx!r}")
    return values


def _check_hu(hu: np.ndarray) -> np.ndarray:
    if not isinstance(hu, np.ndarray):
        raise TypeError(f"hu must be a numpy array, got {type(hu).__name__}")
    if hu.ndim != 3:
        raise ValueError(f"hu must be a (z, y, x) volume, got shape {hu.shape}")
    if hu.dtype == bool or not (np.issubdtype(hu.dtype, np.floating) or np.issubdtype(hu.dtype, np.integer)):
        raise TypeError(f"hu must hold real numbers (HU), got dtype {hu.dtype}")
    return hu


def _check_mask(mask: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != bool:
        raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype}")
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a (z, y, x) mask, got shape {mask.shape}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, the volume has {shape}")
    return mask


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------
# organs


def field_of_view_cut(mask: np.ndarray) -> bool:
    """Whether ``mask`` touches the first or last slice or the in-plane image border.

    Such a structure continues outside the scanned volume, so its size (and
    possibly its attenuation) is not the organ's. Only the rectangular image
    border is tested: a body cut by a circular reconstruction field of view
    inside the image is not detected here. An empty mask is not cut.
    """
    _check_mask(mask, "mask")
    return bool(
        mask[0].any() or mask[-1].any()
        or mask[:, 0, :].any() or mask[:, -1, :].any()
        or mask[:, :, 0].any() or mask[:, :, -1].any()
    )


def organ_stats(hu: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float]) -> OrganStats:
    """Voxel count, volume and HU statistics of the voxels in ``mask``.

    Volume is ``voxel_count * dz * dy * dx`` (each voxel counted whole); the
    median is :func:`numpy.median` of the HU values in the mask (the mean of the
    two middle values for an even count).
    """
    _check_hu(hu)
    _check_mask(mask, "mask", hu.shape)
    spacing = _check_spacing(spacing_zyx)
    values = hu[mask].astype(np.float64)
    count = int(values.size)
    volume_mm3 = count * spacing[0] * spacing[1] * spacing[2]
    if count == 0:
        mean = median = std = math.nan
    else:
        mean, median, std = float(values.mean()), float(np.median(values)), float(values.std())
    return OrganStats(
        voxel_count=count,
        volume_mm3=volume_mm3,
        volume_ml=volume_mm3 / 1000.0,
        mean_hu=mean,
        median_hu=median,
        std_hu=std,
        cut_by_field_of_view=field_of_view_cut(mask),
    )


# --------------------------------------------------------------------------
# vertebral levels


def vertebral_levels_from_ribs(
    vertebra_mask: np.ndarray,
    rib_mask: np.ndarray,
    spacing_zyx: Sequence[float],
    touch_mm: float = 5.0,
    min_body_mm3: float = 500.0,
) -> dict[str, np.ndarray]:
    """Name the visible vertebral bodies by counting from the lowest rib-bearing one.

    ``vertebra_mask`` holds vertebral bodies, which the intervertebral discs
    separate: each 6-connected component of at least ``min_body_mm3`` is one
    body (smaller ones are dropped as fragments). Bodies are ordered head to
    foot by centroid; a body bears a rib when a rib voxel lies within
    ``touch_mm`` of it (or in contact at the scan's resolution, one voxel step).
    The lowest rib-bearing body is T12; those below are L1, L2, ... S1 and those
    above T11, T10, ... C1. Returns ``{level: mask}`` from head to foot.

    This is the radiologist's counting rule on CT that shows the thoracolumbar
    junction. It needs at least one rib-free body below the lowest rib-bearing
    one (otherwise the field of view may end above the last rib, e.g. at T10,
    and the count would be wrong): without it, or with no rib-bearing body, it
    returns ``{}`` (levels unknown). It mislabels every level when the patient
    has 11 or 13 rib pairs, a lumbar rib on L1, a hypoplastic 12th rib the
    segmentation misses, or when two bodies merge into one component (fused
    vertebrae, a collapsed disc at coarse slice spacing); whole-vertebra masks
    (body and posterior elements) usually join at the facet joints and are not
    a valid input. Rib segmentations stop short of the body at the
    costovertebral joint: on TotalSegmentator output at 3 mm the 12th rib was
    9 mm from T12, so such data needs ``touch_mm`` of about 10.
    """
    _check_mask(vertebra_mask, "vertebra_mask")
    _check_mask(rib_mask, "rib_mask", vertebra_mask.shape)
    spacing = _check_spacing(spacing_zyx)
    reach = max(_check_positive(touch_mm, "touch_mm"), max(spacing))
    min_voxels = _check_positive(min_body_mm3, "min_body_mm3") / (spacing[0] * spacing[1] * spacing[2])

    labels, count = ndimage.label(vertebra_mask)
    if count == 0:
        return {}
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    bodies = [i for i in range(1, count + 1) if sizes[i] >= min_voxels]
    if not bodies:
        return {}
    centroid_z = {b: c[0] for b, c in zip(bodies, ndimage.center_of_mass(vertebra_mask, labels, bodies))}
    bodies.sort(key=lambda b: -centroid_z[b])  # head first

    # Distances to the ribs are only needed within ``reach`` of the bodies: crop.
    zs, ys, xs = np.nonzero(np.isin(labels, bodies))
    lo, hi = [], []
    for axis, coords in enumerate((zs, ys, xs)):
        margin = int(math.ceil(reach / spacing[axis])) + 1
        lo.append(max(int(coords.min()) - margin, 0))
        hi.append(min(int(coords.max()) + margin + 1, vertebra_mask.shape[axis]))
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    ribs = rib_mask[crop]
    if not ribs.any():
        return {}
    distance = ndimage.distance_transform_edt(~ribs, sampling=spacing)
    nearest = ndimage.minimum(distance, labels[crop], bodies)
    bears_rib = [float(d) <= reach for d in nearest]

    rib_bearing = [k for k, bears in enumerate(bears_rib) if bears]
    if not rib_bearing:
        return {}
    t12 = rib_bearing[-1]
    if not any(not bears for bears in bears_rib[t12 + 1:]):
        return {}
    t12_level = SPINE_LEVELS.index("T12")
    levels: dict[str, np.ndarray] = {}
    for k, body in enumerate(bodies):
        position = t12_level + (k - t12)
        if 0 <= position < len(SPINE_LEVELS):
            levels[SPINE_LEVELS[position]] = labels == body
    return levels


# --------------------------------------------------------------------------
# bone density


def trabecular_roi(
    hu: np.ndarray,
    vertebra_mask: np.ndarray,
    spacing_zyx: Sequence[float],
    area_mm2: float = TRABECULAR_ROI_AREA_MM2,
    shell_mm: float = CORTICAL_SHELL_MM,
) -> tuple[np.ndarray, float]:
    """A disc ROI of about ``area_mm2`` in the trabecular bone, and its mean HU.

    Pickhardt's method: one axial slice through the middle of the vertebral
    body (the middle of the mask's slice range), the body eroded by ``shell_mm``
    to exclude the cortical shell, the largest piece left on that slice taken as
    the body (this drops what survives of posterior elements in whole-vertebra
    masks), and a disc centred at its centroid (or at its deepest point when the
    centroid falls outside it). The disc shrinks to fit inside the eroded body;
    its actual area is ``roi_mask.sum() * dy * dx``. Returns an all-False mask
    and NaN when the mask is empty or no trabecular bone is left after erosion.
    """
    roi, mean, _ = _trabecular_disc(hu, vertebra_mask, spacing_zyx, area_mm2, shell_mm)
    return roi, mean


def _trabecular_disc(
    hu: np.ndarray, vertebra_mask: np.ndarray, spacing_zyx: Sequence[float], area_mm2: float, shell_mm: float
) -> tuple[np.ndarray, float, bool]:
    """:func:`trabecular_roi` and whether the disc had to shrink to fit."""
    _check_hu(hu)
    _check_mask(vertebra_mask, "vertebra_mask", hu.shape)
    spacing = _check_spacing(spacing_zyx)
    target_radius = math.sqrt(_check_positive(area_mm2, "area_mm2") / math.pi)
    shell = _check_positive(shell_mm, "shell_mm")
    roi = np.zeros(hu.shape, dtype=bool)
    slices = np.flatnonzero(vertebra_mask.any(axis=(1, 2)))
    if slices.size == 0:
        return roi, math.nan, False
    z = int((slices[0] + slices[-1]) // 2)
    in_plane = spacing[1:]

    # Pad so that the image border counts as outside the body. The distance
    # transform measures to the centre of the nearest outside pixel; the
    # body's edge lies about half a pixel nearer.
    body = np.pad(vertebra_mask[z], 1)
    edge_offset = (in_plane[0] + in_plane[1]) / 4.0
    eroded = ndimage.distance_transform_edt(body, sampling=in_plane) > shell + edge_offset
    pieces, count = ndimage.label(eroded)
    if count == 0:
        return roi, math.nan, False
    largest = 1 + int(np.argmax(ndimage.sum_labels(eroded, pieces, range(1, count + 1))))
    core = pieces == largest
    depth = ndimage.distance_transform_edt(core, sampling=in_plane)
    centre = tuple(int(round(c)) for c in ndimage.center_of_mass(core))
    if not core[centre]:
        centre = tuple(int(i) for i in np.unravel_index(int(np.argmax(depth)), depth.shape))
    # Pixels closer to the centre than its distance to the nearest outside
    # pixel are inside ``core``; the ``& core`` below only guards rounding.
    radius = min(target_radius, float(depth[centre]) - 1e-6)
    rows, cols = np.ogrid[: core.shape[0], : core.shape[1]]
    disc = ((rows - centre[0]) * in_plane[0]) ** 2 + ((cols - centre[1]) * in_plane[1]) ** 2 <= radius**2
    disc &= core
    roi[z] = disc[1:-1, 1:-1]
    if not roi.any():
        return roi, math.nan, False
    return roi, float(hu[roi].astype(np.float64).mean()), radius < target_radius


def bone_density_category(mean_hu: float) -> str:
    """Pickhardt's category for an L1 trabecular mean at 120 kVp.

    ``<= 110`` HU "osteoporosis" (>90 % specific), ``<= 160`` HU "osteopenia"
    (the 160 HU threshold is 90 % sensitive for osteoporosis), above "normal".
    """
    if not math.isfinite(mean_hu):
        raise ValueError(f"mean_hu must be finite, got {mean_hu!r}")
    if mean_hu <= OSTEOPOROSIS_MAX_HU:
        return "osteoporosis"
    if mean_hu <= OSTEOPENIA_MAX_HU:
        return "osteopenia"
    return "normal"


def bone_density_assessment(
    levels: Mapping[str, np.ndarray],
    hu: np.ndarray,
    spacing_zyx: Sequence[float],
    kvp: float | None,
) -> BoneDensityResult:
    """Osteoporosis screening from trabecular HU (Pickhardt et al., Ann Intern Med 2013).

    Uses L1; T12 substitutes when L1 is absent from ``levels``, empty, cut by
    the field of view (the middle of a cut body is unknown) or too small for a
    trabecular ROI of 50 mm^2. Neither usable: "not evaluable" with both
    reasons. ``kvp`` is the series' KVP (0018,0060); the thresholds hold at
    120 kVp and bone HU rises as kVp falls, so another or an unknown kVp is
    noted in the result.
    """
    _check_hu(hu)
    spacing = _check_spacing(spacing_zyx)
    if not isinstance(levels, Mapping):
        raise TypeError(f"levels must map level names to masks, got {type(levels).__name__}")
    for name, given in levels.items():
        _check_mask(given, f"levels[{name!r}]", hu.shape)
    if kvp is not None:
        kvp = _check_positive(kvp, "kvp")

    notes: list[str] = []
    if kvp is None:
        notes.append(f"kVp not recorded: thresholds assume {REFERENCE_KVP:g} kVp")
    elif kvp != REFERENCE_KVP:
        notes.append(
            f"acquired at {kvp:g} kVp: the thresholds were derived at {REFERENCE_KVP:g} kVp "
            "and trabecular HU rises as kVp falls, so the category is approximate"
        )

    problems: list[str] = []
    for level in ("L1", "T12"):
        mask = levels.get(level)
        if mask is None or not mask.any():
            problems.append(f"{level} is not in the field of view")
            continue
        if field_of_view_cut(mask):
            problems.append(f"{level} is cut by the field of view")
            continue
        roi, mean, shrunk = _trabecular_disc(hu, mask, spacing, TRABECULAR_ROI_AREA_MM2, CORTICAL_SHELL_MM)
        if not math.isfinite(mean):
            problems.append(f"{level} has no trabecular bone left after excluding a {CORTICAL_SHELL_MM:g} mm shell")
            continue
        area = float(roi.sum()) * spacing[1] * spacing[2]
        if area < MIN_TRABECULAR_ROI_MM2:
            problems.append(
                f"{level} holds a trabecular ROI of only {area:.0f} mm^2 (< {MIN_TRABECULAR_ROI_MM2:g} mm^2)"
            )
            continue
        if shrunk:
            notes.append(f"ROI shrunk to {area:.0f} mm^2 to stay inside the trabecular bone")
        reason = "L1 (Pickhardt's reference level)" if level == "L1" else f"T12 substitutes: {problems[0]}"
        return BoneDensityResult(
            category=bone_density_category(mean),
            level=level,
            level_reason=reason,
            mean_hu=mean,
            high_suspicion=mean < HIGH_SUSPICION_BELOW_HU,
            roi_area_mm2=area,
            roi_slice=int(np.flatnonzero(roi.any(axis=(1, 2)))[0]),
            kvp=kvp,
            notes=tuple(notes),
            roi_mask=roi,
        )
    return BoneDensityResult(
        category="not evaluable",
        level=None,
        level_reason="; ".join(problems),
        mean_hu=math.nan,
        high_suspicion=False,
        roi_area_mm2=0.0,
        roi_slice=None,
        kvp=kvp,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------
# liver


def steatosis_grade(liver_mean_hu: float) -> str:
    """Grade from unenhanced liver attenuation alone.

    ``<= 40`` HU "moderate-severe" (Boyce et al., AJR 2010); ``< 48`` HU "mild"
    (Pickhardt et al., Eur Radiol 2012: specific for >=30 % fat, so "mild"
    means "present, not moderate-severe by attenuation"); otherwise "none".
    """
    if not math.isfinite(liver_mean_hu):
        raise ValueError(f"liver_mean_hu must be finite, got {liver_mean_hu!r}")
    if liver_mean_hu <= LIVER_MODERATE_SEVERE_MAX_HU:
        return "moderate-severe"
    if liver_mean_hu < LIVER_MILD_BELOW_HU:
        return "mild"
    return "none"


def steatosis_assessment(liver: OrganStats, spleen: OrganStats | None) -> SteatosisResult:
    """Grade hepatic steatosis from the liver's (and spleen's) mean HU; unenhanced CT only.

    The grade comes from the liver mean (:func:`steatosis_grade`). When the
    spleen is evaluable (not cut by the field of view, >= 20 ml visible),
    liver minus spleen < -10 HU or liver/spleen ratio < 1.0 supports steatosis:
    either raises "none" to "mild" and never changes a higher grade. The liver
    is not evaluable when cut by the field of view or with < 100 ml visible.
    Means over the whole organ include its vessels (unenhanced blood is about
    40-50 HU), which pull the mean toward blood attenuation compared with the
    parenchymal ROIs of the source studies.
    """
    if not isinstance(liver, OrganStats):
        raise TypeError(f"liver must be OrganStats, got {type(liver).__name__}")
    if spleen is not None and not isinstance(spleen, OrganStats):
        raise TypeError(f"spleen must be OrganStats or None, got {type(spleen).__name__}")

    def not_evaluable(reason: str) -> SteatosisResult:
        return SteatosisResult("not evaluable", liver.mean_hu, None, None, None, (), reason)

    if liver.is_empty:
        return not_evaluable("liver not in the field of view")
    if liver.cut_by_field_of_view:
        return not_evaluable("liver cut by the field of view")
    if liver.volume_ml < MIN_LIVER_ML:
        return not_evaluable(f"only {liver.volume_ml:.1f} ml of liver visible (< {MIN_LIVER_ML:g} ml)")

    grade = steatosis_grade(liver.mean_hu)
    reason = f"liver mean {liver.mean_hu:.1f} HU"
    spleen_mean = difference = ratio = None
    supporting: list[str] = []
    if spleen is None or spleen.is_empty:
        reason += "; spleen not available"
    elif spleen.cut_by_field_of_view:
        reason += "; spleen cut by the field of view, not used"
    elif spleen.volume_ml < MIN_SPLEEN_ML:
        reason += f"; only {spleen.volume_ml:.1f} ml of spleen visible, not used"
    else:
        spleen_mean = spleen.mean_hu
        difference = liver.mean_hu - spleen.mean_hu
        if difference < LIVER_MINUS_SPLEEN_BELOW_HU:
            supporting.append(f"liver - spleen {difference:.1f} HU < {LIVER_MINUS_SPLEEN_BELOW_HU:g} HU")
        if spleen.mean_hu > 0:
            ratio = liver.mean_hu / spleen.mean_hu
            if ratio < LIVER_SPLEEN_RATIO_BELOW:
                supporting.append(f"liver/spleen {ratio:.2f} < {LIVER_SPLEEN_RATIO_BELOW:g}")
        if supporting and grade == "none":
            grade = "mild"
            reason += "; raised to mild by the liver-spleen comparison"
    return SteatosisResult(grade, liver.mean_hu, spleen_mean, difference, ratio, tuple(supporting), reason)


# --------------------------------------------------------------------------
# lung nodules


def lung_rads_category(diameter_mm: float) -> str:
    """Lung-RADS v2022 size category of a baseline solid nodule by mean diameter.

    ``< 6`` mm "2", ``6 - < 8`` mm "3", ``8 - < 15`` mm "4A", ``>= 15`` mm "4B".
    Part-solid and ground-glass nodules, and new or growing nodules at
    follow-up, have other thresholds not handled here.
    """
    return _category(diameter_mm, "diameter_mm", _LUNG_RADS_BY_DIAMETER_MM)


def lung_rads_category_from_volume(volume_mm3: float) -> str:
    """Lung-RADS v2022 size category of a baseline solid nodule by volume.

    ``< 113`` mm^3 "2", ``113 - < 268`` "3", ``268 - < 1767`` "4A", ``>= 1767`` "4B".
    """
    return _category(volume_mm3, "volume_mm3", _LUNG_RADS_BY_VOLUME_MM3)


def _category(value: float, name: str, bounds: tuple[tuple[float, str], ...]) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(float(value)) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    for upper, category in bounds:
        if value < upper:
            return category
    return "4B"


def nodule_measurements(
    hu: np.ndarray, nodule_mask: np.ndarray, spacing_zyx: Sequence[float]
) -> list[NoduleMeasurement]:
    """Measure every connected component of ``nodule_mask``, in scan order.

    On each slice the long axis is the largest distance between two pixel
    centres of the nodule and the short axis the nodule's extent perpendicular
    to it (equal to the longest perpendicular chord for convex outlines), each
    plus half a pixel: the true edge lies beyond the outermost pixel centres,
    and on digitised spheres of 4-20 mm at 0.7-1 mm pixels the centre-to-centre
    distance fell 0.1-0.6 pixel short of the diameter, whereas edge-to-edge
    distances overshoot by up to a pixel. Lung-RADS categories assume a solid
    nodule.
    """
    _check_hu(hu)
    _check_mask(nodule_mask, "nodule_mask", hu.shape)
    spacing = _check_spacing(spacing_zyx)
    labels, _ = ndimage.label(nodule_mask, structure=np.ones((3, 3, 3), dtype=bool))
    results: list[NoduleMeasurement] = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[box] == index
        best = (-1.0, -1.0, 0)
        for k in range(component.shape[0]):
            if component[k].any():
                long_axis, short_axis = _axial_diameters(component[k], spacing[1:])
                best = max(best, (long_axis, short_axis, -k))
        long_axis, short_axis, slice_key = best
        voxels = int(component.sum())
        volume = voxels * spacing[0] * spacing[1] * spacing[2]
        mean_diameter = _round_half_up((long_axis + short_axis) / 2.0)
        centroid = tuple(float(c) + b.start for c, b in zip(ndimage.center_of_mass(component), box))
        results.append(
            NoduleMeasurement(
                index=index,
                voxel_count=voxels,
                volume_mm3=volume,
                long_axis_mm=long_axis,
                short_axis_mm=short_axis,
                mean_diameter_mm=mean_diameter,
                axial_slice=box[0].start - slice_key,
                centroid_zyx=centroid,
                centroid_offset_mm_zyx=tuple(c * s for c, s in zip(centroid, spacing)),
                mean_hu=float(hu[box][component].astype(np.float64).mean()),
                lung_rads=lung_rads_category(mean_diameter),
                lung_rads_by_volume=lung_rads_category_from_volume(volume),
                # The bounding box is tight: the nodule touches a border where its box does.
                cut_by_field_of_view=any(b.start == 0 or b.stop == n for b, n in zip(box, labels.shape)),
            )
        )
    return results


def _round_half_up(value: float) -> float:
    """``value`` to 0.1 with halves rounded up (5.95 -> 6.0), as a reader would."""
    return float(Decimal(repr(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _axial_diameters(region: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[float, float]:
    """Long axis and perpendicular extent (mm) of one slice of a nodule."""
    edge = region & ~ndimage.binary_erosion(region)  # the hull of the edge pixels is the hull of all
    rows, cols = np.nonzero(edge)
    points = np.column_stack((rows * spacing_yx[0], cols * spacing_yx[1])).astype(np.float64)
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear pixels: keep every one
            pass
    differences = points[:, None, :] - points[None, :, :]
    distances = np.hypot(differences[..., 0], differences[..., 1])
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    long_axis = float(distances[i, j])
    if long_axis == 0.0:
        across_extent = 0.0
    else:
        direction = differences[i, j] / long_axis
        across = points @ np.array([-direction[1], direction[0]])
        across_extent = float(across.max() - across.min())
    half_pixel = (spacing_yx[0] + spacing_yx[1]) / 4.0
    return long_axis + half_pixel, across_extent + half_pixel
