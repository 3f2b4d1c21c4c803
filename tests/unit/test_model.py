"""Model bundles: manifest validation, sha256 verification, reproducible build, and
what the body-lungs model actually segments (synthetic phantom and real CT).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.analysis import SeriesAnalyzer, check_eligibility
from pipelines.errors import ModelError, SeriesRejected
from pipelines.model.bundle import ModelBundle, discover_bundles, sha256_file
from pipelines.model.eligibility import floor_rules
from pipelines.model.manifest import MANIFEST_NAME, parse_manifest
from pipelines.rules.ruleset import RuleSet
from pipelines.volume.ct import CTVolume, build_volume, load_series
from support.data import REPO, abdomen_files
from support.series import ct_slice

MODELS = REPO / "onnx_models"
BUNDLE = MODELS / "body-lungs"
MANIFEST = BUNDLE / MANIFEST_NAME
CPU = ["CPUExecutionProvider"]


def manifest_data() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


@lru_cache(maxsize=1)
def bundle() -> ModelBundle:
    return ModelBundle(BUNDLE, providers=CPU)


@lru_cache(maxsize=1)
def abdomen_volume() -> CTVolume:
    return load_series(abdomen_files())


def load_build_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("body_lungs_build_model", BUNDLE / "build_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ct_series(
    hu: np.ndarray,
    pixel_spacing: float,
    slice_spacing: float,
    *,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Dataset]:
    """Classic CT Image datasets (in memory) holding ``hu[k]`` as slice k."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    stored = np.clip(np.round(hu) + 1024, 0, 4095).astype(np.uint16)
    datasets = []
    for k in range(hu.shape[0]):
        ds = ct_slice(stored[k], uids=(study, series, frame_of_reference), number=k + 1, orientation=orientation,
                      position=np.asarray([-100.0, -100.0, 0.0]) + k * slice_spacing * normal,
                      pixel_spacing=(pixel_spacing, pixel_spacing), thickness=slice_spacing)
        ds.Modality = modality
        ds.ImageType = list(image_type)
        datasets.append(ds)
    return datasets


# --------------------------------------------------------------------------- manifest


def test_committed_manifest_validates() -> None:
    m = parse_manifest(manifest_data(), str(MANIFEST))
    assert m.id == "body-lungs"
    assert [a.file for a in m.artifacts] == ["body_lungs.onnx"]
    stage = m.stage("body-lungs")
    assert stage.channels == ("air", "lung", "tissue", "edge")
    assert stage.activation == "none"  # the graph ends in a Softmax
    assert stage.target_spacing_mm == (3.0, 3.0, 3.0)
    assert [s.label for s in m.segments] == ["Body", "Lungs"]
    assert [s.number for s in m.segments] == [1, 2]
    assert m.segments[1].postprocess["within"] == "Body"
    assert m.segments[0].finding_site is None
    assert m.segments[1].finding_site is not None and m.segments[1].finding_site.meaning == "Lung"
    np.testing.assert_allclose(stage.intensity.apply(np.asarray([-2000.0, 0.0, 500.0, 5000.0])),
                               [-1.024, 0, 0.5, 3.071])


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return change


