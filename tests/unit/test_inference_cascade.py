"""The bundle runtime, part 3: cascades (region crop and gate), lesions and their typing and site,
and analysing one volume with two bundles. Bundles come from :mod:`support.models`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.analysis import SeriesAnalyzer
from pipelines.clinical.results import BundleMeasurements
from pipelines.model.bundle import ModelBundle
from pipelines.model.inference import CascadeRunner, VolumeGrids
from pipelines.timing import StageTiming
from pipelines.volume.ct import build_volume
from support.data import REPO
from support.models import (
    BLOB_A,
    BLOB_B,
    BLOB_RADIUS_MM,
    CPU,
    LESION_SHAPE,
    LESION_SPACING,
    TYPE_A,
    TYPE_T,
    TYPING_PATCH,
    ball,
    band_probability,
    lesion_manifest,
    lesion_models,
    liver_phantom,
    manifest,
    segment,
    series,
    sigmoid,
    stage,
    threshold_model,
    write_bundle,
)

# =========================================================================== 5. region crop and gate


CROP_SHAPE = (12, 48, 48)
CROP_SPACING = (2.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def crop_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """coarse: organ (HU > 50) and bone (HU > 1000) on a 3 mm in-plane grid, organ components below
    100 mm3 dropped; fine: 'everything' inside coarse's organ box + 3 mm; gated stages after."""
    everything = threshold_model([0.05], [-2000.0])  # every voxel (HU >= -1024) has probability ~1
    data = manifest(
        "crop", ["coarse", "all"],
        [
            stage("coarse", "coarse", (2.0, 3.0, 3.0), ["organ", "bone"],
                  labels={"organ": {"threshold": 0.5, "min_component_mm3": 100}}),
            stage("fine", "all", (2.0, 2.0, 2.0), ["all"], region={"stage": "coarse", "labels": ["organ"],
                                                                    "margin_mm": 3}),
            stage("boned", "all", (2.0, 2.0, 2.0), ["all"], gate={"stage": "coarse", "labels": ["bone"]}),
            stage("organed", "all", (2.0, 2.0, 2.0), ["all"], gate={"stage": "coarse", "labels": ["organ", "bone"]}),
            stage("nested", "all", (2.0, 1.0, 1.0), ["all"], region={"stage": "fine", "labels": ["all"]}),
        ],
        [segment(1, "Organ", "coarse", ["organ"]), segment(2, "Box", "fine", ["all"]),
         segment(3, "Boned", "boned", ["all"]), segment(4, "Organed", "organed", ["all"]),
         segment(5, "Nested", "nested", ["all"])],
    )
    models = {"coarse": threshold_model([0.2, 0.2], [50.0, 1000.0]), "all": everything}
    return ModelBundle(write_bundle(tmp_path_factory.mktemp("bundles") / "crop", models, data), providers=CPU)


def _crop_phantom(organ: bool = True) -> np.ndarray:
    hu = np.zeros(CROP_SHAPE)
    if organ:
        hu[3:9, 15:33, 18:36] = 100.0  # on the 3 mm grid: rows 5..10, columns 6..11
    hu[5, 39:42, 3:6] = 100.0  # one coarse voxel (18 mm3): below min_component_mm3
    return hu


