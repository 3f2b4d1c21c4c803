"""Rendering a phantom on a grid: image formation (blur, noise) and the truth record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.offline.phantom.anatomy import Phantom, _organ_reference_hu, _r
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.painting import _Canvas, _paint_anatomy, _paint_lesions
from pipelines.offline.phantom.tables import (
    _HU_MAX,
    _HU_MIN,
    LEVEL_INDEX,
    LEVELS,
    NOISE_CORRELATION_MM,
    ORGAN_IDS,
    ORGAN_LABELS,
    PSF_SIGMA_MM,
    kvp_bone_factor,
)


@dataclass
class RenderedPhantom:
    """A phantom rendered on a grid: HU (int16) and label maps (uint8), all (z, y, x)."""

    hu: np.ndarray
    organs: np.ndarray
    lesions: np.ndarray
    vertebrae: np.ndarray
    truth: dict[str, Any]
    grid: Grid
    phantom: Phantom


# --------------------------------------------------------------------------- render


def render(phantom: Phantom, grid: Grid, *, noise: bool = True, blur: bool = True) -> RenderedPhantom:
    """Render ``phantom`` on ``grid``: HU (int16) and label maps (uint8), all (z, y, x).

    ``truth`` holds the acquisition (kvp, noise_sigma_hu, slice_thickness_mm),
    the liver and spleen means and classes, the per-level trabecular means,
    what the grid shows and cuts (organs_in_view, organs_cut, levels_in_view,
    levels_cut) and every lesion as rendered. ``noise=False`` or ``blur=False``
    skip those steps of image formation (a phantom with ``noise_sigma_hu`` 0 is
    noise-free anyway). Grids finer than ~5 mm keep each disc, so each body is
    its own connected component.
    """
    if not isinstance(phantom, Phantom):
        raise TypeError(f"phantom must be a Phantom, got {type(phantom).__name__}")
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a Grid, got {type(grid).__name__}")
    cv = _Canvas(grid, with_hu=True)
    _paint_anatomy(cv, phantom)
    _paint_lesions(cv, phantom)
    truth = _truth(cv, phantom)
    thickness = phantom.slice_thickness_mm if phantom.slice_thickness_mm is not None else grid.spacing_mm[0]
    hu = cv.hu
    assert hu is not None                               # the canvas was made with_hu
    if blur:
        _blur(hu, grid, thickness)
    if noise and phantom.noise_sigma_hu > 0:
        _add_noise(hu, grid, phantom.noise_sigma_hu, np.random.default_rng([phantom.seed, 99] + list(grid.shape)))
    np.rint(hu, out=hu)
    np.clip(hu, _HU_MIN, _HU_MAX, out=hu)
    out = hu.astype(np.int16)
    truth["slice_thickness_mm"] = float(thickness)
    truth["noise_sigma_hu"] = phantom.noise_sigma_hu if noise else 0.0
    return RenderedPhantom(hu=out, organs=cv.organs, lesions=cv.lesions, vertebrae=cv.vertebrae, truth=truth,
                           grid=grid, phantom=phantom)


def _gaussian_weights(sigma: float, truncate: float = 3.0) -> np.ndarray:
    half = int(truncate * sigma + 0.5)
    x = np.arange(-half, half + 1, dtype=float)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    weights: np.ndarray = w / w.sum()
    return weights


def _blur(hu: np.ndarray, grid: Grid, thickness_mm: float) -> None:
    """PSF in-plane (with the pixel footprint) and the slice profile along z, in place."""
    sz, sy, sx = grid.spacing_mm
    sigmas = (thickness_mm / 2.3548 / sz, math.sqrt(PSF_SIGMA_MM ** 2 + sy ** 2 / 12) / sy,
              math.sqrt(PSF_SIGMA_MM ** 2 + sx ** 2 / 12) / sx)
    for axis, sigma in enumerate(sigmas):
        if sigma >= 0.2 and hu.shape[axis] > 1:
            ndimage.gaussian_filter1d(hu, sigma, axis=axis, output=hu, mode="nearest", truncate=3.0)


def _add_noise(hu: np.ndarray, grid: Grid, sigma_hu: float, rng: np.random.Generator) -> None:
    """Gaussian noise of standard deviation ``sigma_hu``, correlated in-plane, slab by slab."""
    _, sy, sx = grid.spacing_mm
    sig = (NOISE_CORRELATION_MM / sy, NOISE_CORRELATION_MM / sx)
    gain = 1.0
    for s in sig:
        if s >= 0.2:
            gain *= math.sqrt(float((_gaussian_weights(s) ** 2).sum()))
    scale = np.float32(sigma_hu / gain)
    chunk = max(1, int(4_000_000 // (hu.shape[1] * hu.shape[2])))
    for k0 in range(0, hu.shape[0], chunk):
        n = rng.standard_normal((min(chunk, hu.shape[0] - k0),) + hu.shape[1:], dtype=np.float32)
        for axis, s in zip((1, 2), sig):
            if s >= 0.2:
                ndimage.gaussian_filter1d(n, s, axis=axis, output=n, mode="wrap", truncate=3.0)
        n *= scale
        hu[k0:k0 + n.shape[0]] += n


def _touches_edge(box: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether a bounding box reaches the first or last index of any axis (cut by the field of view)."""
    return any(s.start == 0 or s.stop == n for s, n in zip(box, shape))


