"""Run a bundle's stage graph on one CT volume.

Coordinates: every grid here covers the same box, the CT volume flipped to the
manifest's LPS orientation (axis 0 foot->head, 1 anterior->posterior, 2
right->left). A grid of shape ``n`` over an extent ``E`` mm has voxel ``i``
centred at ``(i + 0.5) * E / n`` from the box edge, so the source grid and
every model grid line up at the box edges (as ``scipy.ndimage.zoom`` with
``grid_mode=True`` does) and positions convert between grids without drift.

The volume is decoded once; each target spacing is resampled once and shared
by every stage and bundle that asks for it (:class:`VolumeGrids`). A stage
with a ``region`` reads only the bounding box of an earlier stage's labels; a
stage with a ``gate`` runs only when those labels were found; a
classification stage runs once per connected component of its gate's labels,
on a patch centred on it. Sliding-window stages batch their patches, weight
them with a Gaussian and average mirrored predictions (test-time
augmentation), as nnU-Net's predictor does.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipelines.errors import ModelError
from pipelines.model.bundle import ModelBundle
from pipelines.model.manifest import Stage
from pipelines.timing import StageTiming
from pipelines.volume.ct import CTVolume

LOG = logging.getLogger(__name__)

#: HU samples, model inputs and probabilities: float32 throughout the stage graph.
Float32Array = npt.NDArray[np.float32]
#: Continuous (fractional) voxel indices into a grid.
IndexArray = npt.NDArray[np.float64]
_ArrayT = TypeVar("_ArrayT", bound=npt.NDArray[np.generic])

#: Where an axis of the flipped volume must point (LPS): +S, +P, +L.
_LPS_AXES = (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]))
#: Downsampling by more than this factor averages the source first (anti-aliasing).
_ANTIALIAS_FACTOR = 1.5


def canonical_flips(volume: CTVolume) -> tuple[bool, bool, bool]:
    """Which axes of ``volume.hu`` (slice, row, column) to flip so they run +S, +P, +L."""
    directions = (volume.slice_direction, volume.column_direction, volume.row_direction)
    flips = []
    for axis, (direction, wanted) in enumerate(zip(directions, _LPS_AXES)):
        cos = float(np.dot(np.asarray(direction, dtype=float), wanted))
        if abs(cos) < 0.5:
            raise ModelError(
                f"volume axis {axis} runs along {np.round(direction, 3).tolist()}: the models need an axial "
                "volume whose rows and columns run along the patient's axes"
            )
        flips.append(cos < 0)
    return flips[0], flips[1], flips[2]


def flip(array: _ArrayT, flips: tuple[bool, ...]) -> _ArrayT:
    """Flip the last three axes where ``flips`` says; the inverse of itself."""
    axes = tuple(array.ndim - 3 + i for i, f in enumerate(flips) if f)
    return np.flip(array, axis=axes) if axes else array


def _axis_coordinates(n_out: int, start_mm: float, out_step: float, src_step: float, n_src: int) -> IndexArray:
    """Continuous source indices of the centres of ``n_out`` voxels starting at ``start_mm``."""
    centres = start_mm + (np.arange(n_out, dtype=np.float64) + 0.5) * out_step
    return np.clip(centres / src_step - 0.5, 0.0, n_src - 1.0)


def resample_linear_axis(array: Float32Array, coords: IndexArray, axis: int) -> Float32Array:
    """Linear interpolation of one axis at continuous indices ``coords`` (already within range)."""
    n = array.shape[axis]
    if len(coords) == n and np.allclose(coords, np.arange(n)):
        return array
    lo = np.floor(coords).astype(np.intp)
    hi: npt.NDArray[np.intp] = np.minimum(lo + 1, n - 1)
    shape = [1] * array.ndim
    shape[axis] = len(coords)
    w = (coords - lo).astype(np.float32).reshape(shape)
    a = np.take(array, lo, axis=axis)
    b = np.take(array, hi, axis=axis)
    return a * (1 - w) + b * w


def resample_linear(array: Float32Array, coordinates: list[IndexArray]) -> Float32Array:
    """Separable linear interpolation of the last three axes at per-axis coordinates."""
    out = array
    offset = array.ndim - 3
    for axis, coords in enumerate(coordinates):
        out = resample_linear_axis(out, coords, offset + axis)
    return out


@dataclass
class Box:
    """A block of a grid: ``start`` (voxel index) and ``shape`` on a grid of ``grid_shape`` over ``extent_mm``."""

    start: tuple[int, int, int]
    shape: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    extent_mm: tuple[float, float, float]

    @property
    def step(self) -> tuple[float, float, float]:
        (ez, ey, ex), (nz, ny, nx) = self.extent_mm, self.grid_shape
        return ez / nz, ey / ny, ex / nx

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        (sz, sy, sx), (nz, ny, nx) = self.start, self.shape
        return slice(sz, sz + nz), slice(sy, sy + ny), slice(sx, sx + nx)

    def mm_range(self) -> list[tuple[float, float]]:
        return [(s * st, (s + n) * st) for s, n, st in zip(self.start, self.shape, self.step)]


class VolumeGrids:
    """The decoded CT in LPS order, and its resamplings, each computed once."""

    def __init__(self, volume: CTVolume) -> None:
        self.volume = volume
        self.flips = canonical_flips(volume)
        self.hu: Float32Array = np.ascontiguousarray(flip(volume.hu.astype(np.float32, copy=False), self.flips))
        nz, ny, nx = self.hu.shape
        self.shape: tuple[int, int, int] = (nz, ny, nx)
        sz, sy, sx = volume.spacing_zyx
        self.spacing: tuple[float, float, float] = (float(sz), float(sy), float(sx))
        self.extent_mm: tuple[float, float, float] = (nz * self.spacing[0], ny * self.spacing[1], nx * self.spacing[2])
        self._cache: dict[tuple[float, float, float], Float32Array] = {}

    def grid_shape(self, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
        (ez, ey, ex), (tz, ty, tx) = self.extent_mm, spacing
        return _cells(ez, tz), _cells(ey, ty), _cells(ex, tx)

    def full_box(self, spacing: tuple[float, float, float]) -> Box:
        shape = self.grid_shape(spacing)
        return Box((0, 0, 0), shape, shape, self.extent_mm)

    def _smoothing(self, step: tuple[float, ...]) -> tuple[int, ...]:
        """Moving-average width per axis that anti-aliases a resampling to ``step`` (1: none)."""
        return tuple(max(1, int(round(t / s))) if t / s > _ANTIALIAS_FACTOR else 1 for t, s in zip(step, self.spacing))

    def sample_at(self, coordinates: list[IndexArray], sizes: tuple[int, ...]) -> Float32Array:
        """HU at per-axis continuous source indices, each axis first averaged over ``sizes``.

        Separable and cropped: each axis is smoothed and interpolated in turn,
        on only the source voxels the coordinates (and the averaging) reach,
        so the work shrinks with every axis and with the box.
        """
        lo = [int(np.floor(c.min())) - s for c, s in zip(coordinates, sizes)]
        hi = [int(np.ceil(c.max())) + s + 1 for c, s in zip(coordinates, sizes)]
        lo = [max(0, v) for v in lo]
        hi = [min(n, v) for v, n in zip(hi, self.shape)]
        block = self.hu[tuple(slice(a, b) for a, b in zip(lo, hi))]
        for axis, (coords, size) in enumerate(zip(coordinates, sizes)):
            if size > 1:
                # mode "nearest" inside a cropped block equals the whole volume's: the crop keeps
                # ``size`` voxels of margin, and true volume edges are block edges.
                block = ndimage.correlate1d(block, _box_kernel(size), axis=axis, mode="nearest")
            local = np.clip(coords - lo[axis], 0.0, block.shape[axis] - 1.0)
            block = resample_linear_axis(block, local, axis)
        return block.astype(np.float32, copy=False)

    def sample(self, box: Box) -> Float32Array:
        """HU on ``box`` (linear interpolation, averaged first when downsampling)."""
        coords = [
            _axis_coordinates(n, s * st, st, src, nsrc)
            for n, s, st, src, nsrc in zip(box.shape, box.start, box.step, self.spacing, self.shape)
        ]
        return self.sample_at(coords, self._smoothing(box.step))

    def at(self, spacing: tuple[float, float, float]) -> Float32Array:
        """The whole volume at ``spacing`` (cached: shared by every stage that asks for it)."""
        key = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        if key not in self._cache:
            self._cache[key] = self.sample(self.full_box(key))
        return self._cache[key]

    def to_source(self, block: np.ndarray, box: Box) -> tuple[Float32Array, tuple[slice, slice, slice]]:
        """Resample a block of a model grid onto the source grid (linear).

        ``block`` has ``box.shape`` in its last three axes. Returns the values
        for the source voxels whose centres fall inside the box, and where
        they are in the (LPS-flipped) source volume.
        """
        src_slices = []
        local = []
        for (lo, hi), step, start, n, src, nsrc in zip(
            box.mm_range(), box.step, box.start, box.shape, self.spacing, self.shape
        ):
            first = max(0, int(np.ceil(lo / src - 0.5)))
            last = max(first, min(nsrc, int(np.ceil(hi / src - 0.5))))
            src_slices.append(slice(first, last))
            centres = (np.arange(first, last) + 0.5) * src
            local.append(np.clip(centres / step - 0.5 - start, 0.0, n - 1.0))
        values = resample_linear(block.astype(np.float32, copy=False), local)
        return values, (src_slices[0], src_slices[1], src_slices[2])


def _cells(extent_mm: float, step_mm: float) -> int:
    """How many voxels of ``step_mm`` cover ``extent_mm`` (at least one)."""
    return max(1, int(round(extent_mm / step_mm)))


def _box_kernel(size: int) -> Float32Array:
    """A centred moving average over ``size`` voxels: odd sizes plain, even sizes with half-weight ends
    (a plain even-width filter would shift the image by half a voxel)."""
    if size % 2:
        return np.full(size, 1.0 / size, dtype=np.float32)
    kernel = np.ones(size + 1, dtype=np.float32)
    kernel[0] = kernel[-1] = 0.5
    kernel /= size
    return kernel


def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> Float32Array:
    """nnU-Net-style weights: a Gaussian centred on the patch, sigma = patch * sigma_scale, max 1."""
    impulse = np.zeros(patch, dtype=np.float32)
    impulse[tuple(p // 2 for p in patch)] = 1.0
    weights: Float32Array = ndimage.gaussian_filter(impulse, [p * sigma_scale for p in patch], mode="constant", cval=0)
    weights /= weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def _starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    step = patch * (1.0 - overlap)
    n = int(np.ceil((size - patch) / step)) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, n)})


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """The manifest's output activation over the channel axis (1) of a model's raw output."""
    if activation == "softmax":
        shifted: np.ndarray = logits - logits.max(axis=1, keepdims=True)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=1, keepdims=True)
        return shifted
    if activation == "sigmoid":
        from scipy.special import expit

        probabilities: np.ndarray = expit(logits)
        return probabilities
    return logits


@dataclass
class StageOutput:
    """A stage's probabilities on (a box of) its grid, or per-component vectors."""

    stage: Stage
    box: Box | None = None
    probabilities: np.ndarray | None = None  # (C, z, y, x) on box
    vectors: list[np.ndarray] = field(default_factory=list)  # classification: one per component
    skipped: str | None = None
    seconds: float = 0.0
    patches: int = 0

    def channel(self, name: str) -> np.ndarray:
        """The probability map of channel ``name`` on the stage box."""
        assert self.probabilities is not None
        probabilities: np.ndarray = self.probabilities[self.stage.channels.index(name)]
        return probabilities

    def decision(self, names: tuple[str, ...], voxel_mm3: float) -> npt.NDArray[np.bool_]:
        """Boolean map on the stage box: each label's probability >= its threshold, small components dropped."""
        assert self.probabilities is not None
        out = np.zeros(self.probabilities.shape[1:], dtype=bool)
        for name in names:
            rule = self.stage.rule(name)
            mask = self.channel(name) >= rule.threshold
            if rule.min_component_mm3 > 0 and mask.any():
                labels, count = ndimage.label(mask)
                sizes = np.bincount(labels.ravel()) * voxel_mm3
                keep = sizes >= rule.min_component_mm3
                keep[0] = False
                mask = keep[labels]
            out |= mask
        return out


