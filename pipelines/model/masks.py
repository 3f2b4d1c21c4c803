"""Post-processing of segment masks on the source grid: connected components, holes, support boxes.

Plain functions on boolean arrays; each works on the bounding box of the mask
only (labelling a whole 512x512x300 grid per segment costs seconds; the box is
usually a small part of it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from pipelines.model.inference import Box


def _bounded(mask: np.ndarray, operation: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``operation`` to the bounding box of ``mask`` only."""
    objects = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    if not objects:
        return mask
    box = objects[0]
    out = np.zeros_like(mask)
    out[box] = operation(mask[box])
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (``mask`` itself when it has one or none)."""

    def largest(block: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(block)
        if count <= 1:
            return block
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return np.asarray(labels == int(np.argmax(sizes)))

    return _bounded(mask, largest)


def components_at_least(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The 6-connected components of ``mask`` with at least ``min_voxels`` voxels."""

    def at_least(block: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(block)
        if count == 0:
            return block
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        return np.asarray(keep[labels])

    return _bounded(mask, at_least)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the holes of each axial slice filled."""

    def fill(block: np.ndarray) -> np.ndarray:
        out = np.empty_like(block)
        for k in range(block.shape[0]):
            out[k] = ndimage.binary_fill_holes(block[k])
        return out

    return _bounded(mask, fill)


def ellipsoid(reach: Sequence[int]) -> np.ndarray:
    """A boolean ellipsoid with the given half-widths in voxels (a structuring element)."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in reach)]
    return np.asarray(sum((g / max(r, 1)) ** 2 for g, r in zip(grids, reach)) <= 1.0)


def support_box(prob: np.ndarray, floor: float, box: Box) -> Box | None:
    """The part of ``box`` where ``prob`` reaches ``floor``, one voxel wider (interpolation reach)."""
    where = np.nonzero(prob >= floor)
    if not where[0].size:
        return None
    lo = [max(0, int(w.min()) - 1) for w in where]
    hi = [min(n, int(w.max()) + 2) for w, n in zip(where, prob.shape)]
    start = (box.start[0] + lo[0], box.start[1] + lo[1], box.start[2] + lo[2])
    shape = (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])
    return Box(start, shape, box.grid_shape, box.extent_mm)