def _truth(cv: _Canvas, ph: Phantom) -> dict[str, Any]:
    """Ground truth on this grid, from the noise-free, unblurred image and the label maps."""
    grid = cv.grid
    organs, lesions, vertebrae = cv.organs, cv.lesions, cv.vertebrae
    hu = cv.hu
    assert hu is not None                               # the canvas was made with_hu
    boxes = ndimage.find_objects(organs, max_label=len(ORGAN_LABELS))
    present = {i + 1 for i, box in enumerate(boxes) if box is not None}
    cut = {label for label in present if _touches_edge(boxes[label - 1], grid.shape)}
    level_boxes = ndimage.find_objects(vertebrae, max_label=len(LEVELS))
    levels = {i + 1 for i, box in enumerate(level_boxes) if box is not None}
    levels_cut = {level for level in levels if _touches_edge(level_boxes[level - 1], grid.shape)}
    means: dict[str, float | None] = {}
    for name in ("liver", "spleen"):
        box = boxes[ORGAN_IDS[name] - 1]
        mask = None if box is None else (organs[box] == ORGAN_IDS[name]) & (lesions[box] == 0)
        means[name] = _r(float(hu[box][mask].mean()), 2) if mask is not None and mask.any() else None
    bone = kvp_bone_factor(ph.kvp)
    trabecular = {v.level: _r(v.trabecular_hu * bone) for v in ph.vertebrae}
    lesion_truth = []
    counts = np.bincount(lesions.ravel(), minlength=len(ph.lesions) + 1)
    for lesion in ph.lesions:
        n = int(counts[lesion.number])
        lesion_truth.append({
            "number": lesion.number, "site": lesion.site, "type": lesion.type, "diameter_mm": lesion.diameter_mm,
            "contrast_hu": lesion.contrast_hu,
            "hu": _r(_organ_reference_hu(ph, lesion.site) + lesion.contrast_hu),
            "centre_mm": list(lesion.centre_mm),
            "centre_voxel": [int(round(v)) for v in grid.lps_to_voxel(lesion.centre_mm)],
            "voxel_count": n, "volume_mm3": _r(n * grid.voxel_volume_mm3, 1), "visible": n > 0,
        })
    liver_hu = ph.tissues.liver
    liver_mean, spleen_mean = means["liver"], means["spleen"]
    return {
        "seed": ph.seed,
        "kvp": ph.kvp,
        "noise_sigma_hu": ph.noise_sigma_hu,
        "slice_thickness_mm": ph.slice_thickness_mm,
        "liver_hu": liver_hu,
        "liver_mean_hu": liver_mean,
        "spleen_mean_hu": spleen_mean,
        "liver_minus_spleen_hu": None if liver_mean is None or spleen_mean is None else _r(liver_mean - spleen_mean),
        "steatosis": ph.steatosis,
        "bone_density": ph.bone_density,
        "trabecular_mean_hu": trabecular,
        "trabecular_mean_hu_120kvp": {v.level: v.trabecular_hu for v in ph.vertebrae},
        "l1_trabecular_mean_hu": trabecular["L1"] if LEVEL_INDEX["L1"] in levels else None,
        "levels_in_view": [LEVELS[i] for i in sorted(levels)],
        "levels_cut": [LEVELS[i] for i in sorted(levels_cut)],
        "organs_in_view": [ORGAN_LABELS[i] for i in sorted(present)],
        "organs_cut": [ORGAN_LABELS[i] for i in sorted(cut)],
        "lesions": lesion_truth,
        "sites_with_lesions": sorted({les["site"] for les in lesion_truth if les["visible"]}),
        "coverage": ph.coverage,
        "fov_mm": [ph.fov_bottom_mm, ph.fov_top_mm],
    }