def test_region_crop_runs_only_on_the_box_of_the_earlier_labels(crop_bundle: ModelBundle) -> None:
    volume = build_volume(series(_crop_phantom(), CROP_SPACING))
    outputs = CascadeRunner(crop_bundle).run(VolumeGrids(volume))
    coarse = outputs["coarse"]
    assert coarse.box is not None and coarse.box.start == (0, 0, 0) and coarse.box.shape == (12, 16, 16)
    assert coarse.probabilities is not None and coarse.probabilities.shape == (2, 12, 16, 16)
    organ = coarse.decision(("organ",), 18.0)
    assert np.argwhere(organ).min(axis=0).tolist() == [3, 5, 6]
    assert np.argwhere(organ).max(axis=0).tolist() == [8, 10, 11]
    assert coarse.channel("organ")[5, 13, 1] > 0.5 and not organ[5, 13, 1]  # the speck: too small
    # mm box of the organ: z 6..18, y 15..33, x 18..36; plus 3 mm; on the 2 mm grid of 'fine'.
    fine = outputs["fine"]
    assert fine.skipped is None and fine.box is not None
    assert (fine.box.start, fine.box.shape) == ((1, 6, 7), (10, 12, 13))
    assert fine.box.grid_shape == (12, 24, 24) and fine.box.extent_mm == (24.0, 48.0, 48.0)
    assert fine.probabilities is not None and fine.probabilities.shape == (1, 10, 12, 13)
    # A gate on an empty label skips; on a found one (any of its labels) runs on the whole grid.
    assert outputs["boned"].skipped == "gate: no ['bone'] in coarse" and outputs["boned"].probabilities is None
    assert outputs["organed"].skipped is None and outputs["organed"].box.shape == (12, 24, 24)  # type: ignore[union-attr]

    # A region on a cropped stage: its box in mm (z 2..22, y 12..36, x 14..40), on the source grid.
    nested = outputs["nested"]
    assert (nested.box.start, nested.box.shape) == ((1, 12, 14), (10, 24, 26))  # type: ignore[union-attr]

    masks = SeriesAnalyzer(crop_bundle).masks(volume)
    expected = np.zeros(CROP_SHAPE, dtype=bool)
    expected[1:11, 12:36, 14:40] = True  # the source voxels whose centres lie in the box
    np.testing.assert_array_equal(masks["Box"], expected)
    np.testing.assert_array_equal(masks["Nested"], expected)
    assert not masks["Boned"].any()
    assert masks["Organed"].all()
    # The coarse organ mapped back (linear): the block, but for its in-plane corners (0.67 * 0.67 < 0.5).
    organ_mask = np.zeros(CROP_SHAPE, dtype=bool)
    organ_mask[3:9, 15:33, 18:36] = True
    corners = organ_mask & ~ndimage.binary_erosion(organ_mask, np.ones((1, 3, 3)), border_value=1)
    corners &= ndimage.binary_erosion(organ_mask, np.ones((1, 3, 1)), border_value=1) ^ organ_mask
    corners &= ndimage.binary_erosion(organ_mask, np.ones((1, 1, 3)), border_value=1) ^ organ_mask
    np.testing.assert_array_equal(masks["Organ"][:, :, 12:], (organ_mask & ~corners)[:, :, 12:])
    assert masks["Organ"][5, 39:42, 3:6].sum() == 5  # the speck (a plus sign): the segment has no size rule


def test_stage_is_skipped_when_its_region_is_empty(crop_bundle: ModelBundle) -> None:
    volume = build_volume(series(_crop_phantom(organ=False), CROP_SPACING))
    analyzer = SeriesAnalyzer(crop_bundle)
    outputs = CascadeRunner(crop_bundle).run(VolumeGrids(volume))
    assert outputs["fine"].skipped == "region: no ['organ'] found by coarse"
    assert outputs["fine"].box is None and outputs["fine"].probabilities is None and outputs["fine"].patches == 0
    assert outputs["organed"].skipped == "gate: no ['organ', 'bone'] in coarse"
    assert outputs["nested"].skipped == "region: no ['all'] found by fine"  # a skipped stage is an empty region
    masks = analyzer.masks(volume)
    assert not masks["Box"].any() and not masks["Organed"].any() and not masks["Nested"].any()
    findings, sites, _ = analyzer.findings(volume)
    assert [f.label for f in findings] == ["Organ"]  # the speck: the segment has no size rule
    assert sites == []


def test_timings_name_each_stage(crop_bundle: ModelBundle) -> None:
    timings: list[StageTiming] = []
    CascadeRunner(crop_bundle).run(VolumeGrids(build_volume(series(_crop_phantom(), CROP_SPACING))), timings=timings)
    assert {t.label for t in timings} == {"model crop/coarse", "model crop/fine", "model crop/organed",
                                          "model crop/nested"}
    assert all(t.model and t.bundle == "crop" and t.seconds >= 0 for t in timings)


