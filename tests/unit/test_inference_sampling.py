"""The bundle runtime, part 2: sliding-window inference, mirroring, orientation independence and
resampling between the source and model grids. Bundles come from :mod:`support.models`.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import ndimage

from pipelines.analysis import SeriesAnalyzer
from pipelines.clinical.findings import SegmentFinding
from pipelines.errors import ModelError
from pipelines.model.bundle import ModelBundle
from pipelines.model.inference import (
    Box,
    CascadeRunner,
    VolumeGrids,
    canonical_flips,
    gaussian_importance,
)
from pipelines.model.manifest import SlidingWindow
from pipelines.volume.ct import build_volume
from support.models import (
    CPU,
    IDENTITY,
    LESION_SPACING,
    FakeVolume,
    conv3_model,
    liver_phantom,
    manifest,
    ramp,
    segment,
    series,
    shift_model,
    stage,
    threshold_model,
    to_lps,
    write_bundle,
)

# =========================================================================== 2. sliding window


@pytest.fixture(scope="module")
def pointwise_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """Two sigmoid channels with gentle slopes (probabilities far from 0 and 1)."""
    data = manifest("pointwise", ["m"], [stage("s", "m", (1.0, 1.0, 1.0), ["a", "b"])], [segment(1, "A", "s", ["a"])])
    models = {"m": threshold_model([0.01, -0.004], [20.0, -150.0])}
    return ModelBundle(write_bundle(tmp_path_factory.mktemp("bundles") / "pointwise", models, data), providers=CPU)


def _noise_grids(shape: tuple[int, int, int] = (13, 17, 19), seed: int = 1) -> VolumeGrids:
    hu = np.random.default_rng(seed).normal(0, 300, shape).round()
    return VolumeGrids(FakeVolume(hu, (1.0, 1.0, 1.0)))  # type: ignore[arg-type]


def _windows(n: int, p: int, overlap: float) -> int:
    """Patches along one axis: enough starts that the step is at most p (1 - overlap)."""
    if n <= p:
        return 1
    return int(np.ceil((n - p) / (p * (1 - overlap)))) + 1


@pytest.mark.parametrize("patch", [(8, 8, 8), (5, 16, 7), (13, 17, 19), (20, 24, 22), (3, 4, 5)])
@pytest.mark.parametrize(("overlap", "gaussian", "batch"), [(0.5, True, 1), (0.25, False, 3), (0.5, False, 3),
                                                            (0.25, True, 2)])
def test_sliding_window_equals_the_whole_volume_for_a_pointwise_model(
    pointwise_bundle: ModelBundle, patch: tuple[int, int, int], overlap: float, gaussian: bool, batch: int
) -> None:
    grids = _noise_grids()
    base = pointwise_bundle.manifest.stages[0]
    runner = CascadeRunner(pointwise_bundle)
    box = grids.full_box(base.target_spacing_mm)
    whole, count = runner.run_segmentation(base, grids, box)
    assert count == 1 and whole.shape == (2, 13, 17, 19)
    x = np.clip(grids.hu, -1024, 3071)
    np.testing.assert_allclose(whole[0], 1 / (1 + np.exp(-0.01 * (x - 20))), atol=1e-6)
    windowed = dataclasses.replace(base, sliding_window=SlidingWindow(patch, overlap, gaussian, (), batch))
    probs, patches = runner.run_segmentation(windowed, grids, box)
    assert probs.shape == whole.shape
    np.testing.assert_allclose(probs, whole, atol=1e-5)
    assert patches == int(np.prod([_windows(n, p, overlap) for n, p in zip((13, 17, 19), patch)]))


def test_patch_count_and_mirroring_multiply(pointwise_bundle: ModelBundle) -> None:
    grids = _noise_grids()
    base = pointwise_bundle.manifest.stages[0]
    runner = CascadeRunner(pointwise_bundle)
    box = grids.full_box(base.target_spacing_mm)
    whole, _ = runner.run_segmentation(base, grids, box)
    # 13 -> starts 0, 2, 5; 17 -> 0, 3, 6, 9; 19 -> 0, 4, 7, 11: 48 patches.
    windowed = dataclasses.replace(base, sliding_window=SlidingWindow((8, 8, 8), 0.5, True, (), 4))
    assert runner.run_segmentation(windowed, grids, box)[1] == 48
    for axes in ((2,), (0, 1), (0, 1, 2)):
        mirrored = dataclasses.replace(base, sliding_window=SlidingWindow((8, 8, 8), 0.5, True, axes, 4))
        probs, patches = runner.run_segmentation(mirrored, grids, box)
        assert patches == 48 * 2 ** len(axes)
        np.testing.assert_allclose(probs, whole, atol=1e-5)  # a pointwise model does not care


@pytest.mark.parametrize("divisor", [1, 8, 32])
def test_size_divisor_pads_and_crops_back(pointwise_bundle: ModelBundle, divisor: int) -> None:
    grids = _noise_grids()
    base = pointwise_bundle.manifest.stages[0]
    runner = CascadeRunner(pointwise_bundle)
    box = Box((2, 3, 4), (9, 11, 13), (13, 17, 19), grids.extent_mm)
    probs, count = runner.run_segmentation(dataclasses.replace(base, size_divisor=divisor), grids, box)
    assert count == 1 and probs.shape == (2, 9, 11, 13)
    x = np.clip(grids.hu[2:11, 3:14, 4:17], -1024, 3071)
    np.testing.assert_allclose(probs[1], 1 / (1 + np.exp(0.004 * (x + 150))), atol=1e-6)


def test_gaussian_importance_is_centred_and_positive() -> None:
    weights = gaussian_importance((9, 12, 7))
    assert weights.shape == (9, 12, 7) and weights.dtype == np.float32
    assert weights.max() == 1.0 and weights[4, 6, 3] == 1.0
    assert weights.min() > 0
    np.testing.assert_allclose(weights, weights[::-1, :, :], rtol=1e-6)  # odd axes: symmetric
    np.testing.assert_allclose(weights, weights[:, :, ::-1], rtol=1e-6)
    assert weights[0, 6, 3] < weights[2, 6, 3] < weights[4, 6, 3]


@pytest.fixture(scope="module")
def asymmetric_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBundle, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    weights = rng.normal(0, 1, (2, 1, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 1, 2).astype(np.float32)
    data = manifest("asymmetric", ["m"], [stage("s", "m", (1.0, 1.0, 1.0), ["a", "b"], activation="none",
                                                 scale=0.01)], [segment(1, "A", "s", ["a"])])
    folder = write_bundle(tmp_path_factory.mktemp("bundles") / "asymmetric", {"m": conv3_model(weights, bias)}, data)
    return ModelBundle(folder, providers=CPU), weights, bias


def _correlate(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ONNX Conv with zero padding 1, computed with scipy."""
    return np.stack([ndimage.correlate(x.astype(np.float64), weights[c, 0].astype(np.float64), mode="constant")
                     + bias[c] for c in range(weights.shape[0])])


