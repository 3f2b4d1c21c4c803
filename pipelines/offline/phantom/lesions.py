"""Lesion requests, and placing lesions inside their organ on a coarse label rendering."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.offline.phantom.anatomy import Lesion, Phantom, _organ_reference_hu, _pt, _r, _site_label
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.painting import _Canvas, _paint_anatomy
from pipelines.offline.phantom.tables import (
    _BULGING_SITES,
    _HOLLOW_SITES,
    _PLACEMENT_SPACING_MM,
    CANCER_SITES,
    CYST_HU,
    LESION_CONTRAST_HU,
    LESION_DIAMETER_MM,
    LESION_TYPE_WEIGHTS,
    LESION_TYPES,
    NODULE_HU,
    PhantomError,
)


def _lesion_probabilities(value: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in CANCER_SITES]
        if unknown:
            raise PhantomError(f"lesion_probability for unknown site(s) {unknown}; sites: {', '.join(CANCER_SITES)}")
        probabilities = {site: float(value.get(site, 0.0)) for site in CANCER_SITES}
    else:
        probabilities = {site: float(value) for site in CANCER_SITES}
    for site, p in probabilities.items():
        if not 0.0 <= p <= 1.0:
            raise PhantomError(f"lesion_probability for {site} must be 0-1, got {p!r}")
    return probabilities


_REQUEST_KEYS = frozenset({"site", "type", "diameter_mm", "contrast_hu", "hu"})


@dataclass(frozen=True)
class LesionRequest:
    """One lesion to place: forced by the caller (``forced``; placing it must succeed) or drawn at
    random; a None value (diameter, contrast against the organ, or absolute HU) is drawn when placed."""

    site: str
    type: str
    diameter_mm: float | None = None
    contrast_hu: float | None = None
    hu: float | None = None
    forced: bool = False


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _lesion_request(spec: Mapping[str, Any], index: int) -> LesionRequest:
    """Validate one forced lesion; missing values are drawn later."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"lesions[{index}] must be a mapping such as {{'site': 'liver'}}, got {spec!r}")
    unknown = sorted(set(spec) - _REQUEST_KEYS)
    if unknown:
        raise PhantomError(f"lesions[{index}]: unknown key(s) {unknown}; known: {sorted(_REQUEST_KEYS)}")
    site = spec.get("site")
    if site not in LESION_TYPES:
        raise PhantomError(f"lesions[{index}]: unknown site {site!r}; known: {', '.join(LESION_TYPES)}")
    kind = spec.get("type", LESION_TYPES[site][0])
    if kind not in LESION_TYPES[site]:
        raise PhantomError(f"lesions[{index}]: type {kind!r} is not one of {', '.join(LESION_TYPES[site])} for {site}")
    diameter = spec.get("diameter_mm")
    if diameter is not None and not 2.0 <= float(diameter) <= 60.0:
        raise PhantomError(f"lesions[{index}]: diameter_mm must be 2-60 mm, got {diameter!r}")
    if "contrast_hu" in spec and "hu" in spec:
        raise PhantomError(f"lesions[{index}]: give contrast_hu or hu, not both")
    for key in ("contrast_hu", "hu"):
        if key in spec and not -300.0 <= float(spec[key]) <= 1200.0:
            raise PhantomError(f"lesions[{index}]: {key} must be -300..1200 HU, got {spec[key]!r}")
    return LesionRequest(site=site, type=kind, diameter_mm=_optional_float(diameter),
                         contrast_hu=_optional_float(spec.get("contrast_hu")), hu=_optional_float(spec.get("hu")),
                         forced=True)


def _random_lesion_requests(rng: np.random.Generator, probabilities: Mapping[str, float],
                            lung_nodules: int | None) -> list[LesionRequest]:
    """The lesions drawn at random: per cancer site with its probability, then the lung nodules."""
    requests = []
    for site in CANCER_SITES:
        draw, type_draw = rng.random(), rng.random()
        if draw < probabilities[site]:
            weights = np.cumsum(LESION_TYPE_WEIGHTS[site])
            kind = LESION_TYPES[site][int(np.searchsorted(weights / weights[-1], type_draw))]
            requests.append(LesionRequest(site=site, type=kind))
    count = (0 if rng.random() < 0.5 else int(rng.integers(1, 4))) if lung_nodules is None else lung_nodules
    requests += [LesionRequest(site="lung", type="nodule") for _ in range(count)]
    return requests


