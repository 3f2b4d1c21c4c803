"""Sampling one synthetic patient and acquisition from a seed (:func:`sample_phantom`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.offline.phantom.anatomy import Blob, Diaphragm, Phantom, Tissues, Tube, Vertebra, _pt, _r
from pipelines.offline.phantom.lesions import (
    _lesion_probabilities,
    _lesion_request,
    _place_lesions,
    _random_lesion_requests,
)
from pipelines.offline.phantom.tables import (
    BONE_DENSITY_CLASSES,
    COVERAGES,
    LEVELS,
    STEATOSIS_CLASSES,
    PhantomError,
    bone_density_class,
    steatosis_class,
)

# --------------------------------------------------------------------------- sampling


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
    liver_tissue_hu = float(liver_hu) if liver_hu is not None else livers[steatosis or liver_class]
    steatosis_found = steatosis_class(liver_tissue_hu)
    bone_class = BONE_DENSITY_CLASSES[int(np.searchsorted([0.5, 0.8], rng.random()))]
    l1s = {"normal": u(170, 260), "osteopenic": u(115, 155), "osteoporotic": u(55, 105)}
    l1_hu = float(trabecular_hu) if trabecular_hu is not None else l1s[bone_density or bone_class]
    density = bone_density_class(l1_hu)
    fat = u(-110, -90)
    tissues = Tissues(
        fat=_r(fat), visceral_fat=_r(fat + u(0, 8)), muscle=_r(u(47, 53)), skin=_r(u(27, 33)),
        lung=_r(u(-865, -835)), lung_gradient=_r(u(20, 40)), blood=_r(u(41, 49)), liver=_r(liver_tissue_hu),
        spleen=_r(u(45.5, 49.5)), pancreas=_r(u(37, 43)), kidney=_r(u(30.5, 34.5)), wall=_r(u(39, 44)),
        stomach_fluid=_r(u(2, 13)), stool=_r(u(-25, 25)), bowel_fluid=_r(u(5, 25)), gallbladder=_r(u(0, 15)),
        disc=_r(u(74, 86)), canal=_r(u(21, 29)), posterior_bone=_r(u(300, 420)), rib=_r(u(460, 590)),
        marrow=_r(u(120, 220)),
    )
    cortical = u(560, 850) - {"normal": 0, "osteopenic": 60, "osteoporotic": 120}[density]

    # ---- vertebral bodies
    vertebrae = []
    for i, level in enumerate(LEVELS.values()):
        z_mid = 0.5 * (z_bottoms[i] + z_tops[i])
        if i < 12:
            va, vb = scale * (15 + 7 * i / 11), scale * (11 + 5 * i / 11)
            depth = scale * (56 + 6 * i / 11)
        else:
            va, vb = scale * (23 + 3 * (i - 12) / 4), scale * (17 + 2 * (i - 12) / 4)
            depth = scale * (64 + 10 * min(i - 12, 2) / 2)
        y_back = cy + flatten * b_at(z_mid)
        trab = l1_hu + 2.5 * (12 - i) + rng.normal(0, 3) if i != 12 else l1_hu
        vertebrae.append(Vertebra(
            level=level, z_bottom=_r(z_bottoms[i]), z_top=_r(z_tops[i]),
            centre_xy=(_r(cx + rng.normal(0, 1.0)), _r(y_back - depth)), semi_axes_xy=(_r(va), _r(vb)),
            trabecular_hu=_r(max(trab, 20.0)), cortical_hu=_r(cortical + u(-20, 20)), cortical_mm=_r(u(1.3, 2.0))))
    vert = {v.level: v for v in vertebrae}

    def spine(zz: float) -> tuple[float, float, float, float]:
        zs = [v.z_centre for v in reversed(vertebrae)]
        x, y, a, b = (float(np.interp(zz, zs, [getattr(v, attr)[k] for v in reversed(vertebrae)]))
                      for attr, k in (("centre_xy", 0), ("centre_xy", 1), ("semi_axes_xy", 0), ("semi_axes_xy", 1)))
        return x, y, a, b

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
        loop = [p]
        for _ in range(3):
            p = p + rng.normal(0, 1, 3) * np.array([25.0, 12.0, 20.0])
            loop.append(p)
        small_bowel.append(Tube(tuple(_pt(*q) for q in loop), (_r(u(9, 13)),) * 4, "small bowel"))
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