@pytest.mark.parametrize("axes", [(2,), (0, 1), (0, 1, 2)])
def test_mirror_tta_averages_the_flipped_predictions(
    asymmetric_bundle: tuple[ModelBundle, np.ndarray, np.ndarray], axes: tuple[int, ...]
) -> None:
    """One patch covering a small volume: TTA = mean over mirror combinations of flip(model(flip(x)))."""
    bundle, weights, bias = asymmetric_bundle
    grids = _noise_grids((6, 7, 8), seed=3)
    x = grids.hu * 0.01
    base = bundle.manifest.stages[0]
    runner = CascadeRunner(bundle)
    box = grids.full_box(base.target_spacing_mm)
    plain = dataclasses.replace(base, sliding_window=SlidingWindow((6, 7, 8), 0.5, False, (), 1))
    single, count = runner.run_segmentation(plain, grids, box)
    assert count == 1
    np.testing.assert_allclose(single, _correlate(x, weights, bias), atol=1e-4)  # the model is what we think

    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    expected = np.mean([np.flip(_correlate(np.flip(x, axis=c), weights, bias), axis=tuple(1 + a for a in c))
                        for c in combos], axis=0)
    mirrored = dataclasses.replace(base, sliding_window=SlidingWindow((6, 7, 8), 0.5, False, axes, 1))
    probs, count = runner.run_segmentation(mirrored, grids, box)
    assert count == 2 ** len(axes)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert np.abs(probs - single).max() > 0.1  # the model is not mirror-symmetric: TTA changed the answer


# =========================================================================== 3. orientation


ORIENT_SHAPE = (12, 24, 27)
ORIENT_SPACING = (2.0, 1.0, 1.5)