def _place_lesions(anatomy: Phantom, requests: list[LesionRequest], rng: np.random.Generator) -> tuple[Lesion, ...]:
    """Put each requested lesion inside its organ, fully inside the field of view in z
    where it fits: chosen on a coarse label rendering of the anatomy."""
    if not requests:
        return ()
    (x0, y0), (x1, y1) = anatomy.body_extent_xy()
    s = _PLACEMENT_SPACING_MM
    lo = (x0 - s, y0 - s, anatomy.fov_bottom_mm)
    counts = [int(math.floor((h - low) / s)) + 1 for low, h in zip(lo, (x1 + s, y1 + s, anatomy.fov_top_mm))]
    grid = Grid((counts[2], counts[1], counts[0]), (s, s, s), lo)
    canvas = _Canvas(grid, with_hu=False)
    _paint_anatomy(canvas, anatomy)
    taken = np.zeros(grid.shape, dtype=bool)
    zs, ys, xs = grid.axes_mm()
    placed: list[Lesion] = []
    for request in requests:
        site, kind = request.site, request.type
        lo_d, hi_d = LESION_DIAMETER_MM[site]
        diameter = request.diameter_mm
        drawn_d = math.exp(rng.uniform(math.log(lo_d), math.log(hi_d)))
        if site == "lung" and rng.random() < 0.85:
            drawn_d = math.exp(rng.uniform(math.log(3.0), math.log(14.0)))
        diameter = float(diameter) if diameter is not None else drawn_d
        contrast = _lesion_contrast(anatomy, request, rng)
        radius = diameter / 2.0
        host = canvas.organs == _site_label(site)
        if not host.any():
            if request.forced:
                raise PhantomError(f"cannot place a {diameter:.0f} mm {site} lesion: the {site} is not in the "
                                   f"field of view ({anatomy.fov_bottom_mm:.0f}..{anatomy.fov_top_mm:.0f} mm)")
            continue
        depth = _depth_mm(host & ~taken, s)
        margin = {"lung": 5.0, "liver": 3.0, "pancreas": 2.0}.get(site, 0.0)
        bulge = 0.0
        if site in _HOLLOW_SITES:
            candidates = (depth >= radius + 1.0) & (depth <= radius + 1.0 + s)
        else:
            candidates = depth >= radius + margin
        if not candidates.any():
            # too large for the organ here: the deepest places, away from the FOV's z edges if possible
            in_fov = ((zs >= anatomy.fov_bottom_mm + radius) & (zs <= anatomy.fov_top_mm - radius))[:, None, None]
            pool = depth * in_fov if (depth * in_fov).max() > 0 else depth
            deepest = pool.max()
            if deepest <= 0:
                if request.forced:
                    raise PhantomError(f"cannot place a {diameter:.0f} mm {site} lesion: no free {site} voxel")
                continue
            candidates = pool >= 0.8 * deepest
            if site in _BULGING_SITES:
                bulge = radius + (3.0 if site in _HOLLOW_SITES else 2.0)
        index = np.argwhere(candidates)
        k, r, c = index[int(rng.integers(0, len(index)))]
        jitter = rng.uniform(-0.3 * s, 0.3 * s, 3)
        centre = (xs[c] + jitter[0], ys[r] + jitter[1], zs[k] + jitter[2])
        lobulation = {"malignant": 0.12, "nodule": 0.07, "benign": 0.03, "cyst": 0.0}[kind]
        heterogeneity = {"malignant": 4.0, "nodule": 2.0, "benign": 1.5, "cyst": 0.0}[kind]
        placed.append(Lesion(number=len(placed) + 1, site=site, type=kind, diameter_mm=_r(diameter),
                             contrast_hu=_r(contrast), centre_mm=_pt(*centre), lobulation=lobulation,
                             heterogeneity_hu=heterogeneity, bulge_mm=_r(bulge)))
        near = ((zs[:, None, None] - centre[2]) ** 2 + (ys[None, :, None] - centre[1]) ** 2
                + (xs[None, None, :] - centre[0]) ** 2) <= (radius + 4.0) ** 2
        taken |= near
    return tuple(placed)


def _depth_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Conservative distance (mm) from each voxel of ``mask`` to its boundary, the first
    and last slice counting as outside (they are the field-of-view edges)."""
    mask = mask.copy()
    mask[0] = mask[-1] = False
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    dist = ndimage.distance_transform_edt(crop) * spacing - 0.5 * spacing
    out = np.zeros(mask.shape, dtype=np.float32)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = np.maximum(dist[1:-1, 1:-1, 1:-1], 0.0) * mask[
        lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


def _lesion_contrast(anatomy: Phantom, request: LesionRequest, rng: np.random.Generator) -> float:
    """The lesion's contrast against its organ (HU): as requested, else drawn for its site and type."""
    site, kind = request.site, request.type
    reference = _organ_reference_hu(anatomy, site)
    if kind in ("cyst", "nodule"):
        drawn = rng.uniform(*(CYST_HU if kind == "cyst" else NODULE_HU)) - reference
    else:
        drawn = rng.uniform(*LESION_CONTRAST_HU[(site, kind)])
    if request.contrast_hu is not None:
        return float(request.contrast_hu)
    if request.hu is not None:
        return float(request.hu) - reference
    return float(drawn)