def _delete(path: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_delete("id"), ["(top level)", "'id' is a required property"]),
        (_delete("stages.0.input"), ["stages.0", "'input' is a required property"]),
        (_delete("artifacts.0.sha256"), ["artifacts.0", "'sha256'"]),
        (_delete("segments.0.label"), ["segments.0", "'label' is a required property"]),
        (_delete("segments.1.category.meaning"), ["segments.1.category", "'meaning'"]),
        (_set("schema_version", 1), ["schema_version must be 2"]),
        (_set("version", ""), ["version", "does not match"]),
        (_set("version", "1.0"), ["version", "does not match"]),
        (_set("stages.0.output.activation", "relu"), ["stages.0.output.activation", "'relu'"]),
        (_set("stages.0.output.channels", ["air", "air"]), ["stages.0.output.channels", "non-unique"]),
        (_set("stages.0.input.axis_order", "NZYXC"), ["stages.0.input.axis_order"]),
        (_set("stages.0.input.target_spacing_mm", [3.0, 0, 3.0]), ["stages.0.input.target_spacing_mm.1"]),
        (_set("stages.0.input.target_spacing_mm", "3"), ["stages.0.input.target_spacing_mm", "not of type"]),
        (_set("stages.0.input.intensity.clip_hu", [100, -100]), ["stages[0].input.intensity.clip_hu"]),
        (_set("stages.0.input.intensity.scale", "0.001"), ["stages.0.input.intensity", "not of type"]),
        (_set("stages.0.artifact", "other"), ["stages[0].artifact", "'other'"]),
        (_set("artifacts.0.sha256", "abc123"), ["artifacts.0.sha256", "does not match"]),
        (_set("segments.0.channels", ["tissue", "bone"]), ["segments[0].channels", "bone"]),
        (_set("segments.0.channels", []), ["segments.0.channels", "should be non-empty"]),
        (_set("segments.0.stage", "organs"), ["segments[0].stage", "'organs'"]),
        (_set("segments.1.postprocess.dilate_mm", 2), ["segments.1.postprocess", "dilate_mm"]),
        (_set("segments.0.postprocess.within", "Lungs"), ["segments[0].postprocess.within", "'Lungs'"]),
        (_set("segments.1.postprocess.within", "Liver"), ["segments[1].postprocess.within", "'Liver'"]),
        (_set("segments.1.postprocess.within", ["Body"]), ["segments.1.postprocess.within"]),
        (_set("segments.0.postprocess.largest_component", "yes"), ["segments.0.postprocess.largest_component"]),
        (_set("segments.1.postprocess.min_component_mm3", "big"), ["segments.1.postprocess.min_component_mm3"]),
        (_set("segments.1.postprocess.min_component_mm3", -5), ["segments.1.postprocess.min_component_mm3"]),
        (_set("segments.1.label", "Body"), ["segments[1].label", "'Body'"]),
        (_set("segments.1.number", 3), ["numbered 1..n", "[1, 3]"]),
        (_set("segments.0.number", True), ["segments.0.number", "not of type"]),
        (_set("segments", []), ["segments", "should be non-empty"]),
        (_set("segments.0", "Body"), ["segments.0", "not of type 'object'"]),
        (_set("extra_key", 1), ["Additional properties", "extra_key"]),
    ],
)
def test_manifest_errors_name_the_key(change: Callable[[dict], None], expected: list[str]) -> None:
    data = manifest_data()
    change(data)
    with pytest.raises(ModelError) as info:
        parse_manifest(data, "bundle/manifest.json")
    message = str(info.value)
    assert message.startswith("bundle/manifest.json")
    for text in expected:
        assert text in message, message


def test_unmodified_copy_still_validates_after_the_error_cases() -> None:
    data = manifest_data()
    original = copy.deepcopy(data)
    parse_manifest(data, "m")
    assert data == original  # validation does not modify its input


# --------------------------------------------------------------------------- bundle and artifact


def test_bundle_loads_and_verifies_sha256() -> None:
    b = bundle()
    data = manifest_data()
    sha = data["artifacts"][0]["sha256"]
    assert sha256_file(b.paths["body_lungs"]) == sha == b.manifest.artifacts[0].sha256
    assert b.provider == "CPUExecutionProvider"
    assert b.providers == {"body_lungs": "CPUExecutionProvider"}
    assert b.key == f"body-lungs@{data['version']}+{b.manifest.combined_sha256[:16]}"
    identity = b.algorithm_identity("9.9")
    assert identity.name == "body-lungs" and identity.software_version == "9.9"
    assert identity.device_uid == b.algorithm_identity("other").device_uid  # tied to the model, not the node


def copy_bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "body-lungs"
    shutil.copytree(BUNDLE, folder)
    return folder


def test_tampered_model_is_refused(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    model = folder / "body_lungs.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        ModelBundle(folder, providers=CPU)
    message = str(info.value)
    assert "sha256" in message and "does not match" in message
    assert manifest_data()["artifacts"][0]["sha256"] in message


def test_manifest_naming_an_input_the_model_lacks_is_refused(tmp_path: Path) -> None:
    folder = copy_bundle(tmp_path)
    data = manifest_data()
    data["stages"][0]["input"]["name"] = "image"
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelError) as info:
        ModelBundle(folder, providers=CPU)
    assert "no input named 'image'" in str(info.value)


