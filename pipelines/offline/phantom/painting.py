"""Painting a phantom's anatomy and lesions onto a canvas of HU and label maps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pipelines.offline.phantom.anatomy import Blob, Phantom, Point, Tube, _organ_reference_hu, _site_label
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.tables import _BULGING_SITES, ORGAN_IDS, kvp_bone_factor

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

    def box(self, lo_xyz: Sequence[float] | np.ndarray, hi_xyz: Sequence[float] | np.ndarray
            ) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels within the LPS box [lo_xyz, hi_xyz], None if it misses the grid."""
        spans = [self.span(axis, lo_xyz[2 - axis], hi_xyz[2 - axis]) for axis in range(3)]
        found = [s for s in spans if s is not None]
        if len(found) < 3:
            return None
        return slice(*found[0]), slice(*found[1]), slice(*found[2])

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
            labels = self.organs[box]
            labels[mask] = label


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
    field: np.ndarray | float = out * np.float32(amplitude / (0.3536 * math.sqrt(terms)))
    return field


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
        found = [sp for sp in spans if sp is not None]
        if len(found) < 3:
            continue
        (z0, z1), (y0, y1), (x0, x1) = ((sp[0] - st, sp[1] - st) for sp, st in zip(found, starts))
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
    mask: np.ndarray = sub == regions[0]
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
    if lumen is not None and near is not None and wall_mm > 0:     # near: tracked whenever lumen is given
        inner = sd[mask] <= -wall_mm
        if inner.any():
            idx = near[mask][inner]
            values[inner] = lumen(x[inner], y[inner], z[inner], centres[idx], radii[idx], params[idx])
    cv.paint(box, mask, values, label)


def _paint_blob(cv: _Canvas, phantom: Phantom, blob: Blob, *, label: int | None, hu: float,
                texture: tuple[str, int, float] | None = None, regions: Sequence[int] | None = None,
                grow_mm: float = 0.0) -> None:
    if grow_mm:
        a, b, c = blob.semi_axes
        blob = dataclasses.replace(blob, semi_axes=(a + grow_mm, b + grow_mm, c + grow_mm))
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

        def f32(v: npt.ArrayLike) -> npt.NDArray[np.float32]:
            return np.asarray(v, dtype=np.float32)[:, None, None]

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
        assert isinstance(tex, np.ndarray)              # a non-zero amplitude gives a field, never the scalar 0
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
        assert isinstance(values, np.ndarray)           # a non-zero amplitude gives a field, never the scalar 0
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
    for tube in ph.lung_vessels:
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