class CascadeRunner:
    """Runs every stage of one bundle on one volume."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def run_segmentation(self, stage: Stage, grids: VolumeGrids, box: Box) -> tuple[np.ndarray, int]:
        """The stage's probabilities (C, z, y, x) on ``box``, and how many patches the model ran on."""
        session = self.bundle.sessions[stage.artifact]
        hu = grids.at(stage.target_spacing_mm)[box.slices]
        image = stage.intensity.apply(hu)[np.newaxis]  # (1, z, y, x)
        pad_value = float(stage.intensity.apply(np.array([-1024.0]))[0])
        sw = stage.sliding_window
        channels = len(stage.channels)
        inside = tuple(slice(0, n) for n in image.shape[1:])  # the image within the padded grid
        if sw is None:
            divisor = stage.size_divisor
            padded_shape = [int(np.ceil(n / divisor) * divisor) for n in image.shape[1:]]
            padded = np.full((1, 1, *padded_shape), pad_value, dtype=np.float32)
            padded[0, 0][inside] = image[0]  # through a view of the first batch item and channel
            out = _activate(session.run(padded), stage.activation)[0]
            _check_channels(stage, out)
            return out[(slice(None), *inside)], 1
        patch = sw.patch_size
        shape = [max(n, p) for n, p in zip(image.shape[1:], patch)]
        padded = np.full((1, *shape), pad_value, dtype=np.float32)
        padded[0][inside] = image[0]
        weights = gaussian_importance(patch) if sw.gaussian else np.ones(patch, dtype=np.float32)
        total = np.zeros((channels, *shape), dtype=np.float32)
        norm = np.zeros(shape, dtype=np.float32)
        corners = list(itertools.product(*[_starts(n, p, sw.overlap) for n, p in zip(shape, patch)]))
        flips = [combo for r in range(len(sw.mirror_axes) + 1) for combo in itertools.combinations(sw.mirror_axes, r)]
        for i in range(0, len(corners), sw.batch_size):
            chunk = corners[i:i + sw.batch_size]
            batch = np.stack([padded[(slice(None), *[slice(c, c + p) for c, p in zip(corner, patch)])]
                              for corner in chunk])
            summed: np.ndarray | None = None
            for axes in flips:
                spatial = tuple(2 + a for a in axes)
                inp = np.flip(batch, axis=spatial) if axes else batch
                out = _activate(session.run(np.ascontiguousarray(inp)), stage.activation)
                if axes:
                    out = np.flip(out, axis=spatial)
                summed = out if summed is None else summed + out
            assert summed is not None  # flips always holds () (no mirroring)
            probs = summed / len(flips)
            _check_channels(stage, probs)
            for corner, p in zip(chunk, probs):
                where = tuple(slice(c, c + q) for c, q in zip(corner, patch))
                total[(slice(None), *where)] += p * weights
                norm[where] += weights
        total /= norm
        return total[(slice(None), *inside)], len(corners) * len(flips)

    def region_box(self, stage: Stage, grids: VolumeGrids, outputs: dict[str, StageOutput]) -> Box | None:
        """The stage's box on its grid: the whole volume, or the bounding box of an earlier stage's labels."""
        full = grids.full_box(stage.target_spacing_mm)
        if stage.region is None:
            return full
        earlier = outputs[stage.region.stage]
        if earlier.probabilities is None:
            return None
        box = earlier.box
        assert box is not None  # a stage with probabilities has their box
        voxel_mm3 = float(np.prod(box.step))
        mask = earlier.decision(stage.region.labels, voxel_mm3)
        if not mask.any():
            return None
        where = np.nonzero(mask)
        start: list[int] = []
        stop: list[int] = []
        for axis, idx in enumerate(where):
            lo_mm = (box.start[axis] + idx.min()) * box.step[axis] - stage.region.margin_mm
            hi_mm = (box.start[axis] + idx.max() + 1) * box.step[axis] + stage.region.margin_mm
            step = full.step[axis]
            a = max(0, int(np.floor(lo_mm / step)))
            b = min(full.grid_shape[axis], int(np.ceil(hi_mm / step)))
            start.append(a)
            stop.append(max(b, a + 1))
        shape = (stop[0] - start[0], stop[1] - start[1], stop[2] - start[2])
        return Box((start[0], start[1], start[2]), shape, full.grid_shape, full.extent_mm)

    def run(
        self,
        grids: VolumeGrids,
        components: Callable[[Stage, dict[str, StageOutput]], list[np.ndarray]] | None = None,
        timings: list[StageTiming] | None = None,
    ) -> dict[str, StageOutput]:
        """Every stage in manifest order. ``components(stage, outputs)`` gives, for a
        classification stage, the centres (mm in the LPS box) of the components to classify;
        each stage that ran appends its :class:`StageTiming` to ``timings``."""
        outputs: dict[str, StageOutput] = {}
        for stage in self.bundle.manifest.stages:
            start = time.perf_counter()
            if stage.gate is not None and stage.task == "segmentation":
                gate = outputs[stage.gate.stage]
                found = gate.probabilities is not None and gate.box is not None and gate.decision(
                    stage.gate.labels, float(np.prod(gate.box.step))).any()
                if not found:
                    outputs[stage.id] = StageOutput(
                        stage, skipped=f"gate: no {list(stage.gate.labels)} in {gate.stage.id}")
                    continue
            if stage.task == "segmentation":
                box = self.region_box(stage, grids, outputs)
                if box is None:
                    region = stage.region
                    assert region is not None  # only a region leaves a segmentation stage without a box
                    outputs[stage.id] = StageOutput(
                        stage, skipped=f"region: no {list(region.labels)} found by {region.stage}")
                    continue
                probs, patches = self.run_segmentation(stage, grids, box)
                outputs[stage.id] = StageOutput(stage, box, probs, patches=patches)
            else:
                centres = components(stage, outputs) if components else []
                vectors = self.classify(stage, grids, centres)
                outputs[stage.id] = StageOutput(stage, vectors=vectors, patches=len(centres),
                                                skipped=None if centres else "no components to classify")
            outputs[stage.id].seconds = time.perf_counter() - start
            if timings is not None:
                timings.append(StageTiming(stage.id, outputs[stage.id].seconds, self.bundle.manifest.id, model=True))
        return outputs

    def classify(self, stage: Stage, grids: VolumeGrids, centres_mm: list[np.ndarray]) -> list[np.ndarray]:
        """One probability vector per centre, from a patch of ``input.patch_size`` at the stage spacing."""
        if not centres_mm:
            return []
        patch = stage.patch_size
        assert patch is not None
        spacing = stage.target_spacing_mm
        extent = tuple(p * s for p, s in zip(patch, spacing))
        patches = []
        for centre in centres_mm:
            # A box on a virtual grid of the stage spacing whose voxel 0 starts at centre - extent/2.
            start_mm = [c - e / 2 for c, e in zip(centre, extent)]
            coords = [
                np.clip((s0 + (np.arange(p) + 0.5) * st) / src - 0.5, 0, n - 1)
                for s0, p, st, src, n in zip(start_mm, patch, spacing, grids.spacing, grids.shape)
            ]
            hu = grids.sample_at(coords, grids._smoothing(spacing))
            # Outside the scanned volume: air, not a repeated edge.
            for axis, (s0, p, st) in enumerate(zip(start_mm, patch, spacing)):
                centres_axis = s0 + (np.arange(p) + 0.5) * st
                outside = (centres_axis < 0) | (centres_axis > grids.extent_mm[axis])
                if outside.any():
                    index = [slice(None)] * 3
                    index[axis] = outside
                    hu[tuple(index)] = -1024.0
            patches.append(stage.intensity.apply(hu))
        session = self.bundle.sessions[stage.artifact]
        vectors: list[np.ndarray] = []
        batch_size = 16
        for i in range(0, len(patches), batch_size):
            batch = np.stack(patches[i:i + batch_size])[:, np.newaxis]
            out = _activate(session.run(batch.astype(np.float32)), stage.activation)
            out = out.reshape(out.shape[0], -1)
            if out.shape[1] != len(stage.channels):
                raise ModelError(f"{stage.id}: output has {out.shape[1]} values per patch, the manifest names "
                                 f"{len(stage.channels)} channels")
            vectors.extend(out)
        return vectors


def _check_channels(stage: Stage, out: np.ndarray) -> None:
    if out.shape[-4] != len(stage.channels):
        raise ModelError(
            f"stage {stage.id}: output has {out.shape[-4]} channels, the manifest names {len(stage.channels)}"
        )
