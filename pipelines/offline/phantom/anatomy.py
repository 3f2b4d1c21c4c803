"""The phantom's shapes (blobs, tubes, vertebrae, lesions) and :class:`Phantom`, every parameter of one patient."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.offline.phantom.tables import (
    BONE_DENSITY_CLASSES,
    COVERAGES,
    LESION_TYPES,
    LEVEL_INDEX,
    LEVELS,
    ORGAN_IDS,
    STEATOSIS_CLASSES,
    PhantomError,
)

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
        rotation: np.ndarray = rz @ ry @ rx
        return rotation

    def half_extent(self) -> np.ndarray:
        """Half size (x, y, z) of the axis-aligned box around the ellipsoid."""
        rot = self.rotation()
        half: np.ndarray = np.sqrt(((rot * np.asarray(self.semi_axes)[None, :]) ** 2).sum(axis=1))
        return half

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Whether points (broadcastable coordinate arrays, mm) are inside."""
        rot = self.rotation()
        dx, dy, dz = x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2])
        terms = [((dx * np.float32(rot[0, j]) + dy * np.float32(rot[1, j]) + dz * np.float32(rot[2, j]))
                  / np.float32(self.semi_axes[j])) ** 2 for j in range(3)]
        # summed left to right, the order the rendered bytes were made with
        mask: np.ndarray = terms[0] + terms[1] + terms[2] <= 1.0
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
        """Height z (mm) of the diaphragm above the points (x, y): the higher of the two domes."""
        heights = []
        for px, py, pz in (self.right_peak, self.left_peak):
            dy = y - np.float32(py)
            sy = np.where(dy < 0, np.float32(self.spread_y[0]), np.float32(self.spread_y[1]))
            heights.append(np.float32(pz) - np.float32(self.depth_mm) * (
                ((x - np.float32(px)) / np.float32(self.spread_x)) ** 2 + (dy / sy) ** 2))
        upper: np.ndarray = np.maximum(heights[0], heights[1])
        return upper

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
        """Thickness of the subcutaneous fat at ``z`` (mm)."""
        prof = np.asarray(self.fat_profile, dtype=float)
        fat: np.ndarray = np.interp(z, prof[:, 0], prof[:, 1])
        return fat

    def body_extent_xy(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_min, y_min), (x_max, y_max)) of the body over its whole length."""
        prof = np.asarray(self.body_profile, dtype=float)
        a, b = prof[:, 1].max(), prof[:, 2].max()
        cx, cy = self.body_centre
        return (cx - a, cy - b), (cx + a, cy + self.back_flatten * b)

    def spine_at(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Vertebral body centre x, y and semi-axes a, b interpolated along z."""
        zs = [v.z_centre for v in reversed(self.vertebrae)]
        cols = [[v.centre_xy[0] for v in reversed(self.vertebrae)], [v.centre_xy[1] for v in reversed(self.vertebrae)],
                [v.semi_axes_xy[0] for v in reversed(self.vertebrae)],
                [v.semi_axes_xy[1] for v in reversed(self.vertebrae)]]
        return tuple(np.interp(z, zs, c) for c in cols)

    def muscle_mm(self, z: np.ndarray | float) -> np.ndarray:
        """Thickness of the muscle layer of the body wall (thicker around the upper chest)."""
        prof = np.asarray(self.muscle_profile, dtype=float)
        muscle: np.ndarray = np.interp(z, prof[:, 0], prof[:, 1])
        return muscle

    def wall_mm(self, z: np.ndarray | float, anterior: np.ndarray | float) -> np.ndarray:
        """Depth of the inner surface of the body wall (skin + fat + muscle), mm;
        ``anterior`` is -1 (posterior) .. 1 (anterior)."""
        wall: np.ndarray = self.skin_mm + self.fat_mm(z) * (1.0 + 0.3 * np.asarray(anterior)) + self.muscle_mm(z)
        return wall

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


def _r(value: float, digits: int = 2) -> float:
    return round(float(value), digits)


def _pt(x: float, y: float, z: float) -> Point:
    return _r(x), _r(y), _r(z)


def _site_label(site: str) -> int:
    return ORGAN_IDS[site]


def _organ_reference_hu(phantom: Phantom, site: str) -> float:
    """The HU a lesion's contrast refers to: the organ's mean, or the wall of a hollow organ."""
    t = phantom.tissues
    return {"liver": t.liver, "pancreas": t.pancreas, "lung": t.lung, "stomach": t.wall, "oesophagus": t.wall,
            "colon": t.wall}[site]