# =========================================================================== 6. lesions and typing


def _typing_vector(hu: np.ndarray, centre: tuple[int, int, int]) -> np.ndarray:
    """What the classifier sees: the (odd) patch centred on the blob's centre voxel, HU / 100."""
    half = [p // 2 for p in TYPING_PATCH]
    patch = hu[tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))]
    m = patch.mean() / 100.0
    solid = sigmoid(2 * TYPE_A * (m - TYPE_T))
    return np.array([solid, 1 - solid])


def test_two_lesions_are_found_typed_and_assigned_to_their_site(lesion_bundle: ModelBundle) -> None:
    hu = liver_phantom()
    volume = build_volume(series(hu, LESION_SPACING))
    findings, sites, measurements = SeriesAnalyzer(lesion_bundle).findings(volume)
    assert measurements == BundleMeasurements()
    assert [f.label for f in findings] == ["Organ", "liver lesion 1", "liver lesion 2"]
    assert [f.number for f in findings] == [1, 2, 3]
    organ, first, second = findings
    assert organ.role == "organ" and organ.lesion is None and not organ.cut_by_field_of_view
    organ_block = np.zeros(LESION_SHAPE, dtype=bool)
    organ_block[4:16, 16:48, 16:48] = True
    # The organ (found on a 3x coarser grid) is the block give or take a voxel of the coarse grid.
    assert organ.mask[organ_block].mean() > 0.97 and not np.any(organ.mask & ~ndimage.binary_dilation(
        organ_block, iterations=3))
    for finding, (centre, value) in zip((first, second), (BLOB_A, BLOB_B)):
        blob = ball(LESION_SHAPE, LESION_SPACING, centre, BLOB_RADIUS_MM)
        # The lesion stage runs on the source grid: exactly the blob.
        np.testing.assert_array_equal(finding.mask, blob)
        assert finding.voxel_count == blob.sum() and finding.volume_mm3 == pytest.approx(blob.sum() * 2.0)
        assert finding.mean_hu == pytest.approx(value)
        lesion = finding.lesion
        assert lesion is not None and lesion.site == "liver" and finding.role == "lesion"
        assert lesion.score == pytest.approx(band_probability(value), abs=1e-5)
        assert lesion.long_axis_mm == pytest.approx(2 * BLOB_RADIUS_MM, abs=1.0)
        assert lesion.short_axis_mm == pytest.approx(2 * BLOB_RADIUS_MM, abs=1.0)
        np.testing.assert_allclose(lesion.centre_mm, (np.asarray(centre) + 0.5) * LESION_SPACING)
        vector = _typing_vector(hu, centre)
        probs = lesion.type_probabilities
        assert list(probs) == ["solid", "cystic"]
        np.testing.assert_allclose([probs["solid"], probs["cystic"]], vector, atol=1e-4)
        assert lesion.malignancy == pytest.approx(probs["solid"])
        assert finding.category.meaning == "Morphologically Abnormal Structure"
        assert finding.finding_site is not None and finding.finding_site.meaning == "Liver"
        assert finding.tracking_id == f"{finding.label} (tiny-liver)"
    assert first.lesion is not None and second.lesion is not None
    assert first.lesion.type == "cystic" and first.type.meaning == "Cystic lesion"
    assert second.lesion.type == "solid" and second.type.meaning == "Solid lesion"
    assert len({f.tracking_uid for f in findings}) == 3

    (site,) = sites
    assert (site.site, site.status, site.reason) == ("liver", "present", "")
    assert site.score == pytest.approx(band_probability(60.0), abs=1e-5)  # the higher of the two
    assert site.finding.meaning == "Malignant tumour of liver"
    assert [text.split(" mm")[0] for text in site.lesion_labels] == ["liver lesion 1 12", "liver lesion 2 12"]
    assert site.lesion_labels[0].endswith("cystic") and site.lesion_labels[1].endswith("solid")
    assert site.line().startswith("liver: lesion present (score 0.95;")


