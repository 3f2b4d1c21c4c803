"""Synthetic non-contrast chest/abdomen CT phantoms with exact ground truth.

What it is for: training and held-out evaluation of the small 3-D networks
(organ segmentation, lesion detection and typing), DICOM series for the
end-to-end tests and benchmarks, and ground truth for the deterministic
measurements (L1 trabecular HU, liver attenuation, lung nodule size).

Anatomy is analytic, in patient millimetres (DICOM LPS, PS3.3 C.7.6.2.1.1:
+x patient Left, +y Posterior, +z Superior), so one :class:`Phantom` renders
on any :class:`Grid`. ``z = 0`` is the middle of the T12/L1 disc; the body
axis is z. A grid is axial: row direction (1, 0, 0), column direction
(0, 1, 0), and slice ``k`` lies at ``origin_z + k * spacing_z``, i.e. slices
ascend toward the head, the order :func:`pipelines.volume.ct.ct.load_series`
returns (slices sorted along the normal (0, 0, 1)).

Use::

    phantom = sample_phantom(7, steatosis="mild", lesions=[{"site": "liver", "diameter_mm": 20}])
    rendered = render(phantom, Grid.coarse(3.0, phantom))      # ~0.2 s, for training
    rendered = render(phantom, Grid.chest_ct(phantom=phantom))  # 512 x 512, 1 mm slices, ~8 s
    write_case(phantom, Grid.chest_ct(phantom=phantom), "cases/case_0007")

or ``python -m pipelines.offline.phantom OUT_DIR --cases N --seed S [--grid coarse|chest]
[--spacing MM] [--no-dicom]`` (case ``i`` uses seed ``S + i``).

Label maps (computed on the grid without blur: a voxel belongs to a shape
when its centre does)
-------------------------------------------------------------------------

``organs`` (:data:`ORGAN_LABELS`): 1 lung, 2 liver, 3 spleen, 4 pancreas,
5 kidney, 6 stomach, 7 oesophagus, 8 colon, 9 aorta, 10 vertebra (vertebral
bodies with their cortical shell; each body is separated from the next by a
6-10 mm disc of soft tissue, label 0), 11 rib. Hollow organs are labelled
with their contents (wall + lumen). Everything else is 0: outside air, skin,
fat, muscle, heart, other vessels, trachea and bronchi, small bowel,
gallbladder, discs, spinal canal, posterior vertebral elements, sternum.
A lesion keeps its organ's label; lung nodules are labelled lung.

``lesions``: 0 none, ``i`` = lesion number ``i`` (``truth["lesions"]``).
``vertebrae``: 0 none, else the level index of :data:`LEVELS` (1 = T1 ...
12 = T12, 13 = L1 ... 17 = L5), on the voxels labelled 10.

Ribs (cortical tubes) leave each thoracic vertebra T1-T12 at its mid-height,
touching its body, and curve laterally and anteriorly in the chest wall;
lumbar vertebrae have none. So on the masks, T12 is the lowest vertebral
body with a rib within 5 mm, and L1 the next body below.

Tissue attenuation at 120 kVp (noise-free, before blur; :data:`HU_RANGES`)
--------------------------------------------------------------------------

outside air -1000; subcutaneous/visceral fat -120..-80; muscle 45-55; skin
~30; lung -900..-800 (denser posteriorly) with small vessels ~45; liver
55-65 normal, 15-47 steatotic; spleen 45-50; pancreas 35-45; kidney 30-35;
stomach, oesophagus and colon wall 38-45; stomach water 0-15 with a gas cap
(anterior: the patient is supine, so gas rises toward -y); colon stool with
gas; oesophagus with an optional small air lumen; aortic blood 40-50 with
optional calcified plaques; vertebral cortex 400-900, trabecular bone per
level (normal > 160, osteopenic 110-160, osteoporotic < 110 at L1); discs
70-90; spinal canal 20-30; rib cortex 450-600. Bone HU scale with kVp
(x1.10 at 100 kVp, x0.90 at 140 kVp); ``truth`` gives the image values.

Image formation: organ texture, then a Gaussian PSF (0.6 mm in-plane, plus
the pixel footprint) and a Gaussian slice profile whose FWHM is the slice
thickness, then Gaussian noise of ``noise_sigma_hu`` (in-plane correlated
over ~0.7 mm), clipped to -1024..3071 and rounded to int16.

Lesions (:data:`LESION_TYPES`; contrast is against the organ's mean, or the
wall's for hollow organs)
-------------------------------------------------------------------------

============  =========  ==================================================
site          type       appearance
============  =========  ==================================================
liver         malignant  -25..-5 HU, lobulated border, mild heterogeneity
liver         cyst       water 0-15 HU, homogeneous, sharp round border
liver         benign     +5..+20 HU, well defined, round, homogeneous
pancreas      malignant  -25..-5 HU, lobulated, focal contour bulge if large
pancreas      cyst       water 0-15 HU, round
pancreas      benign     +5..+15 HU, round
stomach       malignant  wall-based mass -15..-5 HU vs the wall, into the lumen
stomach       benign     round submucosal mass +5..+15 HU vs the wall
oesophagus    malignant  focal wall thickening/mass -15..-5 HU, narrows lumen
colon         malignant  wall-based mass -15..-5 HU, into the lumen
lung          nodule     solid, 0-40 HU, 3-30 mm, >= 5 mm from the pleura
============  =========  ==================================================

A lesion is a (lobulated) sphere of ``diameter_mm`` clipped to its organ; in
a hollow organ or the pancreas an organ too thin for it bulges around it.
Lesions are placed fully inside the phantom's field of view in z when they
fit. ``truth["lesions"]`` gives for each: number, site, type, diameter_mm,
contrast_hu, hu, centre_mm (LPS), centre_voxel (k, row, column), voxel_count,
volume_mm3 (rendered) and visible (false when the lesion has no voxel on the
grid: smaller than a voxel, or outside a grid that does not cover the field
of view); ``sites_with_lesions`` counts visible lesions only.

Labelled case folder (what :func:`write_case` writes, and the layout a
hospital produces from its own labelled series for the validation harness)
-------------------------------------------------------------------------

::

    case_dir/dicom/*.dcm   one CT series (CT Image Storage, one file a slice)
    case_dir/labels.npz    uint8 arrays "organs", "lesions", "vertebrae", each
                           (slices, rows, columns) in the order
                           pipelines.volume.load_series returns (ascending
                           along the slice normal); label values as above
    case_dir/truth.json    "label_names" {"1": "lung", ...}, "level_names",
                           "grid" {shape, spacing_mm, origin_mm}, "lesions"
                           [...], the measurements (liver_mean_hu,
                           spleen_mean_hu, steatosis, trabecular_mean_hu,
                           bone_density, ...), "organs_cut", "levels_in_view",
                           and for phantoms "phantom" (every parameter)

A site's own cases need only ``organs`` (``lesions`` and ``vertebrae`` are
optional) and, in truth.json, ``label_names`` and ``lesions`` (number, site,
type, diameter_mm). Without DICOM (``--no-dicom``) ``case_dir/image.npz``
holds ``hu`` (int16) with ``spacing_mm`` and ``origin_mm`` instead of ``dicom/``.

Not modelled: contrast, arms and shoulder girdle, scapulae, clavicles,
pelvis, adrenals, duodenum, hepatic and portal veins, beam hardening and
streaks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from pipelines.errors import PacsAiError
from pipelines.dicom_out.uids import derive_uid

# --------------------------------------------------------------------------- tables

#: Organ label map values (``RenderedPhantom.organs``).
ORGAN_LABELS: dict[int, str] = {
    1: "lung", 2: "liver", 3: "spleen", 4: "pancreas", 5: "kidney", 6: "stomach",
    7: "oesophagus", 8: "colon", 9: "aorta", 10: "vertebra", 11: "rib",
}
ORGAN_IDS: dict[str, int] = {name: i for i, name in ORGAN_LABELS.items()}

#: Vertebral levels (``RenderedPhantom.vertebrae`` values): 1 = T1 ... 12 = T12, 13 = L1 ... 17 = L5.
LEVELS: dict[int, str] = {i + 1: name for i, name in enumerate(
    [f"T{n}" for n in range(1, 13)] + [f"L{n}" for n in range(1, 6)])}
LEVEL_INDEX: dict[str, int] = {name: i for i, name in LEVELS.items()}

#: Lesion types per site (see the module docstring for their appearance).
LESION_TYPES: dict[str, tuple[str, ...]] = {
    "pancreas": ("malignant", "cyst", "benign"),
    "liver": ("malignant", "cyst", "benign"),
    "oesophagus": ("malignant",),
    "stomach": ("malignant", "benign"),
    "colon": ("malignant",),
    "lung": ("nodule",),
}
#: Sites of the cancers the node screens for (lung nodules are sampled apart).
CANCER_SITES: tuple[str, ...] = ("pancreas", "liver", "oesophagus", "stomach", "colon")
#: Sampling weights of the types of a site's random lesions.
LESION_TYPE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "pancreas": (0.5, 0.35, 0.15), "liver": (0.4, 0.4, 0.2), "oesophagus": (1.0,),
    "stomach": (0.7, 0.3), "colon": (1.0,), "lung": (1.0,),
}
#: Diameter range (mm) of random lesions per site; forced lesions may be 2-60 mm.
LESION_DIAMETER_MM: dict[str, tuple[float, float]] = {
    "pancreas": (5.0, 35.0), "liver": (4.0, 35.0), "oesophagus": (10.0, 35.0),
    "stomach": (10.0, 35.0), "colon": (10.0, 35.0), "lung": (3.0, 30.0),
}
#: Contrast (HU, against the organ mean or the hollow organ's wall) of random lesions.
LESION_CONTRAST_HU: dict[tuple[str, str], tuple[float, float]] = {
    ("liver", "malignant"): (-25.0, -5.0), ("liver", "benign"): (5.0, 20.0),
    ("pancreas", "malignant"): (-25.0, -5.0), ("pancreas", "benign"): (5.0, 15.0),
    ("stomach", "malignant"): (-15.0, -5.0), ("stomach", "benign"): (5.0, 15.0),
    ("oesophagus", "malignant"): (-15.0, -5.0), ("colon", "malignant"): (-15.0, -5.0),
}
#: Absolute attenuation (HU) of cysts and of lung nodules: their contrast follows from it.
CYST_HU: tuple[float, float] = (0.0, 15.0)
NODULE_HU: tuple[float, float] = (0.0, 40.0)
#: Sites whose organ bulges around a lesion too large for it (tubes in this phantom).
_BULGING_SITES = frozenset({"pancreas", "oesophagus", "stomach", "colon"})
_HOLLOW_SITES = frozenset({"oesophagus", "stomach", "colon"})

#: Noise-free attenuation of each tissue at 120 kVp, (low, high) HU, before blur.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0), "fat": (-120.0, -80.0), "muscle": (45.0, 55.0), "skin": (25.0, 35.0),
    "lung": (-900.0, -800.0), "liver": (55.0, 65.0), "liver_steatotic": (15.0, 47.0),
    "spleen": (45.0, 50.0), "pancreas": (35.0, 45.0), "kidney": (30.0, 35.0), "blood": (40.0, 50.0),
    "hollow_wall": (38.0, 45.0), "stomach_fluid": (0.0, 15.0), "stool": (-30.0, 30.0),
    "cortical_bone": (400.0, 900.0), "trabecular_bone": (50.0, 280.0), "disc": (70.0, 90.0),
    "spinal_canal": (20.0, 30.0), "rib": (450.0, 600.0),
}

#: Liver attenuation classes (HU thresholds on the liver mean, Pickhardt 2012, Boyce 2010).
STEATOSIS_CLASSES: tuple[str, ...] = ("none", "mild", "moderate-severe")
#: L1 trabecular attenuation classes at 120 kVp (Pickhardt 2013): > 160, 110-160, < 110 HU.
BONE_DENSITY_CLASSES: tuple[str, ...] = ("normal", "osteopenic", "osteoporotic")
#: Field-of-view presets (``coverage``): which part of the trunk the scan covers.
COVERAGES: tuple[str, ...] = ("chest-abdomen", "chest", "abdomen")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "pacs-ai-node phantom"
#: Gaussian PSF sigma in-plane (mm) and in-plane noise correlation (mm).
PSF_SIGMA_MM = 0.6
NOISE_CORRELATION_MM = 0.7
#: Placement grid spacing (mm) used to put lesions inside their organ.
_PLACEMENT_SPACING_MM = 4.0
_HU_MIN, _HU_MAX = -1024, 3071
_UID_ROOT = "pacs-ai-node-phantom"


class PhantomError(PacsAiError, ValueError):
    """A phantom option, shape or lesion request that cannot be honoured; names the value."""


def steatosis_class(liver_hu: float) -> str:
    """``none`` (>= 48 HU), ``mild`` (40-48 HU) or ``moderate-severe`` (< 40 HU)."""
    if liver_hu >= 48.0:
        return "none"
    return "mild" if liver_hu >= 40.0 else "moderate-severe"


def bone_density_class(l1_trabecular_hu_120kvp: float) -> str:
    """``normal`` (> 160 HU), ``osteopenic`` (110-160 HU) or ``osteoporotic`` (< 110 HU)."""
    if l1_trabecular_hu_120kvp > 160.0:
        return "normal"
    return "osteopenic" if l1_trabecular_hu_120kvp >= 110.0 else "osteoporotic"


def kvp_bone_factor(kvp: float) -> float:
    """Scale of bone attenuation relative to 120 kVp (lower kVp, higher bone HU)."""
    return 1.0 + 0.005 * (120.0 - float(kvp))


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """An axial voxel grid in LPS: ``shape`` and ``spacing_mm`` in (z, y, x) order,
    ``origin_mm`` the LPS position (x, y, z) of the centre of voxel (0, 0, 0).

    Rows run along +y (column direction (0, 1, 0)), columns along +x (row
    direction (1, 0, 0)), and slice ``k`` lies at ``origin_z + k * spacing_z``.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        for name, value in (("shape", self.shape), ("spacing_mm", self.spacing_mm), ("origin_mm", self.origin_mm)):
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                raise PhantomError(f"Grid {name} must have 3 values, got {value!r}")
            if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
                raise PhantomError(f"Grid {name} must be numbers, got {value!r}")
        if not all(float(n).is_integer() and n >= 1 for n in self.shape):
            raise PhantomError(f"Grid shape must be positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        object.__setattr__(self, "origin_mm", tuple(float(v) for v in self.origin_mm))
        if any(not (s > 0) or not math.isfinite(s) for s in self.spacing_mm):
            raise PhantomError(f"Grid spacing_mm must be positive, got {self.spacing_mm!r}")
        if not all(math.isfinite(o) for o in self.origin_mm):
            raise PhantomError(f"Grid origin_mm must be finite, got {self.origin_mm!r}")

    @classmethod
    def chest_ct(
        cls,
        pixel_mm: float = 0.78,
        slice_mm: float = 1.0,
        rows: int = 512,
        *,
        phantom: Phantom | None = None,
        slices: int | None = None,
        z_top_mm: float | None = None,
    ) -> Grid:
        """A square ``rows`` x ``rows`` grid centred on the scanner isocentre (x = y = 0).

        Slices start at ``z_top_mm`` (default: the phantom's field-of-view top,
        else 330 mm) and go down by ``slice_mm``; ``slices`` defaults to the
        phantom's field of view (else 300).
        """
        if not isinstance(rows, int) or rows < 8:
            raise PhantomError(f"rows must be an integer >= 8, got {rows!r}")
        if not pixel_mm > 0 or not slice_mm > 0:
            raise PhantomError(f"pixel_mm and slice_mm must be positive, got {pixel_mm!r}, {slice_mm!r}")
        top = z_top_mm if z_top_mm is not None else (phantom.fov_top_mm if phantom is not None else 330.0)
        if slices is None:
            slices = int(math.floor((top - phantom.fov_bottom_mm) / slice_mm + 1e-6)) + 1 if phantom else 300
        if not isinstance(slices, int) or slices < 1:
            raise PhantomError(f"slices must be a positive integer, got {slices!r}")
        half = round((rows - 1) / 2.0 * pixel_mm, 6)
        return cls((slices, rows, rows), (slice_mm, pixel_mm, pixel_mm),
                   (-half, -half, round(top - (slices - 1) * slice_mm, 6)))

    @classmethod
    def coarse(cls, spacing: float = 3.0, phantom: Phantom | None = None) -> Grid:
        """An isotropic ``spacing`` grid covering the phantom's body in-plane and its
        field of view in z (without a phantom: x +-195, y -150..140, z -120..330 mm)."""
        if not spacing > 0:
            raise PhantomError(f"spacing must be positive, got {spacing!r}")
        if phantom is None:
            lo, hi = (-195.0, -150.0, -120.0), (195.0, 140.0, 330.0)
        else:
            (x0, y0), (x1, y1) = phantom.body_extent_xy()
            lo, hi = (x0 - 6.0, y0 - 6.0, phantom.fov_bottom_mm), (x1 + 6.0, y1 + 6.0, phantom.fov_top_mm)
        counts = [int(math.floor((h - l) / spacing + 1e-6)) + 1 for l, h in zip(lo, hi)]
        return cls((counts[2], counts[1], counts[0]), (spacing, spacing, spacing), tuple(round(v, 6) for v in lo))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel centre coordinates (mm) along z, y and x."""
        (nz, ny, nx), (sz, sy, sx), (ox, oy, oz) = self.shape, self.spacing_mm, self.origin_mm
        return oz + sz * np.arange(nz), oy + sy * np.arange(ny), ox + sx * np.arange(nx)

    def voxel_to_lps(self, index_zyx: Sequence[float]) -> np.ndarray:
        """LPS position (x, y, z) of a (k, row, column) index."""
        k, r, c = (float(v) for v in index_zyx)
        (sz, sy, sx), (ox, oy, oz) = self.spacing_mm, self.origin_mm
        return np.array([ox + c * sx, oy + r * sy, oz + k * sz])

    def lps_to_voxel(self, point_xyz: Sequence[float]) -> np.ndarray:
        """Fractional (k, row, column) index of an LPS position (x, y, z)."""
        x, y, z = (float(v) for v in point_xyz)
        (sz, sy, sx), (ox, oy, oz) = self.spacing_mm, self.origin_mm
        return np.array([(z - oz) / sz, (y - oy) / sy, (x - ox) / sx])

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "spacing_mm": list(self.spacing_mm), "origin_mm": list(self.origin_mm)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grid:
        return cls(tuple(data["shape"]), tuple(data["spacing_mm"]), tuple(data["origin_mm"]))


# --------------------------------------------------------------------------- shape primitives

Point = tuple[float, float, float]


def _tuples(value: Any) -> Any:
    """JSON lists back to (nested) tuples."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


@dataclass(frozen=True)
class Blob:
    """An ellipsoid: ``centre`` (LPS mm), ``semi_axes`` (mm) along its own axes, rotated by
    ``angles_deg`` about x, then y, then z; ``cuts`` are spheres (x, y, z, radius) whose
    inside is removed (a concave impression, e.g. of the stomach on the liver)."""

    centre: Point
    semi_axes: Point
    angles_deg: Point = (0.0, 0.0, 0.0)
    cuts: tuple[tuple[float, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.centre) != 3 or len(self.semi_axes) != 3 or len(self.angles_deg) != 3:
            raise PhantomError(f"Blob needs 3 values for centre, semi_axes and angles, got {self!r}")
        if min(self.semi_axes) <= 0:
            raise PhantomError(f"Blob semi_axes must be positive, got {self.semi_axes!r}")

    def rotation(self) -> np.ndarray:
        ax, ay, az = np.radians(self.angles_deg)
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def half_extent(self) -> np.ndarray:
        """Half size (x, y, z) of the axis-aligned box around the ellipsoid."""
        rot = self.rotation()
        return np.sqrt(((rot * np.asarray(self.semi_axes)[None, :]) ** 2).sum(axis=1))

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Whether points (broadcastable coordinate arrays, mm) are inside."""
        rot = self.rotation()
        dx, dy, dz = x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2])
        q = None
        for j in range(3):
            p = (dx * np.float32(rot[0, j]) + dy * np.float32(rot[1, j]) + dz * np.float32(rot[2, j]))
            term = (p / np.float32(self.semi_axes[j])) ** 2
            q = term if q is None else q + term
        mask = q <= 1.0
        for cx, cy, cz, radius in self.cuts:
            mask &= ((x - np.float32(cx)) ** 2 + (y - np.float32(cy)) ** 2 + (z - np.float32(cz)) ** 2
                     > np.float32(radius) ** 2)
        return mask

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Blob:
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class Tube:
    """A tube along a smooth (Catmull-Rom) curve through ``points`` (LPS mm), its radius
    interpolated from ``radii`` (one per point); rendered as a union of spheres."""

    points: tuple[Point, ...]
    radii: tuple[float, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.points) < 2 or any(len(p) != 3 for p in self.points):
            raise PhantomError(f"Tube {self.name!r} needs at least 2 points of 3 coordinates")
        if len(self.radii) != len(self.points) or min(self.radii) <= 0:
            raise PhantomError(f"Tube {self.name!r} needs one positive radius per point, got {self.radii!r}")

    def spheres(self, min_step: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sphere centres (N, 3), radii (N,) and curve parameters (N,; 0 = first point,
        len(points) - 1 = last) along the tube, spaced 0.3 x the local radius."""
        pts = np.asarray(self.points, dtype=float)
        dense, u = _catmull_rom(pts)
        radii = np.interp(u, np.arange(len(pts)), np.asarray(self.radii, dtype=float))
        seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        step = np.maximum(0.3 * radii, min_step)
        count = np.concatenate([[0.0], np.cumsum(seg / (0.5 * (step[1:] + step[:-1])))])
        n = max(int(math.ceil(count[-1])), 1)
        s = np.interp(np.linspace(0.0, count[-1], n + 1), count, arc)
        centres = np.stack([np.interp(s, arc, dense[:, i]) for i in range(3)], axis=1)
        return centres, np.interp(s, arc, radii), np.interp(s, arc, u)

    def point_at(self, u: float) -> np.ndarray:
        """Position on the curve at parameter ``u`` (0 .. len(points) - 1)."""
        dense, us = _catmull_rom(np.asarray(self.points, dtype=float))
        return np.array([np.interp(u, us, dense[:, i]) for i in range(3)])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tube:
        return cls(_tuples(data["points"]), _tuples(data["radii"]), data.get("name", ""))


def _catmull_rom(points: np.ndarray, per_segment: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A dense polyline through ``points`` and its curve parameter."""
    n = len(points)
    ext = np.vstack([2 * points[0] - points[1], points, 2 * points[-1] - points[-2]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    parts, params = [], []
    for i in range(n - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        parts.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                            + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
        params.append(i + t[:, 0])
    parts.append(points[-1:])
    params.append(np.array([n - 1.0]))
    return np.vstack(parts), np.concatenate(params)


@dataclass(frozen=True)
class Vertebra:
    """A vertebral body: an elliptic cylinder from ``z_bottom`` to ``z_top`` (mm) centred at
    ``centre_xy`` with semi-axes ``semi_axes_xy``; trabecular HU at 120 kVp."""

    level: str
    z_bottom: float
    z_top: float
    centre_xy: tuple[float, float]
    semi_axes_xy: tuple[float, float]
    trabecular_hu: float
    cortical_hu: float
    cortical_mm: float

    def __post_init__(self) -> None:
        if self.level not in LEVEL_INDEX:
            raise PhantomError(f"unknown vertebral level {self.level!r}; known: {', '.join(LEVEL_INDEX)}")
        if not self.z_top > self.z_bottom:
            raise PhantomError(f"vertebra {self.level}: z_top {self.z_top} must be above z_bottom {self.z_bottom}")

    @property
    def z_centre(self) -> float:
        return 0.5 * (self.z_bottom + self.z_top)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vertebra:
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class Lesion:
    """One planted finding. ``contrast_hu`` is against the organ's mean (the wall's for
    hollow organs); ``bulge_mm`` > 0 widens the organ around it to that radius."""

    number: int
    site: str
    type: str
    diameter_mm: float
    contrast_hu: float
    centre_mm: Point
    lobulation: float = 0.0
    heterogeneity_hu: float = 0.0
    bulge_mm: float = 0.0

    def __post_init__(self) -> None:
        if self.site not in LESION_TYPES:
            raise PhantomError(f"unknown lesion site {self.site!r}; known: {', '.join(LESION_TYPES)}")
        if self.type not in LESION_TYPES[self.site]:
            raise PhantomError(
                f"lesion type {self.type!r} is not one of {', '.join(LESION_TYPES[self.site])} for {self.site}")
        if not 1 <= self.number <= 255:
            raise PhantomError(f"lesion number must be 1..255, got {self.number!r}")
        if not 2.0 <= self.diameter_mm <= 60.0:
            raise PhantomError(f"lesion diameter_mm must be 2-60 mm, got {self.diameter_mm!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lesion:
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class Tissues:
    """Noise-free attenuation (HU at 120 kVp) of each tissue of one phantom."""

    fat: float
    visceral_fat: float
    muscle: float
    skin: float
    lung: float
    lung_gradient: float
    blood: float
    liver: float
    spleen: float
    pancreas: float
    kidney: float
    wall: float
    stomach_fluid: float
    stool: float
    bowel_fluid: float
    gallbladder: float
    disc: float
    canal: float
    posterior_bone: float
    rib: float
    marrow: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tissues:
        return cls(**data)


@dataclass(frozen=True)
class Diaphragm:
    """Two domes z = peak_z - depth * ((dx / spread_x)^2 + (dy / spread_y)^2), their
    upper envelope; ``spread_y`` is (anterior, posterior)."""

    right_peak: Point
    left_peak: Point
    spread_x: float
    spread_y: tuple[float, float]
    depth_mm: float
    thickness_mm: float

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = None
        for px, py, pz in (self.right_peak, self.left_peak):
            dy = y - np.float32(py)
            sy = np.where(dy < 0, np.float32(self.spread_y[0]), np.float32(self.spread_y[1]))
            h = np.float32(pz) - np.float32(self.depth_mm) * (((x - np.float32(px)) / np.float32(self.spread_x)) ** 2
                                                              + (dy / sy) ** 2)
            out = h if out is None else np.maximum(out, h)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Diaphragm:
        return cls(**{k: _tuples(v) for k, v in data.items()})


# --------------------------------------------------------------------------- the phantom

_BLOB_FIELDS = ("heart", "liver", "spleen")
_TUBE_FIELDS = ("stomach", "colon", "pancreas", "oesophagus", "aorta", "ivc", "svc", "trachea", "sternum")
_TUBE_TUPLE_FIELDS = ("ribs", "bronchi", "pulmonary_arteries", "lung_vessels", "small_bowel", "psoas")


@dataclass(frozen=True)
class Phantom:
    """Every parameter of one synthetic patient and acquisition (all in LPS mm / HU).

    Build one with :func:`sample_phantom`; ``to_json``/``from_json`` round-trip it.
    ``slice_thickness_mm`` None means "the grid's slice spacing".
    """

    seed: int
    sex: str
    age: int
    kvp: int
    noise_sigma_hu: float
    slice_thickness_mm: float | None
    coverage: str
    fov_bottom_mm: float
    fov_top_mm: float
    body_centre: tuple[float, float]
    body_profile: tuple[tuple[float, float, float], ...]
    back_flatten: float
    skin_mm: float
    fat_profile: tuple[tuple[float, float], ...]
    muscle_profile: tuple[tuple[float, float], ...]
    tissues: Tissues
    steatosis: str
    bone_density: str
    diaphragm: Diaphragm
    lung_apex_z: float
    mediastinum_profile: tuple[tuple[float, float], ...]
    vertebrae: tuple[Vertebra, ...]
    canal_radius_mm: float
    heart: Blob
    liver: Blob
    spleen: Blob
    kidneys: tuple[Blob, ...]
    gallbladder: Blob | None
    stomach: Tube
    stomach_gas_fraction: float
    colon: Tube
    colon_gas_fractions: tuple[float, ...]
    pancreas: Tube
    oesophagus: Tube
    oesophagus_lumen_mm: float
    aorta: Tube
    aorta_calcifications: tuple[tuple[float, float, float, float, float], ...]
    ivc: Tube
    svc: Tube
    trachea: Tube
    bronchi: tuple[Tube, ...]
    pulmonary_arteries: tuple[Tube, ...]
    lung_vessels: tuple[Tube, ...]
    small_bowel: tuple[Tube, ...]
    small_bowel_gas: tuple[float, ...]
    psoas: tuple[Tube, ...]
    sternum: Tube
    ribs: tuple[Tube, ...]
    lesions: tuple[Lesion, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise PhantomError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.coverage not in COVERAGES + ("custom",):
            raise PhantomError(f"coverage must be one of {', '.join(COVERAGES)}, got {self.coverage!r}")
        if not self.fov_top_mm - self.fov_bottom_mm >= 20.0:
            raise PhantomError(
                f"field of view top {self.fov_top_mm} mm must be at least 20 mm above bottom {self.fov_bottom_mm} mm")
        if not 70 <= self.kvp <= 150:
            raise PhantomError(f"kvp must be 70-150, got {self.kvp!r}")
        if not 0.0 <= self.noise_sigma_hu <= 200.0:
            raise PhantomError(f"noise_sigma_hu must be 0-200 HU, got {self.noise_sigma_hu!r}")
        if self.slice_thickness_mm is not None and not 0.1 <= self.slice_thickness_mm <= 20.0:
            raise PhantomError(f"slice_thickness_mm must be 0.1-20 mm or None, got {self.slice_thickness_mm!r}")
        if self.steatosis not in STEATOSIS_CLASSES:
            raise PhantomError(f"steatosis must be one of {', '.join(STEATOSIS_CLASSES)}, got {self.steatosis!r}")
        if self.bone_density not in BONE_DENSITY_CLASSES:
            raise PhantomError(
                f"bone_density must be one of {', '.join(BONE_DENSITY_CLASSES)}, got {self.bone_density!r}")
        if [v.level for v in self.vertebrae] != list(LEVELS.values()):
            raise PhantomError("vertebrae must be T1..T12, L1..L5 in order")
        numbers = [lesion.number for lesion in self.lesions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise PhantomError(f"lesions must be numbered 1..{len(numbers)} in order, got {numbers}")

    # ----------------------------------------------------------------- derived geometry

    def vertebra(self, level: str) -> Vertebra:
        return self.vertebrae[LEVEL_INDEX[level] - 1]

    def body_semi_axes(self, z: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        prof = np.asarray(self.body_profile, dtype=float)
        return np.interp(z, prof[:, 0], prof[:, 1]), np.interp(z, prof[:, 0], prof[:, 2])

    def fat_mm(self, z: np.ndarray | float) -> np.ndarray:
        prof = np.asarray(self.fat_profile, dtype=float)
        return np.interp(z, prof[:, 0], prof[:, 1])

    def body_extent_xy(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_min, y_min), (x_max, y_max)) of the body over its whole length."""
        prof = np.asarray(self.body_profile, dtype=float)
        a, b = prof[:, 1].max(), prof[:, 2].max()
        cx, cy = self.body_centre
        return (cx - a, cy - b), (cx + a, cy + self.back_flatten * b)

    def spine_at(self, z: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """Vertebral body centre x, y and semi-axes a, b interpolated along z."""
        zs = [v.z_centre for v in reversed(self.vertebrae)]
        cols = [[v.centre_xy[0] for v in reversed(self.vertebrae)], [v.centre_xy[1] for v in reversed(self.vertebrae)],
                [v.semi_axes_xy[0] for v in reversed(self.vertebrae)],
                [v.semi_axes_xy[1] for v in reversed(self.vertebrae)]]
        return tuple(np.interp(z, zs, c) for c in cols)

    def muscle_mm(self, z: np.ndarray | float) -> np.ndarray:
        """Thickness of the muscle layer of the body wall (thicker around the upper chest)."""
        prof = np.asarray(self.muscle_profile, dtype=float)
        return np.interp(z, prof[:, 0], prof[:, 1])

    def wall_mm(self, z: np.ndarray | float, anterior: np.ndarray | float) -> np.ndarray:
        """Depth of the inner surface of the body wall (skin + fat + muscle), mm;
        ``anterior`` is -1 (posterior) .. 1 (anterior)."""
        return self.skin_mm + self.fat_mm(z) * (1.0 + 0.3 * np.asarray(anterior)) + self.muscle_mm(z)

    # ----------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Phantom:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise PhantomError(f"unknown phantom parameter(s) {', '.join(map(repr, unknown))}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "tissues":
                values[name] = Tissues.from_dict(value)
            elif name == "diaphragm":
                values[name] = Diaphragm.from_dict(value)
            elif name in _BLOB_FIELDS:
                values[name] = Blob.from_dict(value)
            elif name == "gallbladder":
                values[name] = None if value is None else Blob.from_dict(value)
            elif name == "kidneys":
                values[name] = tuple(Blob.from_dict(v) for v in value)
            elif name in _TUBE_FIELDS:
                values[name] = Tube.from_dict(value)
            elif name in _TUBE_TUPLE_FIELDS:
                values[name] = tuple(Tube.from_dict(v) for v in value)
            elif name == "vertebrae":
                values[name] = tuple(Vertebra.from_dict(v) for v in value)
            elif name == "lesions":
                values[name] = tuple(Lesion.from_dict(v) for v in value)
            else:
                values[name] = _tuples(value)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Phantom:
        return cls.from_dict(json.loads(text))


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


# --------------------------------------------------------------------------- sampling


def _r(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


def _pt(*xyz: float) -> Point:
    return tuple(_r(v) for v in xyz)  # type: ignore[return-value]


def sample_phantom(
    seed: int,
    *,
    lesion_probability: float | Mapping[str, float] = 0.2,
    lesions: Sequence[Mapping[str, Any]] = (),
    lung_nodules: int | None = None,
    steatosis: str | None = None,
    liver_hu: float | None = None,
    bone_density: str | None = None,
    trabecular_hu: float | None = None,
    noise_sigma: float | None = None,
    slice_thickness_mm: float | None = None,
    kvp: int | None = None,
    coverage: str | None = None,
    fov_top_mm: float | None = None,
    fov_bottom_mm: float | None = None,
    calcification: bool | None = None,
) -> Phantom:
    """A random but plausible phantom; the same ``seed`` and options give the same phantom.

    ``lesion_probability``: chance that each cancer site gets a random lesion (one
    number, or {site: p}). ``lesions``: forced lesions, each {"site", optional
    "type", "diameter_mm", "contrast_hu" (or "hu")}; sites: :data:`LESION_TYPES`.
    ``lung_nodules``: number of random nodules (None: 0 half the time, else 1-3).
    ``steatosis``/``liver_hu`` and ``bone_density``/``trabecular_hu`` (L1, 120 kVp)
    fix the liver and bone; ``noise_sigma`` (HU, 0 = noise-free),
    ``slice_thickness_mm`` (None: the grid's spacing) and ``kvp`` the acquisition;
    ``coverage`` (:data:`COVERAGES`) or ``fov_top_mm``/``fov_bottom_mm`` the field
    of view in z; ``calcification`` whether the aorta has calcified plaques.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    probabilities = _lesion_probabilities(lesion_probability)
    requests = [_lesion_request(spec, i) for i, spec in enumerate(lesions)]
    if lung_nodules is not None and (not isinstance(lung_nodules, int) or not 0 <= lung_nodules <= 20):
        raise PhantomError(f"lung_nodules must be an integer 0-20, got {lung_nodules!r}")
    if steatosis is not None and steatosis not in STEATOSIS_CLASSES:
        raise PhantomError(f"steatosis must be one of {', '.join(STEATOSIS_CLASSES)}, got {steatosis!r}")
    if bone_density is not None and bone_density not in BONE_DENSITY_CLASSES:
        raise PhantomError(f"bone_density must be one of {', '.join(BONE_DENSITY_CLASSES)}, got {bone_density!r}")
    if liver_hu is not None and not -20.0 <= liver_hu <= 90.0:
        raise PhantomError(f"liver_hu must be -20..90 HU, got {liver_hu!r}")
    if trabecular_hu is not None and not 0.0 <= trabecular_hu <= 400.0:
        raise PhantomError(f"trabecular_hu must be 0..400 HU, got {trabecular_hu!r}")
    if coverage is not None and coverage not in COVERAGES:
        raise PhantomError(f"coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")
    if kvp is not None and kvp not in (80, 100, 120, 140):
        raise PhantomError(f"kvp must be 80, 100, 120 or 140, got {kvp!r}")
    if noise_sigma is not None and not 0.0 <= noise_sigma <= 200.0:
        raise PhantomError(f"noise_sigma must be 0-200 HU, got {noise_sigma!r}")

    anat_rng, acq_rng, find_rng, place_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    fields = _sample_anatomy(anat_rng, seed, steatosis, liver_hu, bone_density, trabecular_hu, calcification)
    fields.update(_sample_acquisition(acq_rng, fields, noise_sigma, slice_thickness_mm, kvp, coverage,
                                      fov_top_mm, fov_bottom_mm))
    anatomy = Phantom(**fields)
    requests += _random_lesion_requests(find_rng, probabilities, lung_nodules)
    placed = _place_lesions(anatomy, requests, place_rng)
    return dataclasses.replace(anatomy, lesions=placed)


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


def _lesion_request(spec: Mapping[str, Any], index: int) -> dict[str, Any]:
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
    return {"site": site, "type": kind, "diameter_mm": diameter, "contrast_hu": spec.get("contrast_hu"),
            "hu": spec.get("hu"), "forced": True}


def _random_lesion_requests(rng: np.random.Generator, probabilities: Mapping[str, float],
                            lung_nodules: int | None) -> list[dict[str, Any]]:
    requests = []
    for site in CANCER_SITES:
        draw, type_draw = rng.random(), rng.random()
        if draw < probabilities[site]:
            weights = np.cumsum(LESION_TYPE_WEIGHTS[site])
            kind = LESION_TYPES[site][int(np.searchsorted(weights / weights[-1], type_draw))]
            requests.append({"site": site, "type": kind, "diameter_mm": None, "contrast_hu": None, "hu": None,
                             "forced": False})
    count = (0 if rng.random() < 0.5 else int(rng.integers(1, 4))) if lung_nodules is None else lung_nodules
    requests += [{"site": "lung", "type": "nodule", "diameter_mm": None, "contrast_hu": None, "hu": None,
                  "forced": False} for _ in range(count)]
    return requests


def _sample_anatomy(rng: np.random.Generator, seed: int, steatosis: str | None, liver_hu: float | None,
                    bone_density: str | None, trabecular_hu: float | None,
                    calcification: bool | None) -> dict[str, Any]:
    """Anatomy and tissue parameters (everything but acquisition and lesions)."""
    u = rng.uniform
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(rng.integers(35, 86))
    habitus = u(0.0, 1.0)
    scale = u(0.9, 1.0) + (0.04 if sex == "M" else 0.0)       # skeleton and organ size
    a_t = float(np.clip(140 + 45 * habitus + rng.normal(0, 4), 140, 190))
    b_t = float(np.clip(100 + 30 * habitus + rng.normal(0, 4), 100, 140))
    a_a = float(np.clip(a_t * u(0.93, 1.04), 140, 190))
    b_a = float(np.clip(b_t * u(0.98, 1.12), 100, 145))
    cx, cy = (float(np.clip(rng.normal(0, 4), -10, 10)) for _ in range(2))
    flatten = u(0.82, 0.9)
    skin, muscle = u(1.5, 2.5), u(9.0, 13.0)
    fat_t = 6 + 18 * habitus + u(0, 5)
    fat_a = fat_t * u(1.1, 1.5)

    # ---- spine: z = 0 at the middle of the T12/L1 disc; heights grow caudally
    heights = [scale * (14 + 8 * i / 11) + u(-0.8, 0.8) for i in range(12)] + \
              [scale * (24 + 3 * i / 4) + u(-1, 1) for i in range(5)]
    discs = [u(6.0, 7.0) for _ in range(12)] + [u(8.0, 10.0) for _ in range(5)]  # disc below each level
    z_bottoms, z_tops = [0.0] * 17, [0.0] * 17
    z = discs[11] / 2                                   # upward from T12
    for i in range(11, -1, -1):
        z_bottoms[i], z_tops[i] = z, z + heights[i]
        z = z_tops[i] + discs[i - 1] if i > 0 else z_tops[i]
    z = -discs[11] / 2                                  # downward from L1
    for i in range(12, 17):
        z_tops[i], z_bottoms[i] = z, z - heights[i]
        z = z_bottoms[i] - discs[i]
    apex = z_tops[0] + u(8, 25)
    z_r = u(0.5, 1.0) * z_tops[9] + u(-8, 12)           # right dome near T9-T10
    z_l = z_r - u(6, 20)
    profile = ((z_bottoms[16] - 60, a_a, b_a), (z_r - 40, a_a, b_a), (z_r + 10, a_t, b_t),
               (apex + 10, a_t, b_t), (apex + 50, 0.78 * a_t, 0.85 * b_t), (apex + 90, 0.55 * a_t, 0.7 * b_t))
    fat_profile = ((z_bottoms[16] - 60, fat_a), (z_r - 40, fat_a), (z_r + 10, fat_t), (apex + 90, fat_t))
    shoulder = u(22, 38)          # pectoral and shoulder-girdle muscle narrow the upper thorax
    muscle_profile = ((z_bottoms[16] - 60, muscle), (0.5 * (z_tops[4] + z_tops[5]), muscle),
                      (z_tops[0], muscle + 0.8 * shoulder), (apex + 90, muscle + shoulder))

    def b_at(zz: float) -> float:
        return float(np.interp(zz, [p[0] for p in profile], [p[2] for p in profile]))

    def a_at(zz: float) -> float:
        return float(np.interp(zz, [p[0] for p in profile], [p[1] for p in profile]))

    def fat_at(zz: float) -> float:
        return float(np.interp(zz, [p[0] for p in fat_profile], [p[1] for p in fat_profile]))

    def muscle_at(zz: float) -> float:
        return float(np.interp(zz, [p[0] for p in muscle_profile], [p[1] for p in muscle_profile]))

    # ---- tissues
    # every value is drawn whatever the options, so that options never shift later draws
    liver_class = STEATOSIS_CLASSES[int(np.searchsorted([0.6, 0.8], rng.random()))]
    livers = {"none": u(55, 65), "mild": u(40.5, 47.5), "moderate-severe": u(15, 38)}
    liver = float(liver_hu) if liver_hu is not None else livers[steatosis or liver_class]
    steatosis_found = steatosis_class(liver)
    bone_class = BONE_DENSITY_CLASSES[int(np.searchsorted([0.5, 0.8], rng.random()))]
    l1s = {"normal": u(170, 260), "osteopenic": u(115, 155), "osteoporotic": u(55, 105)}
    l1 = float(trabecular_hu) if trabecular_hu is not None else l1s[bone_density or bone_class]
    density = bone_density_class(l1)
    fat = u(-110, -90)
    tissues = Tissues(
        fat=_r(fat), visceral_fat=_r(fat + u(0, 8)), muscle=_r(u(47, 53)), skin=_r(u(27, 33)),
        lung=_r(u(-865, -835)), lung_gradient=_r(u(20, 40)), blood=_r(u(41, 49)), liver=_r(liver),
        spleen=_r(u(45.5, 49.5)), pancreas=_r(u(37, 43)), kidney=_r(u(30.5, 34.5)), wall=_r(u(39, 44)),
        stomach_fluid=_r(u(2, 13)), stool=_r(u(-25, 25)), bowel_fluid=_r(u(5, 25)), gallbladder=_r(u(0, 15)),
        disc=_r(u(74, 86)), canal=_r(u(21, 29)), posterior_bone=_r(u(300, 420)), rib=_r(u(460, 590)),
        marrow=_r(u(120, 220)),
    )
    cortical = u(560, 850) - {"normal": 0, "osteopenic": 60, "osteoporotic": 120}[density]

    # ---- vertebral bodies
    vertebrae = []
    for i, level in enumerate(LEVELS.values()):
        zc = 0.5 * (z_bottoms[i] + z_tops[i])
        if i < 12:
            va, vb = scale * (15 + 7 * i / 11), scale * (11 + 5 * i / 11)
            depth = scale * (56 + 6 * i / 11)
        else:
            va, vb = scale * (23 + 3 * (i - 12) / 4), scale * (17 + 2 * (i - 12) / 4)
            depth = scale * (64 + 10 * min(i - 12, 2) / 2)
        y_back = cy + flatten * b_at(zc)
        trab = l1 + 2.5 * (12 - i) + rng.normal(0, 3) if i != 12 else l1
        vertebrae.append(Vertebra(
            level=level, z_bottom=_r(z_bottoms[i]), z_top=_r(z_tops[i]),
            centre_xy=(_r(cx + rng.normal(0, 1.0)), _r(y_back - depth)), semi_axes_xy=(_r(va), _r(vb)),
            trabecular_hu=_r(max(trab, 20.0)), cortical_hu=_r(cortical + u(-20, 20)), cortical_mm=_r(u(1.3, 2.0))))
    vert = {v.level: v for v in vertebrae}

    def spine(zz: float) -> tuple[float, float, float, float]:
        zs = [v.z_centre for v in reversed(vertebrae)]
        return tuple(float(np.interp(zz, zs, [getattr(v, attr)[k] for v in reversed(vertebrae)]))
                     for attr, k in (("centre_xy", 0), ("centre_xy", 1), ("semi_axes_xy", 0), ("semi_axes_xy", 1)))

    def cavity(zz: float) -> tuple[float, float, float, float]:
        """Cavity (inside the body wall) LR and AP semi-axes, its front y and the back y."""
        wall = skin + fat_at(zz) + muscle_at(zz)
        a, b = a_at(zz), b_at(zz)
        return a - wall, b - wall, cy - b + skin + 1.3 * fat_at(zz) + muscle_at(zz), cy + flatten * b

    # ---- diaphragm, mediastinum, heart
    a_ct, b_ct, front_t, _ = cavity(z_r)
    diaphragm = Diaphragm(
        right_peak=_pt(cx - 0.42 * a_ct, cy + 0.05 * b_ct, z_r), left_peak=_pt(cx + 0.45 * a_ct, cy + 0.05 * b_ct, z_l),
        spread_x=_r(0.55 * a_ct), spread_y=(_r(1.3 * b_ct), _r(0.85 * b_ct)), depth_mm=_r(u(35, 50)),
        thickness_mm=_r(u(3.5, 5.0)))
    z_arch = vert["T4"].z_top + u(-5, 8)
    z_carina = vert["T5"].z_centre + u(-5, 5)
    mediastinum = ((z_r - 40, 24.0), (z_arch - 40, _r(u(30, 36))), (z_arch, _r(u(34, 40))),
                   (apex - 10, _r(u(20, 26))), (apex + 90, 20.0))
    vx_h, vy_h, va_h, vb_h = spine(z_r + 40)
    heart_front = cavity(z_r + 40)[2]
    heart_axes = (scale * u(64, 74), scale * u(48, 56), scale * u(52, 60))
    heart = Blob(centre=_pt(cx + u(12, 22), heart_front + 0.5 * (vy_h - vb_h - heart_front) - 2,
                            0.5 * (z_r + z_l) - 8 + 0.8 * heart_axes[2]),
                 semi_axes=_pt(*heart_axes), angles_deg=(0.0, _r(u(-15, -5)), _r(u(-40, -25))))

    # ---- great vessels and airways
    ra_asc, ra_desc, ra_abd = scale * u(14, 17), scale * u(11.5, 13.5), scale * u(9.5, 11.5)
    x_a, y_a, z_a = heart.centre
    aorta_points = [(x_a - 5, y_a - 8, z_a + 15), (cx - 6, front_t + 0.35 * (vy_h - front_t), z_arch - 25)]
    vxa, vya, vaa, vba = spine(z_arch)
    aorta_points += [(cx + 2, vya - vba - 35, z_arch + ra_asc * 0.4),
                     (vxa + vaa * 0.55 + ra_desc * 0.75, vya - vba - ra_desc * 0.3, z_arch - 18)]
    radii = [ra_asc, ra_asc, ra_asc * 0.9, ra_desc]
    for level, shift in (("T6", 0.55), ("T9", 0.4), ("T12", 0.15), ("L2", 0.05), ("L4", 0.0)):
        v = vert[level]
        r_ = ra_desc if level[0] == "T" else ra_abd
        px = v.centre_xy[0] + shift * v.semi_axes_xy[0] + (r_ * 0.75 if level[0] == "T" else 4)
        py = v.centre_xy[1] - v.semi_axes_xy[1] - r_ * (0.3 + 0.7 * (1 - shift / 0.55)) - 3
        aorta_points.append((px, py, v.z_centre))
        radii.append(r_)
    aorta = Tube(tuple(_pt(*p) for p in aorta_points), tuple(_r(r) for r in radii), "aorta")
    y_aorta_abd = aorta_points[-2][1]

    oe_r = scale * u(8.0, 10.0)
    oes_points = []
    for zz, dx, dy in ((apex + 60, 2, 0), (z_arch, 4, 0), (vert["T7"].z_centre, 6, 4),
                       (vert["T10"].z_centre, 14, 14), (z_l - 8, 28, 30)):
        vx_, vy_, va_, vb_ = spine(zz)
        oes_points.append((cx + dx, vy_ - vb_ - oe_r - 3 - dy, zz))
    trachea_r = scale * u(8.0, 10.0)
    vx_c, vy_c, va_c, vb_c = spine(z_carina)
    y_tr = vy_c - vb_c - 2 * oe_r - 6 - trachea_r
    carina = (cx, y_tr + 4, z_carina)
    trachea = Tube((_pt(cx, y_tr - 8, apex + 70), _pt(cx, y_tr - 2, z_arch + 10), _pt(*carina)),
                   (_r(trachea_r),) * 3, "trachea")
    hilum_r = (cx - 0.38 * a_ct, y_tr + 18, z_carina - 22)
    hilum_l = (cx + 0.40 * a_ct, y_tr + 22, z_carina - 12)
    bronchi = (Tube((_pt(*carina), _pt(*hilum_r)), (_r(0.7 * trachea_r),) * 2, "right main bronchus"),
               Tube((_pt(*carina), _pt(*hilum_l)), (_r(0.65 * trachea_r),) * 2, "left main bronchus"))
    pa_root = (cx + 8, heart.centre[1] - 10, heart.centre[2] + 0.6 * heart_axes[2])
    pa_top = (cx + 6, y_tr + 5, z_carina - 18)
    pulmonary_arteries = (
        Tube((_pt(*pa_root), _pt(*pa_top)), (_r(scale * 13),) * 2, "pulmonary trunk"),
        Tube((_pt(*pa_top), _pt(hilum_r[0] + 10, hilum_r[1] + 4, hilum_r[2] - 6)), (_r(scale * 10),) * 2, "right PA"),
        Tube((_pt(*pa_top), _pt(hilum_l[0] - 10, hilum_l[1] + 4, hilum_l[2] + 4)), (_r(scale * 10),) * 2, "left PA"),
    )
    svc = Tube((_pt(cx - 28, front_t + 25, apex + 40), _pt(cx - 25, front_t + 35, z_arch),
                _pt(cx - 22, heart.centre[1], heart.centre[2] + 20)), (_r(scale * 9),) * 3, "svc")
    lung_vessels = []
    for side, hilum in ((-1, hilum_r), (1, hilum_l)):
        for _ in range(int(rng.integers(6, 10))):
            zz = hilum[2] + u(-130, 100)
            a_c, b_c, front, back = cavity(zz)
            tx = cx + side * u(0.35, 0.8) * a_c
            ty = cy + u(-0.65, 0.65) * b_c
            mid = (0.5 * (hilum[0] + tx) + u(-10, 10), 0.5 * (hilum[1] + ty) + u(-10, 10), 0.5 * (hilum[2] + zz))
            r0 = u(2.5, 4.5)
            lung_vessels.append(Tube((_pt(*hilum), _pt(*mid), _pt(tx, ty, zz)), (_r(r0), _r(r0 * 0.6), 1.0),
                                     "lung vessel"))

    # ---- abdominal organs
    a_ca, b_ca, front_a, back_a = cavity(vert["L1"].z_centre)
    liver_axes = (scale * u(85, 100), 0.8 * b_ca + u(-5, 5), scale * u(75, 90))
    liver_c = (cx - 0.32 * a_ca, cy - 0.05 * b_ca, z_r - 0.75 * liver_axes[2])
    impression = (cx + 0.5 * a_ca, cy + 0.35 * b_ca, z_l - 45, 0.5 * a_ca + u(5, 15))
    liver = Blob(centre=_pt(*liver_c), semi_axes=_pt(*liver_axes), angles_deg=(0.0, _r(u(8, 18)), _r(u(-8, 8))),
                 cuts=(_pt(*impression[:3]) + (_r(impression[3]),),))
    gallbladder = None
    if rng.random() < 0.8:
        gb_axes = (u(12, 18), u(14, 20), u(30, 40))
        gallbladder = Blob(centre=_pt(liver_c[0] + 0.35 * liver_axes[0], liver_c[1] - 0.45 * liver_axes[1],
                                      liver_c[2] - 0.55 * liver_axes[2]),
                           semi_axes=_pt(*gb_axes), angles_deg=(_r(u(20, 35)), 0.0, 0.0))
    spleen_axes = (scale * u(17, 24), scale * u(35, 48), scale * u(42, 55))
    spleen = Blob(centre=_pt(cx + 0.62 * a_ca, cy + 0.38 * b_ca, z_l - 0.9 * spleen_axes[2] - 8),
                  semi_axes=_pt(*spleen_axes), angles_deg=(_r(u(-10, 10)), 0.0, _r(u(35, 55))))
    kidneys = []
    for side, dz in ((-1, -u(8, 16)), (1, u(0, 8))):
        v = vert["L1"]
        k_axes = (scale * u(23, 27), scale * u(20, 24), scale * u(50, 58))
        kidneys.append(Blob(centre=_pt(v.centre_xy[0] + side * (v.semi_axes_xy[0] + 33), v.centre_xy[1] + u(6, 14),
                                       v.z_centre + dz),
                            semi_axes=_pt(*k_axes), angles_deg=(_r(u(-10, -4)), _r(-side * u(8, 15)),
                                                                _r(side * u(20, 35)))))
    z_st = z_l - 12
    st_r = scale * u(26, 34)
    stomach = Tube((_pt(*oes_points[-1][:2], z_st + 2),
                    _pt(cx + 0.42 * a_ca, cy - 0.05 * b_ca, z_st - 0.6 * st_r),
                    _pt(cx + 0.45 * a_ca, cy - 0.45 * b_ca, z_st - 60),
                    _pt(cx + 0.25 * a_ca, front_a + 0.9 * st_r * 0.7 + 6, z_st - 95),
                    _pt(cx - 0.02 * a_ca, front_a + 0.6 * st_r + 6, z_st - 100),
                    _pt(cx - 0.22 * a_ca, front_a + 0.5 * st_r + 14, z_st - 92)),
                   (_r(oe_r), _r(st_r), _r(st_r * 0.95), _r(st_r * 0.75), _r(st_r * 0.6), _r(st_r * 0.4)), "stomach")
    oes_points[-1] = (oes_points[-1][0], oes_points[-1][1], z_st + 4)
    oesophagus = Tube(tuple(_pt(*p) for p in oes_points), (_r(oe_r),) * len(oes_points), "oesophagus")

    zc = {name: v.z_centre for name, v in vert.items()}
    col_r = scale * u(22, 27)
    colon = Tube((
        _pt(cx - 0.55 * a_ca, cy - 0.05 * b_ca, vert["L5"].z_bottom - 15),
        _pt(cx - 0.62 * a_ca, cy + 0.12 * b_ca, zc["L3"]),
        _pt(cx - 0.58 * a_ca, cy - 0.05 * b_ca, zc["L2"] + 5),
        _pt(cx - 0.25 * a_ca, front_a + col_r + 6, zc["L3"] + u(-10, 10)),
        _pt(cx + 0.25 * a_ca, front_a + col_r + 6, zc["L3"] + u(-5, 15)),
        _pt(cx + 0.62 * a_ca, cy - 0.02 * b_ca, zc["L1"] - 8),
        _pt(cx + 0.68 * a_ca, cy + 0.18 * b_ca, zc["L3"]),
        _pt(cx + 0.62 * a_ca, cy + 0.08 * b_ca, vert["L5"].z_bottom - 15)),
        tuple(_r(col_r * f) for f in (1.1, 1.0, 0.95, 0.9, 0.9, 0.85, 0.75, 0.7)), "colon")
    colon_gas = tuple(_r(u(0.0, 0.45)) for _ in range(8))

    p_r = scale * u(9, 12)
    l1, l2, t12 = vert["L1"], vert["L2"], vert["T12"]
    y_front_aorta = y_aorta_abd - ra_abd
    pancreas = Tube((
        _pt(l2.centre_xy[0] - 32, y_front_aorta - 6, l2.z_top + 2),
        _pt(l1.centre_xy[0] - 8, y_front_aorta - 9 - p_r, l1.z_centre - 6),
        _pt(l1.centre_xy[0] + 30, y_front_aorta - 6 - p_r, l1.z_centre + 2),
        _pt(cx + 0.45 * a_ca, cy + 0.22 * b_ca, t12.z_centre)),
        (_r(p_r * 1.5), _r(p_r), _r(p_r * 1.05), _r(p_r * 0.95)), "pancreas")

    ivc_r = scale * u(10, 12)
    ivc_points = []
    for level in ("L4", "L2", "T12"):
        v = vert[level]
        ivc_points.append((v.centre_xy[0] - v.semi_axes_xy[0] * 0.55 - ivc_r,
                           v.centre_xy[1] - v.semi_axes_xy[1] - ivc_r - 2, v.z_centre))
    ivc_points.append((cx - 0.12 * a_ca, heart.centre[1] + 10, z_r - 5))
    ivc_points.append((cx - 15, heart.centre[1] + 5, z_r + 15))
    ivc = Tube(tuple(_pt(*p) for p in ivc_points), (_r(ivc_r),) * 5, "ivc")

    small_bowel, small_bowel_gas = [], []
    for _ in range(int(rng.integers(6, 11))):
        p = np.array([cx + u(-0.35, 0.4) * a_ca, cy + u(-0.55, 0.05) * b_ca, u(vert["L5"].z_bottom - 20, zc["L2"])])
        pts = [p]
        for _ in range(3):
            p = p + rng.normal(0, 1, 3) * np.array([25.0, 12.0, 20.0])
            pts.append(p)
        small_bowel.append(Tube(tuple(_pt(*q) for q in pts), (_r(u(9, 13)),) * 4, "small bowel"))
        small_bowel_gas.append(_r(u(0, 0.3) if rng.random() < 0.3 else 0.0))

    psoas = []
    for side in (-1, 1):
        pts, rr = [], []
        for level, r_ in (("T12", 5), ("L1", 9), ("L2", 13), ("L3", 17), ("L4", 20), ("L5", 22)):
            v = vert[level]
            pts.append(_pt(v.centre_xy[0] + side * (v.semi_axes_xy[0] + r_ * 0.8 + 2), v.centre_xy[1] + 4, v.z_centre))
            rr.append(_r(scale * r_))
        psoas.append(Tube(tuple(pts), tuple(rr), "psoas"))

    sternum_pts = []
    for level in ("T2", "T5", "T9"):
        zz = vert[level].z_centre if level != "T2" else vert["T2"].z_top
        sternum_pts.append(_pt(cx, cy - b_at(zz) + skin + 1.3 * fat_at(zz) + 0.5 * muscle_at(zz) + 2, zz - 10))
    sternum = Tube(tuple(sternum_pts), (_r(7.0),) * 3, "sternum")

    # ---- ribs: from each thoracic body at mid-height, around the chest wall
    rib_r = scale * u(4.0, 4.6)
    ends = {1: 125, 2: 150, 3: 155, 4: 158, 5: 158, 6: 155, 7: 150, 8: 140, 9: 130, 10: 120, 11: 95, 12: 70}
    # anterior drop (mm) at 160 degrees; neighbours differ little so that ribs never touch
    drops = {1: 30, 2: 36, 3: 44, 4: 52, 5: 58, 6: 62, 7: 65, 8: 65, 9: 62, 10: 56, 11: 46, 12: 36}
    drop_scale = scale * u(0.9, 1.1)
    ribs = []
    for i in range(1, 13):
        v = vertebrae[i - 1]
        z0 = v.z_centre
        vx, vy = v.centre_xy
        va, vb = v.semi_axes_xy
        phi_end = math.radians(ends[i] + u(-5, 5))
        drop = drops[i] * drop_scale + u(-2, 2)
        for side in (-1, 1):
            psi = math.radians(60)
            head = (vx + side * (va * math.sin(psi) + 0.6 * rib_r), vy + vb * math.cos(psi) + 0.6 * rib_r, z0)
            pts = [head]
            phi0 = math.radians(28)
            for phi in np.linspace(phi0, phi_end, max(4, int(math.degrees(phi_end - phi0) / 10) + 1)):
                frac = (phi - phi0) / (math.radians(160) - phi0)
                zz = z0 - drop * frac ** 1.15
                a, b = a_at(zz), b_at(zz)
                ant = -math.cos(phi)
                depth = skin + fat_at(zz) * (1 + 0.3 * ant) + muscle_at(zz) - rib_r - 0.8
                sx, sy = math.sin(phi), math.cos(phi)
                ell = 1.0 / math.sqrt((sx / a) ** 2 + (sy / b) ** 2) - depth
                if sy > 1e-6:
                    ell = min(ell, (flatten * b - depth) / sy)
                pts.append((cx + side * ell * sx, cy + ell * sy, zz))
            ribs.append(Tube(tuple(_pt(*p) for p in pts), (_r(rib_r),) * len(pts),
                             f"rib {v.level} {'left' if side > 0 else 'right'}"))

    calcifications = []
    calcification_draw = rng.random()
    has_calcification = calcification_draw < min(0.9, (age - 30) / 60) if calcification is None else calcification
    centres, aradii, _ = aorta.spheres()
    for _ in range(int(rng.integers(3, 12))):
        i = int(rng.integers(0, len(centres)))
        direction = rng.normal(0, 1, 3)
        direction[2] *= 0.3
        direction /= np.linalg.norm(direction)
        p = centres[i] + direction * (aradii[i] - 1.0)
        if has_calcification:
            calcifications.append((_r(p[0]), _r(p[1]), _r(p[2]), _r(u(1.0, 2.5)), _r(u(300, 800))))

    return dict(
        seed=seed, sex=sex, age=age, body_centre=(_r(cx), _r(cy)),
        body_profile=tuple((_r(z_), _r(a_), _r(b_)) for z_, a_, b_ in profile), back_flatten=_r(flatten, 3),
        skin_mm=_r(skin), fat_profile=tuple((_r(z_), _r(f_)) for z_, f_ in fat_profile),
        muscle_profile=tuple((_r(z_), _r(m_)) for z_, m_ in muscle_profile),
        tissues=tissues, steatosis=steatosis_found, bone_density=density, diaphragm=diaphragm,
        lung_apex_z=_r(apex), mediastinum_profile=tuple((_r(z_), _r(w_)) for z_, w_ in mediastinum),
        vertebrae=tuple(vertebrae), canal_radius_mm=_r(scale * u(7.0, 8.5)), heart=heart, liver=liver, spleen=spleen,
        kidneys=tuple(kidneys), gallbladder=gallbladder, stomach=stomach, stomach_gas_fraction=_r(u(0.1, 0.45)),
        colon=colon, colon_gas_fractions=colon_gas, pancreas=pancreas, oesophagus=oesophagus,
        oesophagus_lumen_mm=_r(u(0, 3.0) if rng.random() < 0.6 else 0.0), aorta=aorta,
        aorta_calcifications=tuple(calcifications), ivc=ivc, svc=svc, trachea=trachea, bronchi=bronchi,
        pulmonary_arteries=pulmonary_arteries, lung_vessels=tuple(lung_vessels), small_bowel=tuple(small_bowel),
        small_bowel_gas=tuple(small_bowel_gas), psoas=tuple(psoas), sternum=sternum, ribs=tuple(ribs),
    )


def _sample_acquisition(rng: np.random.Generator, anatomy: Mapping[str, Any], noise_sigma: float | None,
                        slice_thickness_mm: float | None, kvp: int | None, coverage: str | None,
                        fov_top_mm: float | None, fov_bottom_mm: float | None) -> dict[str, Any]:
    u = rng.uniform
    kvp_drawn = (120, 100, 140)[int(np.searchsorted([0.7, 0.9], rng.random()))]
    kvp = kvp if kvp is not None else kvp_drawn
    sigma_drawn = float(np.clip(u(8, 20) * {100: 1.2, 140: 0.85}.get(kvp, 1.0), 5, 25))
    sigma = float(noise_sigma) if noise_sigma is not None else sigma_drawn
    coverage_drawn = COVERAGES[int(np.searchsorted([0.5, 0.85], rng.random()))]
    vert = {v.level: v for v in anatomy["vertebrae"]}
    apex = anatomy["lung_apex_z"]
    z_r = anatomy["diaphragm"].right_peak[2]
    draws = {"top_chest": apex + u(5, 20), "top_abdomen": z_r + u(20, 60),
             "bottom_ca": u(vert["L3"].z_bottom, vert["L2"].z_centre),
             "bottom_chest": u(vert["L2"].z_top, vert["T12"].z_centre),
             "bottom_abdomen": vert["L5"].z_bottom - u(0, 20)}
    if fov_top_mm is not None or fov_bottom_mm is not None:
        chosen = coverage or "custom"
    else:
        chosen = coverage or coverage_drawn
    preset = chosen if chosen != "custom" else coverage_drawn
    top = draws["top_abdomen"] if preset == "abdomen" else draws["top_chest"]
    bottom = {"chest-abdomen": draws["bottom_ca"], "chest": draws["bottom_chest"],
              "abdomen": draws["bottom_abdomen"]}[preset]
    top = float(fov_top_mm) if fov_top_mm is not None else top
    bottom = float(fov_bottom_mm) if fov_bottom_mm is not None else bottom
    if not top - bottom >= 20.0:
        raise PhantomError(f"field of view top {top:.1f} mm must be at least 20 mm above bottom {bottom:.1f} mm")
    if slice_thickness_mm is not None and not 0.1 <= slice_thickness_mm <= 20.0:
        raise PhantomError(f"slice_thickness_mm must be 0.1-20 mm, got {slice_thickness_mm!r}")
    return dict(kvp=int(kvp), noise_sigma_hu=_r(sigma), coverage=chosen, fov_top_mm=_r(top), fov_bottom_mm=_r(bottom),
                slice_thickness_mm=None if slice_thickness_mm is None else float(slice_thickness_mm))


def _site_label(site: str) -> int:
    return ORGAN_IDS[site]


def _place_lesions(anatomy: Phantom, requests: list[dict[str, Any]], rng: np.random.Generator) -> tuple[Lesion, ...]:
    """Put each requested lesion inside its organ, fully inside the field of view in z
    where it fits: chosen on a coarse label rendering of the anatomy."""
    if not requests:
        return ()
    (x0, y0), (x1, y1) = anatomy.body_extent_xy()
    s = _PLACEMENT_SPACING_MM
    lo = (x0 - s, y0 - s, anatomy.fov_bottom_mm)
    counts = [int(math.floor((h - l) / s)) + 1 for l, h in zip(lo, (x1 + s, y1 + s, anatomy.fov_top_mm))]
    grid = Grid((counts[2], counts[1], counts[0]), (s, s, s), lo)
    canvas = _Canvas(grid, with_hu=False)
    _paint_anatomy(canvas, anatomy)
    taken = np.zeros(grid.shape, dtype=bool)
    zs, ys, xs = grid.axes_mm()
    placed: list[Lesion] = []
    for request in requests:
        site, kind = request["site"], request["type"]
        lo_d, hi_d = LESION_DIAMETER_MM[site]
        diameter = request["diameter_mm"]
        drawn_d = math.exp(rng.uniform(math.log(lo_d), math.log(hi_d)))
        if site == "lung" and rng.random() < 0.85:
            drawn_d = math.exp(rng.uniform(math.log(3.0), math.log(14.0)))
        diameter = float(diameter) if diameter is not None else drawn_d
        contrast = _lesion_contrast(anatomy, request, rng)
        radius = diameter / 2.0
        host = canvas.organs == _site_label(site)
        if not host.any():
            if request["forced"]:
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
                if request["forced"]:
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


def _organ_reference_hu(phantom: Phantom, site: str) -> float:
    """The HU a lesion's contrast refers to: the organ's mean, or the wall of a hollow organ."""
    t = phantom.tissues
    return {"liver": t.liver, "pancreas": t.pancreas, "lung": t.lung, "stomach": t.wall, "oesophagus": t.wall,
            "colon": t.wall}[site]


def _lesion_contrast(anatomy: Phantom, request: Mapping[str, Any], rng: np.random.Generator) -> float:
    site, kind = request["site"], request["type"]
    reference = _organ_reference_hu(anatomy, site)
    if kind in ("cyst", "nodule"):
        drawn = rng.uniform(*(CYST_HU if kind == "cyst" else NODULE_HU)) - reference
    else:
        drawn = rng.uniform(*LESION_CONTRAST_HU[(site, kind)])
    if request["contrast_hu"] is not None:
        return float(request["contrast_hu"])
    if request["hu"] is not None:
        return float(request["hu"]) - reference
    return float(drawn)


# --------------------------------------------------------------------------- rendering machinery


class _Canvas:
    """The arrays being painted, and index arithmetic on the grid."""

    def __init__(self, grid: Grid, with_hu: bool) -> None:
        self.grid = grid
        self.axes = tuple(a.astype(np.float32) for a in grid.axes_mm())  # z, y, x
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32) if with_hu else None
        self.organs = np.zeros(grid.shape, dtype=np.uint8)
        self.lesions = np.zeros(grid.shape, dtype=np.uint8)
        self.vertebrae = np.zeros(grid.shape, dtype=np.uint8)
        self.region = np.zeros(grid.shape, dtype=np.uint8)   # 0 out, 1 wall, 2 thorax, 3 diaphragm, 4 abdomen

    def span(self, axis: int, lo: float, hi: float) -> tuple[int, int] | None:
        """Index range [k0, k1) of voxel centres within [lo, hi] mm along axis (0 z, 1 y, 2 x)."""
        origin = self.grid.origin_mm[2 - axis]
        step = self.grid.spacing_mm[axis]
        k0 = max(0, math.ceil((lo - origin) / step - 1e-6))
        k1 = min(self.grid.shape[axis] - 1, math.floor((hi - origin) / step + 1e-6))
        return (k0, k1 + 1) if k0 <= k1 else None

    def box(self, lo_xyz: Sequence[float], hi_xyz: Sequence[float]) -> tuple[slice, slice, slice] | None:
        spans = [self.span(axis, lo_xyz[2 - axis], hi_xyz[2 - axis]) for axis in range(3)]
        if any(s is None for s in spans):
            return None
        return tuple(slice(*s) for s in spans)  # type: ignore[return-value, misc]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x, y, z coordinates of a box."""
        z, y, x = (a[s] for a, s in zip(self.axes, box))
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def points(self, box: tuple[slice, slice, slice], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z coordinates of the voxels of ``mask`` (a box-shaped boolean)."""
        kz, ky, kx = np.nonzero(mask)
        z, y, x = (a[s] for a, s in zip(self.axes, box))
        return x[kx], y[ky], z[kz]

    def paint(self, box: tuple[slice, slice, slice], mask: np.ndarray, values: Any, label: int | None) -> None:
        """Set HU (``values``: a scalar, or one per voxel of ``mask``) and, unless None, the organ label."""
        if self.hu is not None:
            sub = self.hu[box]
            sub[mask] = values
        if label is not None:
            sub = self.organs[box]
            sub[mask] = label


def _texture(key: Sequence[int], x: np.ndarray, y: np.ndarray, z: np.ndarray, amplitude: float,
             wavelengths: tuple[float, float] = (8.0, 30.0), terms: int = 4) -> np.ndarray | float:
    """A smooth zero-mean random field of RMS ``amplitude`` (sum of separable cosines in mm)."""
    if amplitude == 0:
        return 0.0
    rng = np.random.default_rng(list(key))
    out: Any = 0.0
    for _ in range(terms):
        k = 2 * np.pi / rng.uniform(*wavelengths, size=3)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        out = out + (np.cos(x * np.float32(k[0]) + np.float32(phase[0]))
                     * np.cos(y * np.float32(k[1]) + np.float32(phase[1]))
                     * np.cos(z * np.float32(k[2]) + np.float32(phase[2])))
    return out * np.float32(amplitude / (0.3536 * math.sqrt(terms)))


_TEXTURE_KEYS = {name: i for i, name in enumerate((
    "body", "lung", "heart", "liver", "spleen", "kidney", "stomach", "colon", "pancreas", "oesophagus", "aorta",
    "bowel", "stool", "bone", "disc", "lesion", "psoas", "spine_block", "rib", "vessel"))}


def _key(phantom: Phantom, name: str, index: int = 0) -> tuple[int, int, int]:
    return (phantom.seed, _TEXTURE_KEYS[name], index)


def _tube_field(cv: _Canvas, centres: np.ndarray, radii: np.ndarray, track: bool
                ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray | None] | None:
    """Signed distance (mm, approximately) to a union of spheres, inside its box, and
    (``track``) the index of the nearest sphere."""
    lo = (centres - radii[:, None]).min(axis=0)
    hi = (centres + radii[:, None]).max(axis=0)
    box = cv.box(lo, hi)
    if box is None:
        return None
    z, y, x = (a[s] for a, s in zip(cv.axes, box))
    shape = (len(z), len(y), len(x))
    sd = np.full(shape, np.inf, dtype=np.float32)
    near = np.zeros(shape, dtype=np.int32) if track else None
    starts = [s.start for s in box]
    for i, (c, r) in enumerate(zip(centres, radii)):
        spans = [cv.span(axis, c[2 - axis] - r, c[2 - axis] + r) for axis in range(3)]
        if any(sp is None for sp in spans):
            continue
        (z0, z1), (y0, y1), (x0, x1) = ((sp[0] - st, sp[1] - st) for sp, st in zip(spans, starts))
        dz = (z[z0:z1] - np.float32(c[2])) ** 2
        dy = (y[y0:y1] - np.float32(c[1])) ** 2
        dx = (x[x0:x1] - np.float32(c[0])) ** 2
        d = np.sqrt(dz[:, None, None] + dy[None, :, None] + dx[None, None, :]) - np.float32(r)
        sub = sd[z0:z1, y0:y1, x0:x1]
        if near is None:
            np.minimum(sub, d, out=sub)
        else:
            better = d < sub
            sub[better] = d[better]
            near[z0:z1, y0:y1, x0:x1][better] = i
    return box, sd, near


def _region_mask(cv: _Canvas, box: tuple[slice, slice, slice], regions: Sequence[int] | None) -> np.ndarray | None:
    if regions is None:
        return None
    sub = cv.region[box]
    mask = sub == regions[0]
    for value in regions[1:]:
        mask |= sub == value
    return mask


def _paint_tube(cv: _Canvas, phantom: Phantom, tube: Tube, *, label: int | None, hu: float,
                texture: tuple[str, int, float] | None = None, wall_mm: float = 0.0,
                lumen: Callable[..., np.ndarray] | None = None, regions: Sequence[int] | None = None,
                host: int | None = None, extra: Sequence[tuple[Point, float]] = ()) -> None:
    """Paint a tube (solid, or a wall around a lumen whose HU ``lumen`` computes)."""
    centres, radii, params = tube.spheres(min_step=0.4 * min(cv.grid.spacing_mm))
    if extra:
        centres = np.vstack([centres, np.asarray([e[0] for e in extra], dtype=float)])
        radii = np.concatenate([radii, [e[1] for e in extra]])
        params = np.concatenate([params, [-1.0] * len(extra)])
    track = lumen is not None and cv.hu is not None
    field = _tube_field(cv, centres, radii, track)
    if field is None:
        return
    box, sd, near = field
    mask = sd <= 0
    clip = _region_mask(cv, box, regions)
    if clip is not None:
        mask &= clip
    if host is not None:
        mask &= cv.organs[box] == host
    if not mask.any():
        return
    if cv.hu is None:
        cv.paint(box, mask, 0.0, label)
        return
    x, y, z = cv.points(box, mask)
    values = np.full(x.shape, hu, dtype=np.float32)
    if texture is not None:
        name, index, amplitude = texture
        values += _texture(_key(phantom, name, index), x, y, z, amplitude)
    if lumen is not None and wall_mm > 0:
        inner = sd[mask] <= -wall_mm
        if inner.any():
            idx = near[mask][inner]
            values[inner] = lumen(x[inner], y[inner], z[inner], centres[idx], radii[idx], params[idx])
    cv.paint(box, mask, values, label)


def _paint_blob(cv: _Canvas, phantom: Phantom, blob: Blob, *, label: int | None, hu: float,
                texture: tuple[str, int, float] | None = None, regions: Sequence[int] | None = None,
                grow_mm: float = 0.0) -> None:
    if grow_mm:
        blob = dataclasses.replace(blob, semi_axes=tuple(a + grow_mm for a in blob.semi_axes))
    half = blob.half_extent()
    box = cv.box(np.asarray(blob.centre) - half, np.asarray(blob.centre) + half)
    if box is None:
        return
    mask = blob.inside(*cv.coords(box))
    clip = _region_mask(cv, box, regions)
    if clip is not None:
        mask &= clip
    if not mask.any():
        return
    values: Any = hu
    if cv.hu is not None and texture is not None:
        x, y, z = cv.points(box, mask)
        name, index, amplitude = texture
        values = np.float32(hu) + _texture(_key(phantom, name, index), x, y, z, amplitude)
    cv.paint(box, mask, values, label)


# --------------------------------------------------------------------------- anatomy painting


def _paint_body(cv: _Canvas, ph: Phantom) -> None:
    """Skin, fat, muscle wall, lungs, mediastinum, diaphragm and abdominal fat, slab by slab."""
    t = ph.tissues
    z_all, y_all, x_all = cv.axes
    cx, cy = (np.float32(v) for v in ph.body_centre)
    dx, dy = x_all[None, :] - cx, y_all[:, None] - cy
    dx2, dy2 = dx ** 2, dy ** 2
    radius = np.sqrt(dx2 + dy2)
    anterior = np.clip(-dy / np.maximum(radius, 1e-3), -1, 1)
    dome = ph.diaphragm.height(x_all[None, :], y_all[:, None])
    a_c = float(ph.body_semi_axes(ph.lung_apex_z)[0]) - float(ph.wall_mm(ph.lung_apex_z, 0.0))
    b_c = float(ph.body_semi_axes(ph.lung_apex_z)[1]) - float(ph.wall_mm(ph.lung_apex_z, 0.0))
    xl = 0.42 * a_c
    # each lung's apex is a dome over the middle of its half of the thorax
    apex = np.float32(ph.lung_apex_z) - np.float32(40.0) * (
        ((np.abs(dx) - np.float32(xl)) / np.float32(0.5 * a_c)) ** 2
        + ((dy - np.float32(0.1 * b_c)) / np.float32(0.8 * b_c)) ** 2)
    med = np.asarray(ph.mediastinum_profile, dtype=float)
    chunk = max(1, int(4_000_000 // max(1, len(y_all) * len(x_all))))
    for k0 in range(0, len(z_all), chunk):
        z = z_all[k0:k0 + chunk].astype(float)
        a, b = ph.body_semi_axes(z)
        fat = ph.fat_mm(z)
        vx, vy, va, vb = ph.spine_at(z)
        f32 = lambda v: np.asarray(v, dtype=np.float32)[:, None, None]  # noqa: E731
        a3, b3, fat3 = f32(a), f32(b), f32(fat)
        q = dx2[None] / a3 ** 2 + dy2[None] / b3 ** 2
        rho = np.sqrt(q)
        depth = radius[None] / np.maximum(rho, np.float32(1e-4)) - radius[None]
        back = cy + np.float32(ph.back_flatten) * b3 - y_all[None, :, None]
        np.minimum(depth, back, out=depth)
        inside = (q <= 1.0) & (back >= 0)
        skin = np.float32(ph.skin_mm)
        fat_end = skin + fat3 * (1 + np.float32(0.3) * anterior[None])
        muscle3 = f32(ph.muscle_mm(z))
        wall_end = fat_end + muscle3
        cavity = inside & (depth > wall_end)
        z3 = f32(z)
        thorax = cavity & (z3 > dome[None])
        diaphragm = cavity & (z3 <= dome[None]) & (z3 > dome[None] - np.float32(ph.diaphragm.thickness_mm))
        abdomen = cavity & (z3 <= dome[None] - np.float32(ph.diaphragm.thickness_mm))
        # mediastinum: an ellipse between the sternum and the spine
        front = cy - b3 + skin + np.float32(1.3) * fat3 + muscle3
        spine_front = f32(vy - vb)
        ym, bm = 0.5 * (front + spine_front), 0.5 * (spine_front - front) + np.float32(6.0)
        w = f32(np.interp(z, med[:, 0], med[:, 1]))
        mediastinum = (((x_all[None, None, :] - cx - np.float32(4.0)) / w) ** 2
                       + ((y_all[None, :, None] - ym) / bm) ** 2) <= 1
        lung = thorax & (z3 < apex[None]) & ~mediastinum
        region = cv.region[k0:k0 + chunk]
        region[inside] = 1
        region[thorax | lung] = 2
        region[diaphragm] = 3
        region[abdomen] = 4
        cv.organs[k0:k0 + chunk][lung] = ORGAN_IDS["lung"]
        if cv.hu is None:
            continue
        hu = cv.hu[k0:k0 + chunk]
        tex = _texture(_key(ph, "body"), x_all[None, None, :], y_all[None, :, None], z3, 1.0, (6.0, 25.0))
        hu[inside] = t.muscle
        hu[inside & (depth <= fat_end)] = t.fat
        hu[inside & (depth <= skin)] = t.skin
        hu[thorax] = t.muscle - 5                      # neck soft tissue above the apices
        hu[thorax & mediastinum] = t.visceral_fat + 10
        hu[abdomen] = t.visceral_fat
        fatty = (hu < -50) & inside
        hu[fatty] += 6.0 * tex[fatty]
        soft = inside & ~fatty
        hu[soft] += 2.0 * tex[soft]
        gradient = np.float32(t.lung_gradient * 0.5) * (y_all[None, :, None] - cy) / b3
        lung_tex = _texture(_key(ph, "lung"), x_all[None, None, :], y_all[None, :, None], z3, 1.0, (5.0, 20.0))
        values = np.float32(t.lung) + gradient + np.float32(10.0) * lung_tex
        hu[lung] = np.broadcast_to(values, hu.shape)[lung]


def _lumen_position(y: np.ndarray, c: np.ndarray, r: np.ndarray, wall_mm: float) -> np.ndarray:
    """Height of a lumen point across its cross-section: -1 anterior (gas rises there in a
    supine patient) .. 1 posterior."""
    return (y - c[:, 1].astype(np.float32)) / np.maximum(r - wall_mm, 1.0).astype(np.float32)


def _lumen_fluid_gas(fluid_hu: float, gas_fraction: float, wall_mm: float) -> Callable[..., np.ndarray]:
    """Water with a gas cap over ``gas_fraction`` of the lumen's height."""
    def lumen(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: np.ndarray, r: np.ndarray, u: np.ndarray) -> np.ndarray:
        gas = _lumen_position(y, c, r, wall_mm) < np.float32(2 * gas_fraction - 1)
        return np.where(gas, np.float32(-1000.0), np.float32(fluid_hu)).astype(np.float32)
    return lumen


def _colon_lumen(ph: Phantom, wall_mm: float) -> Callable[..., np.ndarray]:
    """Mottled stool with gas bubbles, and gas anteriorly where the colon holds some."""
    fractions = np.asarray(ph.colon_gas_fractions, dtype=float)
    rng = np.random.default_rng(list(_key(ph, "stool")))
    centres, radii, _ = ph.colon.spheres()
    picks = rng.integers(0, len(centres), 40)
    offsets = rng.normal(0, 1, (40, 3))
    offsets /= np.linalg.norm(offsets, axis=1)[:, None]
    bubbles = centres[picks] + offsets * (radii[picks] * rng.uniform(0.1, 0.6, 40))[:, None]
    bubble_r = rng.uniform(1.5, 5.0, 40)

    def lumen(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: np.ndarray, r: np.ndarray, u: np.ndarray) -> np.ndarray:
        level = np.interp(np.maximum(u, 0), np.arange(len(fractions)), fractions).astype(np.float32)
        rel = _lumen_position(y, c, r, wall_mm)
        values = np.float32(ph.tissues.stool) + _texture(_key(ph, "stool"), x, y, z, 35.0, (3.0, 9.0), 6)
        gas = rel < 2 * level - 1
        for centre, radius in zip(bubbles, bubble_r):
            gas |= ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) <= radius ** 2
        values[gas] = -1000.0
        return values
    return lumen


def _paint_anatomy(cv: _Canvas, ph: Phantom) -> None:
    """Every structure, in an order where later ones win (lesions are painted apart)."""
    t = ph.tissues
    bone = kvp_bone_factor(ph.kvp)
    _paint_body(cv, ph)
    _paint_spine_block(cv, ph)
    for i, tube in enumerate(ph.psoas):
        _paint_tube(cv, ph, tube, label=0, hu=t.muscle, texture=("psoas", i, 2.0), regions=(4,))
    _paint_tube(cv, ph, ph.sternum, label=0, hu=500.0 * bone, wall_mm=1.5,
                lumen=lambda x, *_: np.full(x.shape, t.marrow * bone, np.float32))
    _paint_blob(cv, ph, ph.heart, label=0, hu=t.visceral_fat + 10, regions=(2,), grow_mm=3.0)
    _paint_blob(cv, ph, ph.heart, label=0, hu=t.blood + 2, texture=("heart", 0, 1.5), regions=(2,))
    for tube in ph.pulmonary_arteries + (ph.svc,):
        _paint_tube(cv, ph, tube, label=0, hu=t.blood, regions=(2,))
    air = lambda x, *_: np.full(x.shape, -1000.0, np.float32)  # noqa: E731
    for tube in (ph.trachea,) + ph.bronchi:
        _paint_tube(cv, ph, tube, label=0, hu=t.wall, wall_mm=2.0, lumen=air, regions=(2,))
    for i, tube in enumerate(ph.lung_vessels):
        _paint_tube(cv, ph, tube, label=None, hu=t.blood, host=ORGAN_IDS["lung"])
    for i, (tube, gas) in enumerate(zip(ph.small_bowel, ph.small_bowel_gas)):
        _paint_tube(cv, ph, tube, label=0, hu=t.wall, wall_mm=2.5, lumen=_lumen_fluid_gas(t.bowel_fluid, gas, 2.5),
                    texture=("bowel", i, 1.5), regions=(4,))
    _paint_blob(cv, ph, ph.liver, label=ORGAN_IDS["liver"], hu=t.liver, texture=("liver", 0, 2.5), regions=(4,))
    if ph.gallbladder is not None:
        _paint_blob(cv, ph, ph.gallbladder, label=0, hu=t.gallbladder, regions=(4,))
    _paint_tube(cv, ph, ph.ivc, label=0, hu=t.blood)
    _paint_blob(cv, ph, ph.spleen, label=ORGAN_IDS["spleen"], hu=t.spleen, texture=("spleen", 0, 1.5), regions=(4,))
    for i, kidney in enumerate(ph.kidneys):
        _paint_blob(cv, ph, kidney, label=ORGAN_IDS["kidney"], hu=t.kidney, texture=("kidney", i, 1.5), regions=(4,))
    bulges = _bulges(ph)
    _paint_tube(cv, ph, ph.stomach, label=ORGAN_IDS["stomach"], hu=t.wall, wall_mm=4.0,
                lumen=_lumen_fluid_gas(t.stomach_fluid, ph.stomach_gas_fraction, 4.0), texture=("stomach", 0, 1.5),
                regions=(4,), extra=bulges["stomach"])
    _paint_tube(cv, ph, ph.colon, label=ORGAN_IDS["colon"], hu=t.wall, wall_mm=3.0, lumen=_colon_lumen(ph, 3.0),
                texture=("colon", 0, 1.5), regions=(4,), extra=bulges["colon"])
    _paint_tube(cv, ph, ph.pancreas, label=ORGAN_IDS["pancreas"], hu=t.pancreas, texture=("pancreas", 0, 3.0),
                regions=(4,), extra=bulges["pancreas"])
    oes_wall = max(ph.oesophagus.radii[0] - ph.oesophagus_lumen_mm, 0.1)
    _paint_tube(cv, ph, ph.oesophagus, label=ORGAN_IDS["oesophagus"], hu=t.wall, texture=("oesophagus", 0, 1.5),
                wall_mm=oes_wall if ph.oesophagus_lumen_mm > 0 else 0.0, lumen=air, regions=(2, 3, 4),
                extra=bulges["oesophagus"])
    _paint_tube(cv, ph, ph.aorta, label=ORGAN_IDS["aorta"], hu=t.blood, texture=("aorta", 0, 1.0))
    for x, y, z, r, hu in ph.aorta_calcifications:
        _paint_tube(cv, ph, Tube(((x, y, z), (x, y, z + 0.01)), (r, r)), label=None, hu=hu * bone,
                    host=ORGAN_IDS["aorta"])
    _paint_posterior_elements(cv, ph)
    for i, rib in enumerate(ph.ribs):
        _paint_tube(cv, ph, rib, label=ORGAN_IDS["rib"], hu=t.rib * bone, texture=("rib", i, 15.0))
    _paint_vertebrae(cv, ph)


def _bulges(ph: Phantom) -> dict[str, list[tuple[Point, float]]]:
    out: dict[str, list[tuple[Point, float]]] = {site: [] for site in _BULGING_SITES}
    for lesion in ph.lesions:
        if lesion.bulge_mm > 0 and lesion.site in out:
            out[lesion.site].append((lesion.centre_mm, lesion.bulge_mm))
    return out


def _paint_spine_block(cv: _Canvas, ph: Phantom) -> None:
    """Soft tissue around the vertebral bodies, the posterior elements and the paraspinal
    muscles (keeps the lungs off the spine; they fill the paravertebral gutters)."""
    t = ph.tissues
    prof = np.asarray(ph.body_profile)
    cx, cy = ph.body_centre
    lo = (cx - 90.0, min(v.centre_xy[1] - v.semi_axes_xy[1] for v in ph.vertebrae) - 8.0, prof[0, 0])
    hi = (cx + 90.0, cy + ph.back_flatten * prof[:, 2].max(), prof[-1, 0])
    box = cv.box(lo, hi)
    if box is None:
        return
    x, y, z = cv.coords(box)
    vx, vy, va, vb = (np.asarray(v, dtype=np.float32)[:, None, None] for v in ph.spine_at(z[:, 0, 0].astype(float)))
    rc = np.float32(ph.canal_radius_mm)
    y_canal = vy + vb + 2 + rc
    mask = ((x - vx) / (va + 5)) ** 2 + ((y - vy) / (vb + 5)) ** 2 <= 1
    mask |= (np.abs(x - vx) <= rc + 9) & (y >= vy) & (y <= y_canal + rc + 20)
    for side in (-1, 1):
        mx = vx + side * (0.45 * va + 16)
        my = y_canal + 10
        mask |= ((x - mx) / (0.45 * va + 14)) ** 2 + ((y - my) / (0.6 * vb + 16)) ** 2 <= 1
    mask &= cv.region[box] >= 1
    if not mask.any():
        return
    values: Any = t.muscle
    if cv.hu is not None:
        px, py, pz = cv.points(box, mask)
        values = np.float32(t.muscle) + _texture(_key(ph, "spine_block"), px, py, pz, 2.0)
    cv.paint(box, mask, values, 0)


def _paint_posterior_elements(cv: _Canvas, ph: Phantom) -> None:
    """Spinal canal (continuous) and, at each body's level, the bony ring and spinous process."""
    t = ph.tissues
    bone = kvp_bone_factor(ph.kvp)
    rc = ph.canal_radius_mm
    canal_pts, radii = [], []
    for v in reversed(ph.vertebrae):
        vx, vy = v.centre_xy
        yc = vy + v.semi_axes_xy[1] + 2.0 + rc
        ring = Tube(((vx, yc, v.z_bottom + 1.0), (vx, yc, v.z_top - 1.0)), (rc + 5.0, rc + 5.0))
        _paint_tube(cv, ph, ring, label=0, hu=t.posterior_bone * bone)
        back = ph.body_centre[1] + ph.back_flatten * float(ph.body_semi_axes(v.z_centre)[1])
        tip_y = back - ph.skin_mm - 0.7 * float(ph.fat_mm(v.z_centre)) - 6.0
        if tip_y > yc + rc + 6:
            spinous = Tube(((vx, yc + rc + 3.0, v.z_centre), (vx, tip_y, v.z_centre - 12.0)), (4.0, 3.5))
            _paint_tube(cv, ph, spinous, label=0, hu=t.posterior_bone * bone)
        canal_pts.append((vx, yc, v.z_centre))
        radii.append(rc)
    top = ph.vertebrae[0]
    canal_pts.append((top.centre_xy[0], canal_pts[-1][1], top.z_top + 80.0))
    radii.append(rc)
    canal_pts.insert(0, (canal_pts[0][0], canal_pts[0][1], ph.vertebrae[-1].z_bottom - 80.0))
    radii.insert(0, rc)
    _paint_tube(cv, ph, Tube(tuple(canal_pts), tuple(radii)), label=0, hu=t.canal)


def _paint_vertebrae(cv: _Canvas, ph: Phantom) -> None:
    """Discs (soft tissue, label 0) and vertebral bodies (cortical shell + trabecular bone)."""
    t = ph.tissues
    bone = kvp_bone_factor(ph.kvp)
    verts = ph.vertebrae
    for upper, lower in zip(verts[:-1], verts[1:]):
        cx = 0.5 * (upper.centre_xy[0] + lower.centre_xy[0])
        cy = 0.5 * (upper.centre_xy[1] + lower.centre_xy[1])
        a = 0.5 * (upper.semi_axes_xy[0] + lower.semi_axes_xy[0])
        b = 0.5 * (upper.semi_axes_xy[1] + lower.semi_axes_xy[1])
        box = cv.box((cx - a, cy - b, lower.z_top + 1e-3), (cx + a, cy + b, upper.z_bottom - 1e-3))
        if box is None:
            continue
        x, y, z = cv.coords(box)
        mask = np.broadcast_to(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1, (z.shape[0], y.shape[1], x.shape[2]))
        if cv.hu is not None and mask.any():
            px, py, pz = cv.points(box, mask)
            values: Any = np.float32(t.disc) + _texture(_key(ph, "disc"), px, py, pz, 2.0)
        else:
            values = t.disc
        cv.paint(box, mask, values, 0)
    for index, v in enumerate(verts, start=1):
        (cx, cy), (a, b) = v.centre_xy, v.semi_axes_xy
        box = cv.box((cx - a, cy - b, v.z_bottom), (cx + a, cy + b, v.z_top))
        if box is None:
            continue
        x, y, z = cv.coords(box)
        dx, dy = x - np.float32(cx), y - np.float32(cy)
        q = (dx / np.float32(a)) ** 2 + (dy / np.float32(b)) ** 2
        mask = np.broadcast_to(q <= 1, (z.shape[0], y.shape[1], x.shape[2]))
        if not mask.any():
            continue
        if cv.hu is not None:
            r = np.sqrt(dx ** 2 + dy ** 2)
            in_plane = r / np.maximum(np.sqrt(q), np.float32(1e-4)) - r
            depth = np.minimum(in_plane, np.minimum(z - np.float32(v.z_bottom), np.float32(v.z_top) - z))
            px, py, pz = cv.points(box, mask)
            trab = np.float32(v.trabecular_hu * bone) + _texture(
                _key(ph, "bone", index), px, py, pz, 8.0, (4.0, 10.0), 6)
            values = np.where(np.broadcast_to(depth, mask.shape)[mask] < v.cortical_mm,
                              np.float32(v.cortical_hu * bone), trab)
        else:
            values = 0.0
        cv.paint(box, mask, values, ORGAN_IDS["vertebra"])
        cv.vertebrae[box][mask] = index


def _paint_lesions(cv: _Canvas, ph: Phantom) -> None:
    """Each lesion: a (lobulated) sphere clipped to its organ; ``lesions`` = its number."""
    for lesion in ph.lesions:
        r = lesion.diameter_mm / 2.0
        reach = r * (1 + 2.5 * lesion.lobulation) + 0.5
        c = np.asarray(lesion.centre_mm)
        box = cv.box(c - reach, c + reach)
        if box is None:
            continue
        x, y, z = cv.coords(box)
        dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
        dist = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
        limit: Any = np.float32(r)
        if lesion.lobulation > 0:
            rng = np.random.default_rng(list(_key(ph, "lesion", lesion.number)))
            ux, uy, uz = (d / np.maximum(dist, np.float32(1e-3)) for d in (dx, dy, dz))
            g: Any = 0.0
            for _ in range(5):
                v = rng.normal(0, 1, 3)
                v /= np.linalg.norm(v)
                g = g + np.cos(np.float32(3.0) * (ux * v[0] + uy * v[1] + uz * v[2]) + np.float32(rng.uniform(0, 6.3)))
            limit = np.float32(r) * (1 + np.float32(lesion.lobulation / math.sqrt(2.5)) * g)
        mask = (dist <= limit) & (cv.organs[box] == _site_label(lesion.site))
        if not mask.any():
            continue
        if cv.hu is not None:
            px, py, pz = cv.points(box, mask)
            hu = np.float32(_organ_reference_hu(ph, lesion.site) + lesion.contrast_hu)
            values = hu + _texture(_key(ph, "lesion", lesion.number), px, py, pz, lesion.heterogeneity_hu, (3.0, 10.0))
            cv.hu[box][mask] = values
        cv.lesions[box][mask] = lesion.number


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
    return w / w.sum()


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
    boxes = ndimage.find_objects(organs, max_label=len(ORGAN_LABELS))
    present = {i + 1 for i, box in enumerate(boxes) if box is not None}
    cut = {label for label in present if _touches_edge(boxes[label - 1], grid.shape)}
    level_boxes = ndimage.find_objects(vertebrae, max_label=len(LEVELS))
    levels = {i + 1 for i, box in enumerate(level_boxes) if box is not None}
    levels_cut = {level for level in levels if _touches_edge(level_boxes[level - 1], grid.shape)}
    means = {}
    for name in ("liver", "spleen"):
        box = boxes[ORGAN_IDS[name] - 1]
        mask = None if box is None else (organs[box] == ORGAN_IDS[name]) & (lesions[box] == 0)
        means[name] = _r(float(cv.hu[box][mask].mean()), 2) if mask is not None and mask.any() else None
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
    return {
        "seed": ph.seed,
        "kvp": ph.kvp,
        "noise_sigma_hu": ph.noise_sigma_hu,
        "slice_thickness_mm": ph.slice_thickness_mm,
        "liver_hu": liver_hu,
        "liver_mean_hu": means["liver"],
        "spleen_mean_hu": means["spleen"],
        "liver_minus_spleen_hu": None if None in means.values() else _r(means["liver"] - means["spleen"]),
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


# --------------------------------------------------------------------------- DICOM and case folders


def _series_key(rendered: RenderedPhantom, grid: Grid) -> str:
    """What the pixel data depend on: every phantom parameter and the grid."""
    import hashlib

    text = rendered.phantom.to_json(sort_keys=True) + json.dumps(grid.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_dicom_series(
    rendered: RenderedPhantom,
    grid: Grid,
    out_dir: Path | str,
    *,
    seed: int | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write ``rendered`` as one CT Image Storage file per slice (Explicit VR Little Endian).

    UIDs are derived from ``seed`` (default: the phantom's) with
    :func:`pipelines.dicom_out.uids.derive_uid`: the study and Frame of Reference from the
    seed alone, the series from the phantom's parameters and the grid, so a
    rewrite is identical and a different rendering is a different series.
    Pixels are unsigned with Rescale Intercept -1024 (PS3.3 C.8.2.1). Files are
    named by Instance Number, 1 at the top (head) slice; returns them in that order.
    """
    # imported here, not at import time: training scripts never write DICOM
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    if not isinstance(rendered, RenderedPhantom):
        raise TypeError(f"rendered must be a RenderedPhantom, got {type(rendered).__name__}")
    if grid.shape != rendered.hu.shape:
        raise PhantomError(f"grid shape {grid.shape} does not match the rendered volume {rendered.hu.shape}")
    if grid.spacing_mm[0] <= 0 or grid.shape[0] < 1:
        raise PhantomError(f"grid {grid} has no slices")
    seed = rendered.phantom.seed if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(series_number, int) or not 0 <= series_number <= 2 ** 31 - 1:
        raise PhantomError(f"series_number must be a non-negative integer, got {series_number!r}")
    phantom = rendered.phantom
    study_uid = study_uid or derive_uid(_UID_ROOT, str(seed), "study")
    series_uid = series_uid or derive_uid(_UID_ROOT, str(seed), "series", _series_key(rendered, grid))
    frame_uid = derive_uid(_UID_ROOT, str(seed), "frame-of-reference")
    patient_name = patient_name if patient_name is not None else f"PHANTOM^{seed}"
    patient_id = patient_id if patient_id is not None else f"PHANTOM-{seed}"
    study_date = date(2024, 1, 1) + timedelta(days=seed % 366)
    birth = date(study_date.year - phantom.age, 1 + seed % 12, 1 + seed % 28)
    thickness = rendered.truth.get("slice_thickness_mm") or grid.spacing_mm[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, rows, cols = grid.shape
    sz, sy, sx = grid.spacing_mm
    ox, oy, oz = grid.origin_mm
    stored = (rendered.hu.astype(np.int32) - _HU_MIN).astype(np.uint16)
    paths: list[Path] = []
    for instance in range(1, nz + 1):
        k = nz - instance                       # instance 1 is the top slice
        sop_uid = derive_uid(series_uid, "instance", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "100000"
        ds.AccessionNumber = f"PH{seed}"[-16:]
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "synthetic phantom"
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST WO CONTRAST"
        ds.SeriesDescription = f"synthetic phantom {sz:g} mm"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = phantom.sex
        ds.PatientAge = f"{phantom.age:03d}Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:g}"
        ds.KVP = str(phantom.kvp)
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"PH{seed}"[-16:]
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagesInAcquisition = nz
        z = oz + k * sz
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _HU_MIN, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out_dir / f"{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:          # a handle: numpy would add ".npz" to a temporary name
            np.savez_compressed(handle, **arrays)
    _write_atomic(path, write)


def write_case(phantom: Phantom, grid: Grid, case_dir: Path | str, *, dicom: bool = True) -> Path:
    """Render ``phantom`` on ``grid`` and write a labelled case folder (module docstring):
    ``dicom/`` (or ``image.npz`` when ``dicom`` is False), ``labels.npz`` and ``truth.json``."""
    rendered = render(phantom, grid)
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    if dicom:
        written = set(write_dicom_series(rendered, grid, case_dir / "dicom"))
        for stale in (case_dir / "dicom").glob("[0-9][0-9][0-9][0-9].dcm"):
            if stale not in written:                      # a slice of an earlier, longer rendering
                stale.unlink()
    else:
        _write_npz(case_dir / "image.npz", hu=rendered.hu, spacing_mm=np.asarray(grid.spacing_mm),
                   origin_mm=np.asarray(grid.origin_mm))
    _write_npz(case_dir / "labels.npz", organs=rendered.organs, lesions=rendered.lesions, vertebrae=rendered.vertebrae)
    truth = {
        "format": "pacs-ai-node labelled case", "format_version": 1,
        **rendered.truth,
        "label_names": {str(k): v for k, v in ORGAN_LABELS.items()},
        "level_names": {str(k): v for k, v in LEVELS.items()},
        "lesion_types": {site: list(types) for site, types in LESION_TYPES.items()},
        "grid": grid.to_dict(),
        "phantom": phantom.to_dict(),
    }
    _write_atomic(case_dir / "truth.json", lambda p: p.write_text(json.dumps(truth, indent=1) + "\n"))
    return case_dir


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.offline.phantom OUT_DIR --cases N --seed S [--grid coarse|chest] [--spacing MM] [--no-dicom]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.offline.phantom",
        description="Write synthetic CT phantom cases (case_0000, ...; case i uses seed S + i).")
    parser.add_argument("out_dir", type=Path, help="folder to write the case folders into")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    parser.add_argument("--grid", choices=("coarse", "chest"), default="coarse",
                        help="coarse: isotropic, covering the body (training); chest: 512 x 512, 0.78 mm pixels")
    parser.add_argument("--spacing", type=float, default=None,
                        help="coarse: voxel size (default 3 mm); chest: slice spacing (default 1 mm)")
    parser.add_argument("--no-dicom", action="store_true", help="write image.npz instead of a DICOM series")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be at least 1, got {args.cases}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    if args.spacing is not None and not 0.2 <= args.spacing <= 20:
        parser.error(f"--spacing must be 0.2-20 mm, got {args.spacing}")
    for i in range(args.cases):
        seed = args.seed + i
        started = time.perf_counter()
        try:
            phantom = sample_phantom(seed)
            if args.grid == "coarse":
                grid = Grid.coarse(args.spacing or 3.0, phantom)
            else:
                grid = Grid.chest_ct(slice_mm=args.spacing or 1.0, phantom=phantom)
            case_dir = write_case(phantom, grid, args.out_dir / f"case_{i:04d}", dicom=not args.no_dicom)
        except PhantomError as exc:
            print(f"case_{i:04d} (seed {seed}): {exc}", file=sys.stderr)
            return 2
        findings = ", ".join(f"{les.site} {les.type} {les.diameter_mm:g} mm" for les in phantom.lesions) or "none"
        print(f"{case_dir.name}: seed {seed}, grid {'x'.join(map(str, grid.shape))}, liver {phantom.steatosis}, "
              f"bone {phantom.bone_density}, lesions: {findings} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