def test_bundle_without_manifest_or_artifact_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no manifest.json"):
        ModelBundle(tmp_path, providers=CPU)
    folder = copy_bundle(tmp_path)
    (folder / "body_lungs.onnx").unlink()
    with pytest.raises(ModelError, match="'body_lungs.onnx' not found"):
        ModelBundle(folder, providers=CPU)
    (folder / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelBundle(folder, providers=CPU)


def test_require_gpu_refuses_a_cpu_session() -> None:
    with pytest.raises(ModelError, match="GPU execution provider is required"):
        ModelBundle(BUNDLE, providers=CPU, require_gpu=True)


def test_discover_bundles(tmp_path: Path) -> None:
    assert BUNDLE in discover_bundles(MODELS)
    for name in ("zeta", "alpha"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST_NAME).write_text("{}")
    (tmp_path / "not-a-bundle").mkdir()
    (tmp_path / "stray.json").write_text("{}")
    assert discover_bundles(tmp_path) == [tmp_path / "alpha", tmp_path / "zeta"]
    with pytest.raises(ModelError, match="does not exist"):
        discover_bundles(tmp_path / "missing")


def test_build_script_reproduces_the_committed_model_byte_for_byte() -> None:
    module = load_build_script()
    built = module.build_model()
    data = built.SerializeToString()
    committed = (BUNDLE / "body_lungs.onnx").read_bytes()
    assert data == committed
    assert hashlib.sha256(data).hexdigest() == manifest_data()["artifacts"][0]["sha256"]
    # Deterministic: a second build gives the same bytes.
    assert module.build_model().SerializeToString() == data


def test_committed_model_is_readable_by_onnxruntime() -> None:
    model = onnx.load(str(BUNDLE / "body_lungs.onnx"))
    assert model.ir_version <= 13
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    onnx.checker.check_model(model)
    stage = manifest_data()["stages"][0]
    assert [i.name for i in model.graph.input] == [stage["input"]["name"]]
    assert [o.name for o in model.graph.output] == [stage["output"]["name"]]


def test_session_checks_its_input() -> None:
    session = bundle().sessions["body_lungs"]
    with pytest.raises(ModelError, match="float32"):
        session.run(np.zeros((1, 1, 4, 4, 4), dtype=np.float64))
    out = session.run(np.zeros((1, 1, 4, 5, 6), dtype=np.float32))
    assert out.shape == (1, 4, 4, 5, 6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # softmax over channels


def test_model_channels_on_homogeneous_tissue_and_lung() -> None:
    b = bundle()
    stage = b.manifest.stages[0]
    for hu, channel in ((0.0, "tissue"), (300.0, "tissue"), (-850.0, "lung")):
        x = stage.intensity.apply(np.full((1, 1, 5, 5, 5), hu, dtype=np.float32))
        probabilities = b.sessions["body_lungs"].run(x)[0, :, 2, 2, 2]
        assert stage.channels[int(np.argmax(probabilities))] == channel, (hu, probabilities)
        assert probabilities.max() > 0.98


# --------------------------------------------------------------------------- segmentation behaviour


def test_synthetic_phantom_body_and_lungs() -> None:
    """Air around a 0 HU cylinder holding a -850 HU sphere, on a 2 mm grid (resampled to 3 mm)."""
    n_slices, size, pixel, step = 40, 100, 2.0, 3.0
    z, y, x = np.meshgrid(
        np.arange(n_slices) * step, (np.arange(size) - size / 2 + 0.5) * pixel,
        (np.arange(size) - size / 2 + 0.5) * pixel, indexing="ij",
    )
    radius = np.hypot(y, x)
    distance = np.sqrt((z - 60) ** 2 + y**2 + (x - 15) ** 2)
    cylinder = radius <= 75
    sphere = distance <= 30  # 113 cm3 > min_component_mm3 (20 cm3)
    hu = np.full(z.shape, -1000.0)
    hu[cylinder] = 0
    hu[sphere] = -850
    hu += np.random.default_rng(0).normal(0, 20, hu.shape)
    volume = build_volume(ct_series(hu, pixel, step))
    assert volume.spacing_zyx == pytest.approx((3.0, 2.0, 2.0))

    analyzer = SeriesAnalyzer(bundle())
    masks = analyzer.masks(volume)
    assert masks["Body"].shape == volume.shape
    body, lungs = masks["Body"], masks["Lungs"]

    # Body: the whole cylinder, the lung-like region inside included (holes filled),
    # and nothing farther than two voxels outside it.
    assert not np.any((radius <= 73) & ~body)
    assert np.all(body[sphere])
    assert not np.any(body & (radius > 79))
    # Lungs: inside the -850 region, covering it but for the partial-volume rim.
    assert not np.any(lungs & ~sphere)
    assert not np.any((distance <= 24) & ~lungs)
    assert lungs.sum() > 0.6 * sphere.sum()

    findings, _, _ = analyzer.findings(volume)
    by_label = {f.label: f for f in findings}
    assert [f.number for f in findings] == [1, 2]
    assert by_label["Lungs"].mean_hu == pytest.approx(-850, abs=10)
    assert 0.6 * np.pi * 75**2 * 120 < by_label["Body"].volume_mm3 < 1.1 * np.pi * 75**2 * 120
    assert by_label["Lungs"].volume_mm3 == pytest.approx(lungs.sum() * volume.voxel_volume_mm3)


def test_small_lung_like_region_is_dropped() -> None:
    """A -850 HU pocket below min_component_mm3 (20 cm3) is no Lungs finding."""
    n_slices, size, step = 16, 60, 3.0
    z, y, x = np.meshgrid(
        np.arange(n_slices) * step, (np.arange(size) - size / 2 + 0.5) * step,
        (np.arange(size) - size / 2 + 0.5) * step, indexing="ij",
    )
    hu = np.full(z.shape, -1000.0)
    hu[np.hypot(y, x) <= 75] = 0
    hu[np.sqrt((z - 24) ** 2 + y**2 + x**2) <= 12] = -850  # about 7 cm3
    volume = build_volume(ct_series(hu, step, step))
    analyzer = SeriesAnalyzer(bundle())
    masks = analyzer.masks(volume)
    assert masks["Body"].sum() > 0
    assert not masks["Lungs"].any()
    assert [f.label for f in analyzer.findings(volume)[0]] == ["Body"]


def test_real_abdomen_body_and_lung_bases() -> None:
    volume = abdomen_volume()
    check_eligibility(volume)
    analyzer = SeriesAnalyzer(bundle())
    masks = analyzer.masks(volume)
    body, lungs = masks["Body"], masks["Lungs"]
    body_litres = body.sum() * volume.voxel_volume_mm3 / 1e6
    assert 15 < body_litres < 40
    assert not np.any(lungs & ~body)
    # Slices are sorted feet to head: the lung bases are in the top slices.
    assert lungs[-10:].sum() > 100
    assert volume.hu[lungs].mean() < -700
    # Every slice has body; the air corners of the field of view are not body.
    assert body.any(axis=(1, 2)).all()
    assert not body[:, 0, 0].any() and not body[:, -1, -1].any()


# --------------------------------------------------------------------------- eligibility

#: The packaged default rules' ``min_slices`` (pipelines/rules/default_rules.toml), which the floor uses.
MIN_SLICES = 10


def test_floor_is_the_default_rules_own() -> None:
    assert floor_rules().ids == ["modality_ct", "not_localizer", "axial", "min_slices"]
    default = {r.id: r for r in RuleSet.load().rules}
    assert all(rule == default[rule.id] for rule in floor_rules().rules)


def _phantom(n_slices: int = 12) -> np.ndarray:
    hu = np.full((n_slices, 16, 16), -1000.0)
    hu[:, 4:12, 4:12] = 40
    return hu


def test_eligible_axial_ct_passes() -> None:
    check_eligibility(build_volume(ct_series(_phantom(MIN_SLICES), 1.0, 2.0)))


@pytest.mark.parametrize(
    ("kwargs", "n_slices", "reason"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, 12, "localizer"),
        ({"modality": "MR"}, 12, 'not a ct series (modality = "mr")'),
        ({"modality": ""}, 12, "not a ct series (modality empty"),
        ({"orientation": (1, 0, 0, 0, 0, -1)}, 12, 'not an axial series (orientation = "coronal")'),
        ({"orientation": (0, 1, 0, 0, 0, -1)}, 12, 'not an axial series (orientation = "sagittal")'),
        ({}, MIN_SLICES - 1, f"too few slices (slice_count = {MIN_SLICES - 1})"),
    ],
    ids=["localizer", "mr", "no-modality", "coronal", "sagittal", "too-short"],
)
def test_ineligible_series_are_rejected(kwargs: dict, n_slices: int, reason: str) -> None:
    volume = build_volume(ct_series(_phantom(n_slices), 1.0, 2.0, **kwargs))
    with pytest.raises(SeriesRejected) as info:
        check_eligibility(volume)
    assert reason in info.value.reason.lower()


def test_slightly_oblique_axial_series_is_still_axial() -> None:
    a = np.deg2rad(15)  # gantry-angled acquisition resliced: normal 15 degrees off the z axis
    volume = build_volume(ct_series(_phantom(), 1.0, 2.0, orientation=(1, 0, 0, 0, np.cos(a), np.sin(a))))
    assert abs(volume.slice_direction[2]) == pytest.approx(np.cos(a))
    check_eligibility(volume)