@pytest.fixture(scope="module")
def orientation_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """coarse: HU > 40 on a 3x coarser in-plane grid; shifted: the (+1, +1, +1) neighbour > 40,
    on the source grid, inside coarse's box + 3 mm."""
    data = manifest(
        "orient", ["coarse", "shifted"],
        [stage("coarse", "coarse", (2.0, 3.0, 4.5), ["fg"]),
         stage("shifted", "shifted", ORIENT_SPACING, ["fg"],
               region={"stage": "coarse", "labels": ["fg"], "margin_mm": 3})],
        [segment(1, "Coarse", "coarse", ["fg"]), segment(2, "Shifted", "shifted", ["fg"])],
    )
    models = {"coarse": threshold_model([0.05], [40.0]), "shifted": shift_model(0.05, 40.0)}
    return ModelBundle(write_bundle(tmp_path_factory.mktemp("bundles") / "orient", models, data), providers=CPU)


def _orientation_phantom() -> np.ndarray:
    """Asymmetric content: an L-shaped block, a bar and a few bright specks in 0 HU, in air."""
    rng = np.random.default_rng(11)
    hu = np.full(ORIENT_SHAPE, -1000.0)
    hu[1:11, 2:22, 2:25] = 0.0
    hu[2:9, 4:14, 5:12] = 100.0
    hu[2:5, 14:20, 5:8] = 100.0
    hu[6:10, 16:19, 15:24] = 80.0
    for _ in range(6):
        hu[tuple(rng.integers(0, n) for n in ORIENT_SHAPE)] = 200.0
    return hu


@pytest.mark.parametrize(
    "orientation",
    [(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)],
    ids=["rows-right-to-left-head-first", "columns-posterior-to-anterior-head-first", "both-in-plane-flipped"],
)
def test_masks_are_the_same_in_patient_space_whatever_the_orientation(
    orientation_bundle: ModelBundle, orientation: tuple[float, ...]
) -> None:
    hu = _orientation_phantom()
    analyzer = SeriesAnalyzer(orientation_bundle)
    canonical = build_volume(series(hu, ORIENT_SPACING))
    assert canonical_flips(canonical) == (False, False, False)
    reference = analyzer.masks(canonical)
    volume = build_volume(series(hu, ORIENT_SPACING, orientation))
    # The helper wrote the same physical content: stored voxel 0 is where the canonical one is.
    index = tuple(n - 1 if f else 0 for n, f in zip(hu.shape, canonical_flips(volume)))
    np.testing.assert_allclose(volume.voxel_to_lps((0, 0, 0)), canonical.voxel_to_lps(index), atol=1e-6)
    np.testing.assert_array_equal(to_lps(volume.hu, orientation), canonical.hu)
    assert canonical_flips(volume) == tuple(s < 0 for s in (
        np.cross(orientation[:3], orientation[3:])[2], orientation[4], orientation[0]))

    masks = analyzer.masks(volume)
    for label in ("Coarse", "Shifted"):
        assert reference[label].sum() > 50
        np.testing.assert_array_equal(to_lps(masks[label], orientation), reference[label], err_msg=label)
    # The shift model reads the (+S, +P, +L) neighbour: voxel v is set where hu[v + (1, 1, 1)] is
    # bright in LPS order (inside coarse's box), i.e. the bright set moved one voxel to I, A and R.
    bright = hu > 40
    expected = np.zeros_like(bright)
    expected[:-1, :-1, :-1] = bright[1:, 1:, 1:]
    assert not np.any(reference["Shifted"] & ~expected)
    core = np.zeros_like(bright)
    core[2:9, 4:14, 5:12] = True
    assert np.all(reference["Shifted"][expected & np.roll(core, -1, axis=(0, 1, 2))])


@pytest.mark.parametrize(
    "orientation", [(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)],
    ids=["x-z-flipped", "x-y-flipped"])
