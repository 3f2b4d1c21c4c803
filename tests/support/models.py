"""Builders for the tests of the bundle runtime: tiny constructed bundles whose answers are known by hand.

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
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.model.bundle import ModelBundle
from pipelines.model.manifest import MANIFEST_NAME
from support.series import ct_slice

CPU = ["CPUExecutionProvider"]
IR_VERSION = 8
OPSET = 17
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# --------------------------------------------------------------------------- graphs


def onnx_model(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], *, input_name: str = "ct",
    output_name: str = "y", output_shape: tuple[str | int, ...] = ("n", "c", "d", "h", "w"),
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
    return onnx_model([helper.make_node("Conv", [inp, "w", "b"], [out])], [_tensor(w, "w"), _tensor(b, "b")],
                      input_name=inp, output_name=out)


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


def manifest(bundle_id: str, artifacts: list[str], stages: list[dict[str, Any]], segments: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
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
            "sites": [{"site": "liver", "organ_segment": "Organ",
                       "finding": code("93870000", "Malignant tumour of liver"), "threshold": 0.5}],
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
        ds = ct_slice(pixels[k], uids=(study, series_uid, frame_of_reference), number=k + 1,
                      orientation=orientation, position=corner + k * dz * normal, pixel_spacing=(dy, dx),
                      thickness=dz)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Inference", "INF-1", "19600101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101010", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "tests"
        ds.SeriesNumber = 3
        ds.KVP = 120
        datasets.append(ds)
    order = np.random.default_rng(nz).permutation(nz)
    return [datasets[i] for i in order]


def to_lps(array: np.ndarray, orientation: tuple[float, ...]) -> np.ndarray:
    """Volume order <-> canonical LPS order for the orientations :func:`series` writes (self-inverse)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    axes = [a for a, s in enumerate((normal[2], col[1], row[0])) if s < 0]
    return np.flip(array, axis=tuple(axes)).copy() if axes else array


def ball(shape: tuple[int, ...], spacing: tuple[float, ...], centre: tuple[int, ...], radius_mm: float) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return np.asarray(sum(g**2 for g in grids) <= radius_mm**2)


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


def ramp(shape: tuple[int, int, int], spacing: tuple[float, float, float],
         slope: tuple[float, float, float]) -> np.ndarray:
    """sum_a slope[a] * (mm position of the voxel centre along axis a)."""
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    return np.asarray(sum(k * g for k, g in zip(slope, grids)))


def load_lesion_bundle(root: Path) -> ModelBundle:
    """Write the lesion bundle (:func:`lesion_manifest`, :func:`lesion_models`) under ``root``; load it on the CPU."""
    return ModelBundle(write_bundle(root / "tiny-liver", lesion_models(), lesion_manifest()), providers=CPU)