def test_the_typing_stage_sees_the_patches_it_should(lesion_bundle: ModelBundle) -> None:
    volume = build_volume(series(liver_phantom(), LESION_SPACING))
    analyzer = SeriesAnalyzer(lesion_bundle)
    run = analyzer.run_bundle(lesion_bundle, VolumeGrids(volume), volume, [])
    typing = run.outputs["typing"]
    assert typing.skipped is None and typing.patches == 2 and len(typing.vectors) == 2
    lesion = run.outputs["lesion"]
    # The lesion stage ran on the organ's box (+4 mm) with a sliding window of 8x32x32.
    assert lesion.box is not None and lesion.box.grid_shape == LESION_SHAPE
    assert lesion.box.shape[1] < 64 and lesion.box.start[1] > 0
    assert lesion.patches > 1
    for vector, (centre, _) in zip(typing.vectors, (BLOB_A, BLOB_B)):
        np.testing.assert_allclose(vector, _typing_vector(liver_phantom(), centre), atol=1e-4)


def test_classification_patch_outside_the_volume_reads_air(lesion_bundle: ModelBundle) -> None:
    hu = liver_phantom()
    grids = VolumeGrids(build_volume(series(hu, LESION_SPACING)))
    typing = lesion_bundle.manifest.stage("typing")
    centre = (1, 30, 2)  # the 5x9x9 patch reaches 1 slice below the first and 2 columns right of the first
    (vector,) = CascadeRunner(lesion_bundle).classify(typing, grids, [(np.asarray(centre) + 0.5) * LESION_SPACING])
    padded = np.pad(hu, 4, constant_values=-1024.0)
    patch = padded[tuple(slice(c + 4 - p // 2, c + 4 + p // 2 + 1) for c, p in zip(centre, TYPING_PATCH))]
    assert (patch == -1024).sum() == 81 + 5 * 9 * 2 - 9 * 2  # the slice below, the two columns right
    solid = sigmoid(2 * TYPE_A * (patch.mean() / 100 - TYPE_T))
    np.testing.assert_allclose(vector, [solid, 1 - solid], atol=1e-5)
    assert CascadeRunner(lesion_bundle).classify(typing, grids, []) == []


def test_organ_without_lesion_is_absent(lesion_bundle: ModelBundle) -> None:
    volume = build_volume(series(liver_phantom(blobs=False), LESION_SPACING))
    findings, sites, _ = SeriesAnalyzer(lesion_bundle).findings(volume)
    assert [f.label for f in findings] == ["Organ"]
    assert [(s.site, s.status, s.score) for s in sites] == [("liver", "absent", 0.0)]
    assert sites[0].line() == "liver: no lesion (best candidate score 0.00)"


def test_organ_cut_by_the_first_slice_without_lesion_is_not_evaluable(lesion_bundle: ModelBundle) -> None:
    volume = build_volume(series(liver_phantom(blobs=False, organ_z=(0, 12)), LESION_SPACING))
    findings, sites, _ = SeriesAnalyzer(lesion_bundle).findings(volume)
    assert findings[0].cut_by_field_of_view
    (site,) = sites
    assert site.status == "not evaluable" and "field of view" in site.reason and "organ" in site.reason


def test_organ_cut_by_the_field_of_view_with_a_lesion_is_still_present(lesion_bundle: ModelBundle) -> None:
    hu = liver_phantom(organ_z=(0, 16))
    findings, sites, _ = SeriesAnalyzer(lesion_bundle).findings(build_volume(series(hu, LESION_SPACING)))
    assert sites[0].status == "present" and len(findings) == 3


def test_missing_organ_is_not_evaluable(lesion_bundle: ModelBundle) -> None:
    analyzer = SeriesAnalyzer(lesion_bundle)
    volume = build_volume(series(liver_phantom(blobs=False, organ_z=None), LESION_SPACING))
    run = analyzer.run_bundle(lesion_bundle, VolumeGrids(volume), volume, [])
    assert run.outputs["lesion"].skipped == "region: no ['organ'] found by organ"
    assert run.outputs["typing"].skipped == "no components to classify"
    findings, sites, _ = analyzer.findings(volume)
    assert findings == []
    (site,) = sites
    assert site.status == "not evaluable" and site.reason == "organ not found in the field of view"
    assert site.line() == "liver: not evaluable (organ not found in the field of view)"


def test_site_threshold_and_minimum_diameter_drop_lesions(tmp_path: Path) -> None:
    data = lesion_manifest()
    data["lesions"]["sites"][0]["threshold"] = 0.9  # blob A scores 0.88, blob B 0.95
    bundle = ModelBundle(write_bundle(tmp_path / "t", lesion_models(), data), providers=CPU)
    findings, sites, _ = SeriesAnalyzer(bundle).findings(build_volume(series(liver_phantom(), LESION_SPACING)))
    assert [f.label for f in findings] == ["Organ", "liver lesion 1"]
    assert findings[1].lesion is not None and findings[1].lesion.type == "solid"  # blob B keeps its own typing vector
    assert sites[0].status == "present"
    data["lesions"]["sites"][0].update(threshold=0.5, min_diameter_mm=14)
    bundle = ModelBundle(write_bundle(tmp_path / "d", lesion_models(), data), providers=CPU)
    findings, sites, _ = SeriesAnalyzer(bundle).findings(build_volume(series(liver_phantom(), LESION_SPACING)))
    assert [f.label for f in findings] == ["Organ"] and sites[0].status == "absent"


def test_lesion_just_outside_the_organ_is_assigned_to_it(tmp_path: Path) -> None:
    """'A lesion at the organ's edge may have been left out of the organ mask; look 5 mm around it.'"""
    data = lesion_manifest()
    data["stages"][0]["input"]["target_spacing_mm"] = list(LESION_SPACING)  # organ edges exact on the source grid
    data["stages"][1]["region"]["margin_mm"] = 10
    bundle = ModelBundle(write_bundle(tmp_path / "b", lesion_models(), data), providers=CPU)
    hu = liver_phantom(blobs=False)
    hu[8:12, 28:34, 50:54] = 40.0  # 2 mm of 0 HU body (columns 48, 49) from the organ block's left face
    volume = build_volume(series(hu, LESION_SPACING))
    analyzer = SeriesAnalyzer(bundle)
    run = analyzer.run_bundle(bundle, VolumeGrids(volume), volume, [])
    organ = run.segment_masks()["Organ"]
    assert not organ[:, :, 48:].any() and organ[8:12, 28:34, 47].all()  # the lesion is 2 mm outside the organ
    lesion = run.outputs["lesion"]
    z0, y0, x0 = lesion.box.start  # type: ignore[union-attr]
    assert lesion.channel("lesion")[8 - z0:12 - z0, 28 - y0:34 - y0, 50 - x0:54 - x0].min() > 0.5  # and was detected
    findings, sites, _ = analyzer.findings(volume)
    assert [f.label for f in findings] == ["Organ", "liver lesion 1"]
    assert sites[0].status == "present"


def test_segments_of_stages_after_the_typing_stage_are_not_empty(tmp_path: Path) -> None:
    data = lesion_manifest()
    data["artifacts"].append({"id": "all", "file": "all.onnx", "sha256": "0" * 64})
    data["stages"].append(stage("late", "all", (2.0, 2.0, 2.0), ["all"]))
    data["segments"].append(segment(2, "Late", "late", ["all"]))
    models = {**lesion_models(), "all": threshold_model([0.05], [-2000.0])}
    bundle = ModelBundle(write_bundle(tmp_path / "late", models, data), providers=CPU)
    volume = build_volume(series(liver_phantom(), LESION_SPACING))
    run = SeriesAnalyzer(bundle).run_bundle(bundle, VolumeGrids(volume), volume, [])
    assert run.outputs["late"].skipped is None and run.outputs["late"].channel("all").min() > 0.99
    assert run.outputs["typing"].patches == 2
    assert run.segment_masks()["Late"].all()


# =========================================================================== 7. analyse with two bundles


@pytest.fixture(scope="module")
def body_lungs() -> ModelBundle:
    return ModelBundle(REPO / "onnx_models" / "body-lungs", providers=CPU)


def _walk(items: Any) -> list[Dataset]:
    out = []
    for item in items or []:
        out.append(item)
        out.extend(_walk(item.get("ContentSequence")))
    return out


def test_analyse_two_bundles_on_one_volume(body_lungs: ModelBundle, lesion_bundle: ModelBundle) -> None:
    volume = build_volume(series(liver_phantom(), LESION_SPACING))
    analyzer = SeriesAnalyzer([body_lungs, lesion_bundle])
    stages: list[str] = []
    result = analyzer.analyse(volume, progress=stages.append)
    assert stages == ["inference", "encode", "inference", "encode"]
    assert [b.bundle_id for b in result.bundles] == ["body-lungs", "tiny-liver"]
    assert result.model_key == f"{body_lungs.key}, {lesion_bundle.key}"
    objects = result.objects
    # SEG + SR per bundle, then the tiny bundle's key images (Secondary Capture, OT), one per lesion.
    assert [str(o.Modality) for o in objects] == ["SEG", "SR", "SEG", "SR"] + ["OT"] * (len(objects) - 4)
    key_images = objects[4:]
    assert key_images, "the tiny bundle reports lesions: one key image each"
    assert [int(o.SeriesNumber) for o in objects] == [9901, 9902, 9911, 9912] + [9913] * len(key_images)
    assert len({str(o.SOPInstanceUID) for o in objects}) == len(objects)
    assert len({str(o.SeriesInstanceUID) for o in objects}) == 5
    for bundle, seg, sr in ((body_lungs, objects[0], objects[1]), (lesion_bundle, objects[2], objects[3])):
        m = bundle.manifest
        for ds in (seg, sr):
            assert str(ds.StudyInstanceUID) == volume.study_instance_uid
            assert str(ds.SeriesDescription).startswith(f"AI {m.id} ")
            (equipment,) = [e for e in ds.ContributingEquipmentSequence
                            if str(e.get("ContributionDescription", "")).startswith("AI algorithm")]
            assert equipment.ContributionDescription == f"AI algorithm {m.id} version {m.version}"
            assert equipment.Manufacturer == m.manufacturer
            assert equipment.DeviceSerialNumber == bundle.algorithm_identity("0").device_uid
        assert {str(s.SegmentAlgorithmName) for s in seg.SegmentSequence} == {m.id}
        names = {str(item.TextValue) for item in _walk(sr.ContentSequence)
                 if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001"}
        assert names == {m.id}  # TID 4019 Algorithm Name
    assert [s.SegmentLabel for s in objects[0].SegmentSequence] == ["Body"]
    assert [s.SegmentLabel for s in objects[2].SegmentSequence] == ["Organ", "liver lesion 1", "liver lesion 2"]
    liver = result.bundles[1]
    assert liver.stages == {"organ": "ran", "lesion": "ran", "typing": "ran"}
    assert liver.summary()[0] == "tiny-liver: liver: lesion present, score 0.95, risk very high — abnormal: refer"
    assert result.bundles[0].summary()[0].startswith("body-lungs: Body ")
    assert {"eligibility", "total", "model tiny-liver/typing", "encode body-lungs"} <= {t.label for t in result.timings}

    again = SeriesAnalyzer([body_lungs, lesion_bundle]).analyse(volume)
    assert [(str(o.SeriesInstanceUID), str(o.SOPInstanceUID)) for o in again.objects] == [
        (str(o.SeriesInstanceUID), str(o.SOPInstanceUID)) for o in objects]
    swapped = SeriesAnalyzer([lesion_bundle, body_lungs]).analyse(volume)
    # UIDs follow the bundle, not its position; series numbers follow the position.
    assert {str(o.SOPInstanceUID) for o in swapped.objects} == {str(o.SOPInstanceUID) for o in objects}
    assert [int(o.SeriesNumber) for o in swapped.objects] == [9901, 9902] + [9903] * len(key_images) + [9911, 9912]


def test_two_bundles_with_one_id_are_refused(lesion_bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match="share an id"):
        SeriesAnalyzer([lesion_bundle, lesion_bundle])
    with pytest.raises(ValueError, match="at least one"):
        SeriesAnalyzer([])