def test_lesions_and_their_types_do_not_depend_on_the_orientation(
    lesion_bundle: ModelBundle, orientation: tuple[float, ...]
) -> None:
    hu = liver_phantom()
    hu[5:9, 40:44, 20:26] = 50.0  # a third, box-shaped lesion: not symmetric under any flip
    analyzer = SeriesAnalyzer(lesion_bundle)
    reference, ref_sites, _ = analyzer.findings(build_volume(series(hu, LESION_SPACING)))
    findings, sites, _ = analyzer.findings(build_volume(series(hu, LESION_SPACING, orientation)))
    assert len(reference) == 4 and ref_sites[0].status == sites[0].status == "present"
    assert sorted(_type(f) for f in findings) == sorted(_type(f) for f in reference)
    by_mask = {to_lps(f.mask, orientation).tobytes(): f for f in findings}
    for ref in reference:
        mine = by_mask[ref.mask.tobytes()]  # the same voxels in patient space
        assert (mine.lesion is None) == (ref.lesion is None)
        if ref.lesion is not None and mine.lesion is not None:
            assert mine.lesion.type == ref.lesion.type
            assert mine.lesion.score == pytest.approx(ref.lesion.score, abs=1e-6)
            np.testing.assert_allclose(list(mine.lesion.type_probabilities.values()),
                                       list(ref.lesion.type_probabilities.values()), atol=1e-5)


def test_transposed_axial_volume_is_refused_with_a_reason() -> None:
    """Rows along P, columns along L: axial, but the node does not transpose (documented limitation)."""
    volume = build_volume(series(np.zeros((10, 8, 8)), (2.0, 1.0, 1.0), IDENTITY))
    volume = dataclasses.replace(volume, row_direction=np.array([0.0, 1.0, 0.0]),
                                 column_direction=np.array([1.0, 0.0, 0.0]), slice_direction=np.array([0, 0, -1.0]))
    with pytest.raises(ModelError, match="rows and columns run along the patient's axes"):
        VolumeGrids(volume)


# =========================================================================== 4. resampling


RAMP_SHAPE = (9, 12, 15)
RAMP_SPACING = (2.0, 1.0, 0.8)
RAMP_SLOPE = (3.0, -2.0, 1.0)


@pytest.mark.parametrize(
    "target",
    [(2.0, 1.0, 0.8), (1.0, 0.5, 0.4), (2.6, 1.3, 1.04), (6.0, 3.0, 2.4), (2.0, 3.0, 0.8), (1.0, 3.0, 2.4)],
    ids=["same", "upsample-2x", "downsample-1.3x", "downsample-3x", "downsample-3x-one-axis", "mixed"],
)
def test_ramp_is_sampled_at_the_new_grid_centres(target: tuple[float, float, float]) -> None:
    grids = VolumeGrids(FakeVolume(ramp(RAMP_SHAPE, RAMP_SPACING, RAMP_SLOPE), RAMP_SPACING))  # type: ignore[arg-type]
    out = grids.at(target)
    shape = grids.grid_shape(target)
    assert out.shape == shape == tuple(int(round(n * s / t)) for n, s, t in zip(RAMP_SHAPE, RAMP_SPACING, target))
    assert out.dtype == np.float32
    step = [n * s / m for n, s, m in zip(RAMP_SHAPE, RAMP_SPACING, shape)]
    expected = ramp(shape, tuple(step), RAMP_SLOPE)  # type: ignore[arg-type]
    # Linear interpolation is exact on a ramp between the first and last source centres;
    # the box average of a 3x downsampling is centred on the new voxel: exact everywhere.
    inner = tuple(
        slice(None) if t / s > 1.5 else slice(int(np.ceil(s / 2 / t - 0.5)), m - int(np.ceil(s / 2 / t - 0.5)))
        for s, t, m in zip(RAMP_SPACING, step, shape)
    )
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    assert grids.at(target) is out  # cached


