"""The axial voxel grid (LPS) a phantom is rendered on."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.offline.phantom.anatomy import Phantom
from pipelines.offline.phantom.tables import PhantomError

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
        counts = [int(math.floor((h - low) / spacing + 1e-6)) + 1 for low, h in zip(lo, hi)]
        return cls((counts[2], counts[1], counts[0]), (spacing, spacing, spacing),
                   (round(lo[0], 6), round(lo[1], 6), round(lo[2], 6)))

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
