"""The bundle runtime on tiny constructed bundles whose answers are known by hand.

Every bundle here is built in a temporary folder with ``onnx.helper`` (IR 8,
opset 17) from graphs whose output is a closed-form function of the input:

- *threshold* models: a 1x1x1 Conv, channel c = k_c * (x - t_c), so that a
  sigmoid gives a known per-voxel probability (pointwise: any tiling or
  mirroring of the input must give the same answer);
- a *band* model: P(lesion) = sigmoid(k (x - lo)) * sigmoid(k (hi - x));
- a *shift* model: a 3x3x3 Conv that reads the neighbour at (+1, +1, +1), so
  the answer depends on which way the axes run;
- an *asymmetric* random 3x3x3 Conv, for mirror test-time augmentation;
- a *classifier*: the patch mean m, then logits (a (m - t), -a (m - t)).

Volumes are in-memory CT series (``series``) built from an array in canonical
LPS order (slice foot->head, row anterior->posterior, column right->left), in
any in-plane orientation, so results can be compared in patient space.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from conftest import REPO
from pipelines.model import bundle as model_module
from pipelines.analysis import SeriesAnalyzer
from pipelines.errors import ModelError
from pipelines.model.inference import (
    Box,
    CascadeRunner,
    VolumeGrids,
    canonical_flips,
    gaussian_importance,
)
from pipelines.model.manifest import MANIFEST_NAME, SlidingWindow, parse_manifest, schema_errors
from pipelines.model.bundle import ModelBundle, default_providers
from pipelines.volume.ct import build_volume

CPU = ["CPUExecutionProvider"]
IR_VERSION = 8
OPSET = 17
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# --------------------------------------------------------------------------- graphs


def onnx_model(
    nodes: list, initializers: list, *, input_name: str = "ct", output_name: str = "y",
    output_shape: tuple = ("n", "c", "d", "h", "w"),
) -> onnx.ModelProto:
    """A checked single-input, single-output model over NCZYX float32 (dynamic sizes)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 1, "d", "h", "w"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output_shape))],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pacs-ai-node tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _tensor(array: Any, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def threshold_model(slopes: list[float], thresholds: list[float], **names: str) -> onnx.ModelProto:
    """Channel c = slopes[c] * (x - thresholds[c]): a pointwise 1x1x1 Conv."""
    slopes_a = np.asarray(slopes, dtype=np.float32)
    w = slopes_a.reshape(-1, 1, 1, 1, 1)
    b = -slopes_a * np.asarray(thresholds, dtype=np.float32)
    inp, out = names.get("input_name", "ct"), names.get("output_name", "y")
    return onnx_model([helper.make_node("Conv", [inp, "w", "b"], [out])], [_tensor(w, "w"), _tensor(b, "b")], **names)


def band_model(lo: float, hi: float, k: float) -> onnx.ModelProto:
    """Channels (background, band): band = sigmoid(k (x - lo)) * sigmoid(k (hi - x)); already probabilities."""
    w = np.asarray([k, -k], dtype=np.float32).reshape(2, 1, 1, 1, 1)
    b = np.asarray([-k * lo, k * hi], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["ct", "w", "b"], ["edges"]),
        helper.make_node("Sigmoid", ["edges"], ["s"]),
        helper.make_node("ReduceProd", ["s"], ["band"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["one", "band"], ["rest"]),
        helper.make_node("Concat", ["rest", "band"], ["y"], axis=1),
    ]
    return onnx_model(nodes, [_tensor(w, "w"), _tensor(b, "b"), _tensor([1.0], "one")])


def conv3_model(weights: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A 3x3x3 Conv with zero padding 1 (cross-correlation, as ONNX defines Conv)."""
    node = helper.make_node("Conv", ["ct", "w", "b"], ["y"], pads=[1] * 6)
    return onnx_model([node], [_tensor(weights, "w"), _tensor(bias, "b")])


def shift_model(k: float, t: float) -> onnx.ModelProto:
    """One channel: k * (x[z+1, y+1, x+1] - t) (zero outside the input)."""
    w = np.zeros((1, 1, 3, 3, 3), dtype=np.float32)
    w[0, 0, 2, 2, 2] = k
    return conv3_model(w, np.asarray([-k * t]))


def classifier_model(a: float, t: float) -> onnx.ModelProto:
    """Patch mean m (over Z, Y, X), then logits (a (m - t), -a (m - t)): shape (N, 2)."""
    nodes = [
        helper.make_node("ReduceMean", ["ct"], ["m"], axes=[2, 3, 4], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["l"]),
        helper.make_node("Add", ["l", "b"], ["y"]),
    ]
    return onnx_model(nodes, [_tensor([[a, -a]], "w"), _tensor([-a * t, a * t], "b")], output_shape=("n", 2))


# --------------------------------------------------------------------------- manifests and bundles


def code(value: str, meaning: str, scheme: str = "SCT") -> dict[str, str]:
    return {"value": value, "scheme": scheme, "meaning": meaning}


ANATOMY = code("91723000", "Anatomical Structure")
LIVER = code("10200004", "Liver")


def stage(
    stage_id: str,
    artifact: str,
    spacing: tuple[float, float, float],
    channels: list[str],
    *,
    activation: str = "sigmoid",
    task: str = "segmentation",
    scale: float = 1.0,
    patch_size: tuple[int, int, int] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A stage reading HU * scale (clip -1024..3071) as input 'ct' and writing output 'y'."""
    data: dict[str, Any] = {
        "id": stage_id,
        "artifact": artifact,
        "task": task,
        "input": {
            "name": "ct", "axis_order": "NCZYX", "orientation": "LPS", "target_spacing_mm": list(spacing),
            "intensity": {"method": "window", "clip_hu": [-1024.0, 3071.0], "scale": scale, "offset_hu": 0.0},
        },
        "output": {"name": "y", "activation": activation, "channels": channels},
    }
    if patch_size is not None:
        data["input"]["patch_size"] = list(patch_size)
    data.update(extra)
    return data


def segment(number: int, label: str, stage_id: str, channels: list[str], **extra: Any) -> dict[str, Any]:
    data = {"number": number, "label": label, "stage": stage_id, "channels": channels,
            "category": ANATOMY, "type": code(f"9{number}000{number}", label)}
    data.update(extra)
    return data


def manifest(bundle_id: str, artifacts: list[str], stages: list[dict], segments: list[dict], **extra: Any) -> dict:
    data = {
        "schema_version": 2,
        "id": bundle_id,
        "version": "1.2.3",
        "name": f"Test bundle {bundle_id}",
        "manufacturer": "pacs-ai-node tests",
        "intended_use": "Unit tests of the runtime.",
        "regulatory_status": "Not a medical device.",
        "licence": "Apache-2.0",
        "authors": ["tests"],
        "artifacts": [{"id": a, "file": f"{a}.onnx", "sha256": "0" * 64} for a in artifacts],
        "stages": stages,
        "segments": segments,
    }
    data.update(extra)
    return data


def write_bundle(folder: Path, models: dict[str, onnx.ModelProto], data: dict[str, Any]) -> Path:
    """Write the artifacts and a manifest carrying their real sha256."""
    folder.mkdir(parents=True)
    data = copy.deepcopy(data)
    for artifact in data["artifacts"]:
        payload = models[artifact["id"]].SerializeToString()
        (folder / artifact["file"]).write_bytes(payload)
        artifact["sha256"] = hashlib.sha256(payload).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return folder


# The lesion bundle: organ (HU > 20, on a 3x coarser in-plane grid), lesion (25..75 HU,
# on the source grid, in the organ's box + 4 mm, sliding window), typing (patch mean).
ORGAN_K, ORGAN_T = 0.1, 20.0
BAND_LO, BAND_HI, BAND_K = 25.0, 75.0, 0.2
TYPE_A, TYPE_T = 10.0, 0.625  # solid when the patch mean exceeds 62.5 HU
TYPING_PATCH = (5, 9, 9)
SOLID = code("255203009", "Solid lesion")
CYSTIC = code("128501009", "Cystic lesion")


def lesion_manifest(**overrides: Any) -> dict[str, Any]:
    data = manifest(
        "tiny-liver",
        ["organ", "lesion", "typer"],
        [
            stage("organ", "organ", (2.0, 3.0, 3.0), ["organ"]),
            stage("lesion", "lesion", (2.0, 1.0, 1.0), ["background", "lesion"], activation="none",
                  region={"stage": "organ", "labels": ["organ"], "margin_mm": 4},
                  sliding_window={"patch_size": [8, 32, 32], "overlap": 0.5, "batch_size": 2}),
            stage("typing", "typer", (2.0, 1.0, 1.0), ["solid", "cystic"], activation="softmax",
                  task="classification", scale=0.01, patch_size=TYPING_PATCH,
                  gate={"stage": "lesion", "labels": ["lesion"]}),
        ],
        [segment(1, "Organ", "organ", ["organ"], postprocess={"largest_component": True}, finding_site=LIVER)],
        lesions={
            "stage": "lesion", "channel": "lesion", "typing_stage": "typing",
            "types": {"solid": SOLID, "cystic": CYSTIC}, "malignant_types": ["solid"],
            "sites": [{"site": "liver", "organ_segment": "Organ", "finding": code("93870000", "Malignant tumour of liver"),
                       "threshold": 0.5}],
        },
    )
    data.update(overrides)
    return copy.deepcopy(data)  # the codes are shared module constants


def lesion_models() -> dict[str, onnx.ModelProto]:
    return {
        "organ": threshold_model([ORGAN_K], [ORGAN_T]),
        "lesion": band_model(BAND_LO, BAND_HI, BAND_K),
        "typer": classifier_model(TYPE_A, TYPE_T),
    }


@pytest.fixture(scope="module")
def lesion_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    folder = write_bundle(tmp_path_factory.mktemp("bundles") / "tiny-liver", lesion_models(), lesion_manifest())
    return ModelBundle(folder, providers=CPU)


# --------------------------------------------------------------------------- volumes


def series(
    lps: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    orientation: tuple[float, ...] = IDENTITY,
    *,
    origin: tuple[float, float, float] = (-40.0, -30.0, -20.0),
    series_uid: str | None = None,
) -> list[Dataset]:
    """CT slices holding ``lps`` (canonical: slice +S, row +P, column +L, voxel (k, i, j) at
    ``origin + (j dx, i dy, k dz)``) stored in ``orientation``, in shuffled order.

    ``orientation`` must have its rows along +-x and its columns along +-y; the
    same physical content is written whatever the signs, so masks mapped back
    with :func:`to_lps` must match.
    """
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    signs = (np.sign(normal[2]), np.sign(col[1]), np.sign(row[0]))  # stored axis vs +S, +P, +L
    stored = to_lps(lps, orientation)
    nz, ny, nx = lps.shape
    dz, dy, dx = spacing_zyx
    first = [0 if s > 0 else n - 1 for s, n in zip(signs, lps.shape)]  # canonical index of stored voxel 0
    corner = np.asarray(origin) + np.asarray([first[2] * dx, first[1] * dy, first[0] * dz])
    study, frame_of_reference = generate_uid(), generate_uid()
    series_uid = series_uid or generate_uid()
    pixels = np.clip(np.round(stored) + 1024, 0, 4095).astype(np.uint16)
    datasets = []
    for k in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Inference", "INF-1", "19600101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101010", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "tests"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame_of_reference
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in corner + k * dz * normal]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.KVP = 120
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels[k].tobytes()
        datasets.append(ds)
    order = np.random.default_rng(nz).permutation(nz)
    return [datasets[i] for i in order]


def to_lps(array: np.ndarray, orientation: tuple[float, ...]) -> np.ndarray:
    """Volume order <-> canonical LPS order for the orientations :func:`series` writes (self-inverse)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    axes = [a for a, s in enumerate((normal[2], col[1], row[0])) if s < 0]
    return np.flip(array, axis=axes).copy() if axes else array


def ball(shape: tuple[int, ...], spacing: tuple[float, ...], centre: tuple[int, ...], radius_mm: float) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


LESION_SHAPE = (20, 64, 64)
LESION_SPACING = (2.0, 1.0, 1.0)
BLOB_A = ((10, 26, 26), 35.0)  # cystic (patch mean below 62.5 HU)
BLOB_B = ((10, 38, 38), 60.0)  # solid
BLOB_RADIUS_MM = 6.0


def liver_phantom(*, blobs: bool = True, organ_z: tuple[int, int] | None = (4, 16)) -> np.ndarray:
    """Air; a 0 HU body; a 150 HU organ block; optionally two 12 mm blobs of 35 and 60 HU in it."""
    hu = np.full(LESION_SHAPE, -1000.0)
    hu[:, 4:60, 4:60] = 0.0
    if organ_z is not None:
        hu[organ_z[0]:organ_z[1], 16:48, 16:48] = 150.0
    if blobs:
        for centre, value in (BLOB_A, BLOB_B):
            hu[ball(LESION_SHAPE, LESION_SPACING, centre, BLOB_RADIUS_MM)] = value
    return hu


def sigmoid(v: float) -> float:
    return float(1.0 / (1.0 + np.exp(-v)))


def band_probability(hu: float) -> float:
    return sigmoid(BAND_K * (hu - BAND_LO)) * sigmoid(BAND_K * (BAND_HI - hu))


class FakeVolume:
    """The three things VolumeGrids reads from a CTVolume, for pure resampling tests."""

    def __init__(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> None:
        self.hu = hu.astype(np.float32)
        self.spacing_zyx = spacing
        self.slice_direction = np.array([0.0, 0.0, 1.0])
        self.column_direction = np.array([0.0, 1.0, 0.0])
        self.row_direction = np.array([1.0, 0.0, 0.0])


def ramp(shape: tuple[int, int, int], spacing: tuple[float, float, float], slope: tuple[float, float, float]) -> np.ndarray:
    """sum_a slope[a] * (mm position of the voxel centre along axis a)."""
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(k * g for k, g in zip(slope, grids))


# =========================================================================== 1. manifest v2


def test_lesion_manifest_parses_into_stages_segments_and_lesions() -> None:
    m = parse_manifest(lesion_manifest(), "tiny/manifest.json")
    organ, lesion, typing = m.stages
    assert [s.id for s in m.stages] == ["organ", "lesion", "typing"]
    assert organ.region is None and organ.sliding_window is None and organ.size_divisor == 1
    assert lesion.region is not None and (lesion.region.stage, lesion.region.labels, lesion.region.margin_mm) == (
        "organ", ("organ",), 4.0)
    # Defaults the schema documents: gaussian on, no mirroring.
    assert lesion.sliding_window == SlidingWindow((8, 32, 32), 0.5, True, (), 2)
    assert typing.task == "classification" and typing.patch_size == TYPING_PATCH
    assert typing.gate is not None and typing.gate.labels == ("lesion",)
    assert lesion.rule("lesion").threshold == 0.5  # no labels entry: the default rule
    assert m.lesions is not None and m.lesions.typing_stage == "typing"
    assert m.lesions.types["cystic"].meaning == "Cystic lesion"
    assert m.lesions.site("liver").organ_segment == "Organ"
    assert m.segment("Organ").finding_site is not None
    np.testing.assert_allclose(typing.intensity.apply(np.array([-5000.0, 62.5, 9000.0])), [-10.24, 0.625, 30.71],
                               rtol=1e-6)


def _edit(path: str, value: Any = None, *, delete: bool = False) -> Callable[[dict], None]:
    """Change (or delete) the value at a dotted key path; list items by index."""

    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if delete:
            del node[key]
        else:
            node[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_edit("id", "Tiny Liver"), ["id:", "does not match"]),
        (_edit("artifacts.1.file", "lesion.pt"), ["artifacts.1.file", "does not match"]),
        (_edit("stages.0.task", "detection"), ["stages.0.task", "'detection'"]),
        (_edit("stages.1.sliding_window.overlap", 1), ["stages.1.sliding_window.overlap"]),
        (_edit("stages.1.sliding_window.mirror_axes", [0, 3]), ["stages.1.sliding_window.mirror_axes.1", "3"]),
        (_edit("stages.1.sliding_window.mirror_axes", [1, 1]), ["stages.1.sliding_window.mirror_axes", "non-unique"]),
        (_edit("stages.1.sliding_window.batch_size", 0), ["stages.1.sliding_window.batch_size"]),
        (_edit("stages.1.sliding_window.patch_size", [8, 32]), ["stages.1.sliding_window.patch_size"]),
        (_edit("stages.1.sliding_window.patch_size", [8, 0, 32]), ["stages.1.sliding_window.patch_size.1"]),
        (_edit("stages.1.sliding_window.patch_size", [8, 32.5, 32]), ["stages.1.sliding_window.patch_size.1"]),
        (_edit("stages.1.sliding_window.patch_size", None, delete=True),
         ["stages.1.sliding_window", "'patch_size' is a required property"]),
        (_edit("stages.1.region.labels", None, delete=True), ["stages.1.region", "'labels' is a required property"]),
        (_edit("stages.1.region.margin_mm", -1), ["stages.1.region.margin_mm"]),
        (_edit("stages.2.gate.labels", []), ["stages.2.gate.labels", "should be non-empty"]),
        (_edit("stages.2.input.patch_size", [5, 9]), ["stages.2.input.patch_size"]),
        (_edit("stages.0.labels", {"organ": {"threshold": 1.5}}), ["stages.0.labels.organ.threshold"]),
        (_edit("stages.0.labels", {"organ": {"min_size": 3}}), ["stages.0.labels.organ", "min_size"]),
        (_edit("stages.0.input.orientation", "RAS"), ["stages.0.input.orientation"]),
        (_edit("segments.0.role", "tumour"), ["segments.0.role", "'tumour'"]),
        (_edit("segments.0.finding_site", "liver"), ["segments.0.finding_site"]),
        (_edit("lesions.channel", None, delete=True), ["lesions", "'channel' is a required property"]),
        (_edit("lesions.sites.0.threshold", 0), ["lesions.sites.0.threshold"]),
        (_edit("lesions.sites.0.site", "the liver"), ["lesions.sites.0.site", "does not match"]),
        (_edit("lesions.sites", []), ["lesions.sites", "should be non-empty"]),
        (_edit("lesions.types.solid.value", ""), ["lesions.types.solid.value"]),
        (_edit("measurements", {"bone_density": {"vertebra_segment": "Organ"}}),
         ["measurements.bone_density", "'rib_segment' is a required property"]),
        (_edit("measurements", {"volume": {}}), ["measurements", "Additional properties", "'volume'"]),
    ],
)
def test_schema_errors_name_the_key_path(change: Callable[[dict], None], expected: list[str]) -> None:
    data = lesion_manifest()
    change(data)
    with pytest.raises(ModelError) as info:
        parse_manifest(data, "tiny/manifest.json")
    message = str(info.value)
    assert message.startswith("tiny/manifest.json: does not follow the manifest schema"), message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_edit("stages.1.artifact", "nope"), ["stages[1].artifact", "'nope' is not one of the artifacts"]),
        (_edit("artifacts.2.id", "organ"), ["artifacts: ids must be distinct"]),
        (_edit("stages.1.id", "organ"), ["stages[1].id", "already used"]),
        (_edit("stages.1.region.stage", "typing"), ["stages[1].region.stage", "'typing' is not an earlier stage"]),
        (_edit("stages.1.region.stage", "lesion"), ["stages[1].region.stage", "'lesion' is not an earlier stage"]),
        (_edit("stages.1.region.labels", ["liver"]), ["stages[1].region.labels", "['liver']", "stage 'organ'"]),
        (_edit("stages.2.gate.stage", "nowhere"), ["stages[2].gate.stage", "'nowhere'"]),
        (_edit("stages.2.gate.labels", ["background", "tumour"]), ["stages[2].gate.labels", "['tumour']"]),
        (_edit("stages.0.labels", {"liver": {"threshold": 0.4}}), ["stages[0].labels", "['liver']"]),
        (_edit("stages.0.input.intensity.clip_hu", [100, 100]), ["stages[0].input.intensity.clip_hu"]),
        (_edit("stages.2.input.patch_size", None, delete=True),
         ["stages[2].input.patch_size", "classification stage needs the patch"]),
        (_edit("stages.2.gate", None, delete=True), ["stages[2].gate", "classification stage runs once per component"]),
        (_edit("stages.2.sliding_window", {"patch_size": [8, 8, 8]}), ["stages[2].sliding_window"]),
        (_edit("segments.0.channels", ["organ", "spleen"]), ["segments[0].channels", "['spleen']", "stage 'organ'"]),
        (_edit("segments.0.stage", "typing"), ["segments[0].stage", "not a segmentation stage"]),
        (_edit("segments.0.postprocess", {"within": "Body"}), ["segments[0].postprocess.within", "'Body'"]),
        (_edit("lesions.stage", "typing"), ["lesions.stage", "not a segmentation stage"]),
        (_edit("lesions.channel", "tumour"), ["lesions.channel", "'tumour'", "stage 'lesion'"]),
        (_edit("lesions.typing_stage", "organ"), ["lesions.typing_stage", "'organ' is not a classification stage"]),
        (_edit("lesions.types", {"solid": SOLID}), ["lesions.types", "no code for typing channels ['cystic']"]),
        (_edit("lesions.malignant_types", ["malignant"]), ["lesions.malignant_types", "['malignant']"]),
        (_edit("lesions.sites.0.organ_segment", "Pancreas"),
         ["lesions.sites[0].organ_segment", "'Pancreas' is not a segment label"]),
        (_edit("lesions.sites", [{"site": "liver", "organ_segment": "Organ", "finding": LIVER, "threshold": 0.5}] * 2),
         ["lesions.sites", "distinct"]),
        (_edit("measurements", {"steatosis": {"liver_segment": "Liver"}}),
         ["measurements.steatosis.liver_segment", "'Liver' is not a segment label"]),
        (_edit("measurements", {"steatosis": {"liver_segment": "Organ", "spleen_segment": "Spleen"}}),
         ["measurements.steatosis.spleen_segment", "'Spleen'"]),
        (_edit("measurements", {"bone_density": {"vertebra_segment": "Organ", "rib_segment": "Ribs"}}),
         ["measurements.bone_density.rib_segment", "'Ribs'"]),
        (_edit("measurements", {"lung_nodules": {"site": "lung"}}),
         ["measurements.lung_nodules.site", "'lung' is not a lesions.sites entry"]),
    ],
)
def test_cross_reference_errors_name_the_key(change: Callable[[dict], None], expected: list[str]) -> None:
    data = lesion_manifest()
    assert not schema_errors(data)
    change(data)
    with pytest.raises(ModelError) as info:
        parse_manifest(data, "tiny/manifest.json")
    message = str(info.value)
    assert message.startswith("tiny/manifest.json: "), message
    for text in expected:
        assert text in message, message


def test_several_cross_reference_problems_are_reported_together() -> None:
    data = lesion_manifest()
    data["stages"][1]["artifact"] = "nope"
    data["lesions"]["sites"][0]["organ_segment"] = "Pancreas"
    with pytest.raises(ModelError) as info:
        parse_manifest(data, "m")
    assert "stages[1].artifact" in str(info.value) and "lesions.sites[0].organ_segment" in str(info.value)


@pytest.mark.parametrize(
    ("intensity", "key"),
    [
        ({"method": "clip_zscore", "clip_hu": [-100, 200], "mean_hu": 40}, "std_hu"),
        ({"method": "clip_zscore", "clip_hu": [-100, 200], "mean_hu": 40, "std_hu": 0}, "std_hu"),
        ({"method": "window", "clip_hu": [-100, 200], "scale": 0.01}, "offset_hu"),
    ],
    ids=["zscore-missing-std", "zscore-zero-std", "window-missing-offset"],
)
def test_intensity_error_names_the_offending_key(intensity: dict, key: str) -> None:
    data = lesion_manifest()
    data["stages"][0]["input"]["intensity"] = intensity
    with pytest.raises(ModelError) as info:
        parse_manifest(data, "m")
    message = str(info.value)
    assert "stages.0.input.intensity" in message
    assert key in message, message


def test_clip_zscore_reduces_to_a_linear_map() -> None:
    data = lesion_manifest()
    data["stages"][0]["input"]["intensity"] = {"method": "clip_zscore", "clip_hu": [-100, 200], "mean_hu": 40,
                                               "std_hu": 20}
    intensity = parse_manifest(data, "m").stages[0].intensity
    np.testing.assert_allclose(intensity.apply(np.array([-500.0, 40.0, 80.0, 900.0])), [-7.0, 0.0, 2.0, 8.0])


# =========================================================================== 8. ModelBundle


def test_bundle_loads_one_session_per_artifact(lesion_bundle: ModelBundle) -> None:
    assert set(lesion_bundle.sessions) == {"organ", "lesion", "typer"}
    assert lesion_bundle.providers == {a: "CPUExecutionProvider" for a in ("organ", "lesion", "typer")}
    assert lesion_bundle.provider == "CPUExecutionProvider"
    m = lesion_bundle.manifest
    assert lesion_bundle.key == f"tiny-liver@1.2.3+{m.combined_sha256[:16]}"
    expected = hashlib.sha256("".join(a.sha256 for a in m.artifacts).encode()).hexdigest()
    assert m.combined_sha256 == expected
    for artifact in m.artifacts:
        assert hashlib.sha256(lesion_bundle.paths[artifact.id].read_bytes()).hexdigest() == artifact.sha256


def test_tampered_artifact_is_refused(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "b", lesion_models(), lesion_manifest())
    path = folder / "lesion.onnx"
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0x01
    path.write_bytes(bytes(payload))
    for kwargs in ({}, {"verify_only": True}):
        with pytest.raises(ModelError) as info:
            ModelBundle(folder, providers=CPU, **kwargs)
        message = str(info.value)
        assert "lesion.onnx" in message and "does not match the manifest" in message


def test_verify_only_checks_hashes_without_sessions(tmp_path: Path) -> None:
    data = lesion_manifest()
    folder = write_bundle(tmp_path / "b", lesion_models(), data)
    # Bytes onnxruntime cannot load, with their true hash in the manifest.
    garbage = b"not an onnx model"
    (folder / "typer.onnx").write_bytes(garbage)
    written = json.loads((folder / MANIFEST_NAME).read_text())
    written["artifacts"][2]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (folder / MANIFEST_NAME).write_text(json.dumps(written))
    checked = ModelBundle(folder, verify_only=True)
    assert checked.sessions == {} and checked.providers == {}
    assert set(checked.paths) == {"organ", "lesion", "typer"}
    with pytest.raises(ModelError, match="typer.onnx: onnxruntime cannot load the model"):
        ModelBundle(folder, providers=CPU)


def test_require_gpu_is_refused_on_cpu(tmp_path: Path) -> None:
    folder = write_bundle(tmp_path / "b", lesion_models(), lesion_manifest())
    with pytest.raises(ModelError) as info:
        ModelBundle(folder, providers=CPU, require_gpu=True)
    message = str(info.value)
    assert "GPU execution provider is required" in message
    assert "'organ'" in message and "'lesion'" in message and "'typer'" in message


def test_default_providers_follow_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(model_module, "NVIDIA_DRIVER", tmp_path / "absent")
    assert default_providers(available) == ["CPUExecutionProvider"]
    driver = tmp_path / "version"
    driver.write_text("NVRM version: test\n")
    monkeypatch.setattr(model_module, "NVIDIA_DRIVER", driver)
    # onnxruntime-gpu lists TensorRT even without TensorRT's libraries: ask for it only when they load.
    monkeypatch.setattr(model_module, "tensorrt_libraries_present", lambda: False)
    assert default_providers(available) == available[1:]
    monkeypatch.setattr(model_module, "tensorrt_libraries_present", lambda: True)
    assert default_providers(available) == available
    assert default_providers(available, tensorrt=False) == available[1:]
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


class CudaLookalike:
    """A real CPU session that says it runs on CUDA and binds its output on the CPU instead."""

    def __init__(self, session: Any) -> None:
        self.inner = session
        self.calls: list[Any] = []

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self) -> Any:
        lookalike, binding = self, self.inner.io_binding()

        class Binding:
            inner = binding

            def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
                lookalike.calls.append(("input", name, array.flags.c_contiguous))
                binding.bind_cpu_input(name, array)

            def bind_output(self, name: str, device: str) -> None:
                lookalike.calls.append(("output", name, device))
                binding.bind_output(name, "cpu")

            def copy_outputs_to_cpu(self) -> list[np.ndarray]:
                return binding.copy_outputs_to_cpu()

        return Binding()

    def run_with_iobinding(self, binding: Any) -> None:
        self.calls.append("run")
        self.inner.run_with_iobinding(binding.inner)

    def run(self, *args: Any) -> Any:
        raise AssertionError("a GPU session must run through I/O binding")


def test_gpu_sessions_run_through_io_binding(lesion_bundle: ModelBundle) -> None:
    cpu = lesion_bundle.sessions["organ"]
    fake = CudaLookalike(cpu.session)
    gpu = model_module.ModelSession("organ", cpu.path, fake, cpu.input_name, cpu.output_name)
    assert gpu.provider == "CUDAExecutionProvider"
    batch = np.random.default_rng(2).normal(0, 100, (2, 1, 4, 8, 6)).astype(np.float32)[..., ::2]  # not contiguous
    np.testing.assert_allclose(gpu.run(batch), cpu.run(batch), rtol=1e-6)
    assert fake.calls == [("input", "ct", True), ("output", "y", "cuda"), "run"]
    with pytest.raises(ModelError, match="float32"):
        gpu.run(batch.astype(np.float64))


def test_stages_sharing_an_artifact_must_name_the_same_input_and_output(tmp_path: Path) -> None:
    data = manifest("shared", ["m"], [stage("a", "m", (2.0, 1.0, 1.0), ["fg"]), stage("b", "m", (2.0, 2.0, 2.0), ["fg"])],
                    [segment(1, "A", "a", ["fg"])])
    data["stages"][1]["output"]["name"] = "z"
    folder = write_bundle(tmp_path / "b", {"m": threshold_model([1.0], [0.0])}, data)
    with pytest.raises(ModelError, match="stage 'b' names input/output ct/z"):
        ModelBundle(folder, providers=CPU)


@pytest.mark.parametrize("where", ["whole", "sliding-window", "classification"])
def test_wrong_number_of_output_channels_fails_at_run_time(tmp_path: Path, where: str) -> None:
    """The manifest names three channels; the model gives two."""
    data = lesion_manifest()
    if where == "classification":
        data["stages"][2]["output"]["channels"] = ["solid", "cystic", "mixed"]
        data["lesions"]["types"]["mixed"] = SOLID
    else:
        data["stages"][1]["output"]["channels"] = ["background", "lesion", "other"]
        if where == "whole":
            del data["stages"][1]["sliding_window"]
    bundle = ModelBundle(write_bundle(tmp_path / "b", lesion_models(), data), providers=CPU)
    volume = build_volume(series(liver_phantom(), LESION_SPACING))
    with pytest.raises(ModelError) as info:
        SeriesAnalyzer(bundle).findings(volume)
    message = str(info.value)
    assert "2" in message and "the manifest names 3" in message
    assert ("typing" if where == "classification" else "lesion") in message


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
    expected = np.mean([np.flip(_correlate(np.flip(x, axis=c), weights, bias), axis=[1 + a for a in c])
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
    "orientation", [(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)], ids=["x-z-flipped", "x-y-flipped"])
def test_lesions_and_their_types_do_not_depend_on_the_orientation(
    lesion_bundle: ModelBundle, orientation: tuple[float, ...]
) -> None:
    hu = liver_phantom()
    hu[5:9, 40:44, 20:26] = 50.0  # a third, box-shaped lesion: not symmetric under any flip
    analyzer = SeriesAnalyzer(lesion_bundle)
    reference, ref_sites, _ = analyzer.findings(build_volume(series(hu, LESION_SPACING)))
    findings, sites, _ = analyzer.findings(build_volume(series(hu, LESION_SPACING, orientation)))
    assert len(reference) == 4 and ref_sites[0].status == sites[0].status == "present"
    assert sorted(f.extra.get("type", "") for f in findings) == sorted(f.extra.get("type", "") for f in reference)
    by_mask = {to_lps(f.mask, orientation).tobytes(): f for f in findings}
    for ref in reference:
        mine = by_mask[ref.mask.tobytes()]  # the same voxels in patient space
        assert mine.extra.get("type") == ref.extra.get("type")
        assert mine.extra.get("score", 0) == pytest.approx(ref.extra.get("score", 0), abs=1e-6)
        if "type_probabilities" in ref.extra:
            np.testing.assert_allclose(list(mine.extra["type_probabilities"].values()),
                                       list(ref.extra["type_probabilities"].values()), atol=1e-5)


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
    timings: dict[str, float] = {}
    CascadeRunner(crop_bundle).run(VolumeGrids(build_volume(series(_crop_phantom(), CROP_SPACING))), timings=timings)
    assert set(timings) == {"model crop/coarse", "model crop/fine", "model crop/organed", "model crop/nested"}
    assert all(t >= 0 for t in timings.values())


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
    assert measurements == {}
    assert [f.label for f in findings] == ["Organ", "liver lesion 1", "liver lesion 2"]
    assert [f.number for f in findings] == [1, 2, 3]
    organ, first, second = findings
    assert organ.extra["role"] == "organ" and not organ.extra["cut_by_field_of_view"]
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
        assert finding.extra["site"] == "liver" and finding.extra["role"] == "lesion"
        assert finding.extra["score"] == pytest.approx(band_probability(value), abs=1e-5)
        assert finding.extra["long_axis_mm"] == pytest.approx(2 * BLOB_RADIUS_MM, abs=1.0)
        assert finding.extra["short_axis_mm"] == pytest.approx(2 * BLOB_RADIUS_MM, abs=1.0)
        np.testing.assert_allclose(finding.extra["centre_mm"], (np.asarray(centre) + 0.5) * LESION_SPACING)
        vector = _typing_vector(hu, centre)
        probs = finding.extra["type_probabilities"]
        assert list(probs) == ["solid", "cystic"]
        np.testing.assert_allclose([probs["solid"], probs["cystic"]], vector, atol=1e-4)
        assert finding.extra["malignancy"] == pytest.approx(probs["solid"])
        assert finding.category.meaning == "Morphologically Abnormal Structure"
        assert finding.finding_site is not None and finding.finding_site.meaning == "Liver"
        assert finding.tracking_id == f"{finding.label} (tiny-liver)"
    assert first.extra["type"] == "cystic" and first.type.meaning == "Cystic lesion"
    assert second.extra["type"] == "solid" and second.type.meaning == "Solid lesion"
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
    run = analyzer.run_bundle(lesion_bundle, VolumeGrids(volume), volume, {})
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
    assert findings[0].extra["cut_by_field_of_view"]
    (site,) = sites
    assert site.status == "not evaluable" and "field of view" in site.reason and "organ" in site.reason


def test_organ_cut_by_the_field_of_view_with_a_lesion_is_still_present(lesion_bundle: ModelBundle) -> None:
    hu = liver_phantom(organ_z=(0, 16))
    findings, sites, _ = SeriesAnalyzer(lesion_bundle).findings(build_volume(series(hu, LESION_SPACING)))
    assert sites[0].status == "present" and len(findings) == 3


def test_missing_organ_is_not_evaluable(lesion_bundle: ModelBundle) -> None:
    analyzer = SeriesAnalyzer(lesion_bundle)
    volume = build_volume(series(liver_phantom(blobs=False, organ_z=None), LESION_SPACING))
    run = analyzer.run_bundle(lesion_bundle, VolumeGrids(volume), volume, {})
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
    assert findings[1].extra["type"] == "solid"  # blob B keeps its own typing vector
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
    run = analyzer.run_bundle(bundle, VolumeGrids(volume), volume, {})
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
    run = SeriesAnalyzer(bundle).run_bundle(bundle, VolumeGrids(volume), volume, {})
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
    assert {"eligibility", "total", "model tiny-liver/typing", "encode body-lungs"} <= set(result.timings)

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