@pytest.mark.parametrize("factor", [2, 4])
def test_even_downsampling_is_not_shifted(factor: int) -> None:
    shape, spacing = (8, 8, 24), (1.0, 1.0, 1.0)
    grids = VolumeGrids(FakeVolume(ramp(shape, spacing, (0.0, 0.0, 10.0)), spacing))  # type: ignore[arg-type]
    out = grids.at((1.0, 1.0, float(factor)))
    expected = (np.arange(24 // factor) + 0.5) * factor * 10.0
    # The mean of the source voxels under each new voxel; away from the edges at least.
    np.testing.assert_allclose(out[0, 0, 1:-1], expected[1:-1], atol=1e-3)


def test_sample_on_a_sub_box() -> None:
    grids = VolumeGrids(FakeVolume(ramp(RAMP_SHAPE, RAMP_SPACING, RAMP_SLOPE), RAMP_SPACING))  # type: ignore[arg-type]
    full = grids.full_box((1.0, 0.5, 0.4))
    assert full.grid_shape == (18, 24, 30)
    box = Box((3, 5, 7), (4, 6, 8), full.grid_shape, full.extent_mm)
    out = grids.sample(box)
    assert out.shape == (4, 6, 8)
    np.testing.assert_allclose(out, grids.at((1.0, 0.5, 0.4))[box.slices], atol=1e-4)
    centres = [(np.arange(n) + s + 0.5) * st for n, s, st in zip(box.shape, box.start, box.step)]
    z, y, x = np.meshgrid(*centres, indexing="ij")
    np.testing.assert_allclose(out, 3 * z - 2 * y + x, atol=1e-3)


@pytest.mark.parametrize("factors", [(1, 2, 3), (1, 3, 3), (2, 1, 4)])
def test_to_source_maps_a_block_back_onto_source_voxels(factors: tuple[int, int, int]) -> None:
    shape, spacing = (12, 12, 24), (1.0, 1.5, 0.5)
    grids = VolumeGrids(FakeVolume(np.zeros(shape), spacing))  # type: ignore[arg-type]
    target = tuple(s * f for s, f in zip(spacing, factors))
    full = grids.full_box(target)  # type: ignore[arg-type]
    assert full.grid_shape == tuple(n // f for n, f in zip(shape, factors))
    box = Box((1, 1, 2), tuple(g - 2 for g in full.grid_shape), full.grid_shape, full.extent_mm)  # type: ignore[arg-type]
    # A constant block covers exactly the source voxels under the box.
    values, where = grids.to_source(np.ones(box.shape, dtype=np.float32), box)
    assert where == tuple(slice(s * f, (s + n) * f) for s, n, f in zip(box.start, box.shape, factors))
    assert values.shape == tuple(sl.stop - sl.start for sl in where) and np.all(values == 1)
    # A ramp on the model grid comes back as the ramp at the source centres, between the outer model centres.
    block = ramp(box.shape, box.step, (1.0, -2.0, 0.5))  # positions relative to the box corner
    values, where = grids.to_source(block.astype(np.float32), box)
    corner = [s * st for s, st in zip(box.start, box.step)]
    centres = [(np.arange(sl.start, sl.stop) + 0.5) * s - c for sl, s, c in zip(where, spacing, corner)]
    z, y, x = np.meshgrid(*centres, indexing="ij")
    expected = 1.0 * z - 2.0 * y + 0.5 * x
    inner = tuple(slice(f // 2, -(f // 2) or None) for f in factors)
    np.testing.assert_allclose(values[inner], expected[inner], atol=1e-4)


def test_to_source_of_a_model_grid_finer_than_the_source() -> None:
    grids = VolumeGrids(FakeVolume(np.zeros((6, 6, 6)), (2.0, 2.0, 2.0)))  # type: ignore[arg-type]
    full = grids.full_box((1.0, 1.0, 1.0))
    block = np.zeros(full.shape, dtype=np.float32)
    block[4:8, 4:8, 4:8] = 1.0  # exactly source voxels 2..3 on each axis
    values, where = grids.to_source(block, full)
    assert where == (slice(0, 6),) * 3
    expected = np.zeros((6, 6, 6))
    expected[2:4, 2:4, 2:4] = 1.0
    # Each source centre lies midway between the two fine voxels it covers: their mean, exactly.
    np.testing.assert_array_equal(values, expected)


def test_downsampling_averages_white_noise() -> None:
    """Anti-aliasing: a 3x3x3 mean of iid noise has its std divided by 3 ** 1.5."""
    noise = np.random.default_rng(5).normal(0, 100, (36, 36, 36))
    grids = VolumeGrids(FakeVolume(noise, (1.0, 1.0, 1.0)))  # type: ignore[arg-type]
    out = grids.at((3.0, 3.0, 3.0))
    assert out.shape == (12, 12, 12)
    ratio = noise.std() / out.std()
    assert 4.3 < ratio < 6.2, ratio  # 3 ** 1.5 = 5.2; plain interpolation would give about 1
    # Exactly the box means (the new centres fall on source voxels).
    np.testing.assert_allclose(out[3, 4, 5], noise[9:12, 12:15, 15:18].mean(), rtol=1e-4)
    # Downsampling by 1.3 (below the anti-aliasing factor) interpolates only.
    assert noise.std() / grids.at((1.3, 1.3, 1.3)).std() < 2.0


def _type(finding: SegmentFinding) -> str:
    """The lesion type the typing stage gave a finding ("" for an organ or an untyped lesion)."""
    return finding.lesion.type or "" if finding.lesion is not None else ""
