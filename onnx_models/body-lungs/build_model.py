"""Construct the body-and-lungs reference model as an ONNX graph.

This model is *constructed*, not trained: its weights are written down from
known CT physics, which makes its behaviour fully explainable and lets the node
run a real ONNX model end to end before trained models exist.

Graph (input ``ct``: float32 [N, 1, Z, Y, X], HU / 1000 after clipping):

1. ``AveragePool`` 3x3x3 (pads 1, pad excluded from the mean) of x and of
   x*x: the local mean s, which suppresses CT noise, and the local standard
   deviation d = sqrt(mean(x^2) - s^2), a texture feature; and
   w = |s - LUNG_CENTRE|, the distance from the density of aerated lung.
2. ``Conv`` 1x1x1 over (s, d, w), four output channels: linear logits
     air    ka * (AIR_BOUNDARY - s)
     lung   kd * (LUNG_MAX_DEVIATION - d) + kw * (LUNG_HALF_WIDTH - w)
     tissue k * (s - TISSUE_BOUNDARY)
     edge   kd * (d - LUNG_MAX_DEVIATION)
   Dense voxels (fat, soft tissue, bone) are tissue; pure air (outside the
   body, bowel gas: about -1000 HU and homogeneous) is air; aerated lung
   (about -850 HU, locally homogeneous at 3 mm: 50-100 HU deviation) is lung;
   the partial-volume rims around gas and at the skin, whose mean is lung-like
   but whose deviation is 250-400 HU, are edge and never lung.
3. ``Softmax`` over channels: probabilities.

The node's post-processing (manifest ``segments``) turns these channels into
the Body (tissue or edge, largest component, holes filled per slice) and the
Lungs (lung channel inside the body, components of at least 20 cm3).

Run ``python onnx_models/body-lungs/build_model.py`` to regenerate
``body_lungs.onnx``; the output is byte-for-byte deterministic, so its sha256
in ``manifest.json`` stays valid. Needs the ``onnx`` package (a build-time
dependency only: the node itself needs onnxruntime, not onnx).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODEL_FILE = HERE / "body_lungs.onnx"
MANIFEST_FILE = HERE / "manifest.json"

# Densities are HU / 1000.
AIR_BOUNDARY = -0.93
TISSUE_BOUNDARY = -0.45
LUNG_CENTRE = -0.83
LUNG_HALF_WIDTH = 0.12
#: Local standard deviation above which a voxel is an edge, not lung parenchyma.
LUNG_MAX_DEVIATION = 0.20
#: Logit slopes: with these, air wins over lung below about -960 HU for
#: homogeneous voxels and lung wins from about -950 to -710 HU.
AIR_SLOPE = 150.0
TISSUE_SLOPE = 40.0
DEVIATION_SLOPE = 40.0
WINDOW_SLOPE = 60.0
#: onnxruntime 1.31 reads IR version <= 13; the onnx package writes newer by default.
IR_VERSION = 8
OPSET = 17


def build_model() -> onnx.ModelProto:
    """Return the constructed ONNX model (deterministic)."""
    ka, k, kd, kw = AIR_SLOPE, TISSUE_SLOPE, DEVIATION_SLOPE, WINDOW_SLOPE
    # Rows: output channel (air, lung, tissue, edge); columns: features (s, d, w).
    weights = np.asarray(
        [[-ka, 0.0, 0.0], [0.0, -kd, -kw], [k, 0.0, 0.0], [0.0, kd, 0.0]], dtype=np.float32
    ).reshape(4, 3, 1, 1, 1)
    bias = np.asarray(
        [ka * AIR_BOUNDARY, kd * LUNG_MAX_DEVIATION + kw * LUNG_HALF_WIDTH, -k * TISSUE_BOUNDARY,
         -kd * LUNG_MAX_DEVIATION],
        dtype=np.float32,
    )
    centre = numpy_helper.from_array(np.asarray([LUNG_CENTRE], dtype=np.float32), "lung_centre")
    pool = dict(kernel_shape=[3, 3, 3], pads=[1, 1, 1, 1, 1, 1], strides=[1, 1, 1], count_include_pad=0)
    nodes = [
        helper.make_node("AveragePool", ["ct"], ["mean"], name="local_mean", **pool),
        helper.make_node("Mul", ["ct", "ct"], ["squared"], name="square"),
        helper.make_node("AveragePool", ["squared"], ["mean_of_squares"], name="local_mean_of_squares", **pool),
        helper.make_node("Mul", ["mean", "mean"], ["mean_squared"], name="square_of_mean"),
        helper.make_node("Sub", ["mean_of_squares", "mean_squared"], ["variance_raw"], name="variance"),
        # Rounding can make the variance slightly negative: clamp before the root.
        helper.make_node("Relu", ["variance_raw"], ["variance_clamped"], name="clamp_variance"),
        helper.make_node("Sqrt", ["variance_clamped"], ["deviation"], name="local_deviation"),
        helper.make_node("Sub", ["mean", "lung_centre"], ["offset"], name="offset_from_lung"),
        helper.make_node("Abs", ["offset"], ["window"], name="distance_from_lung"),
        helper.make_node("Concat", ["mean", "deviation", "window"], ["features"], axis=1, name="features"),
        helper.make_node("Conv", ["features", "W", "B"], ["logits"], kernel_shape=[1, 1, 1], name="classes"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "body_lungs",
        inputs=[helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4, "Z", "Y", "X"])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B"), centre],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="pacs-ai-node onnx_models/body-lungs/build_model.py",
        producer_version="1.1.0",
        doc_string="Constructed (not trained) body and lung segmentation reference model. Not a clinical model.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def main() -> int:
    data = build_model().SerializeToString()
    MODEL_FILE.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    manifest = json.loads(MANIFEST_FILE.read_text())
    manifest["artifacts"][0]["sha256"] = digest
    MANIFEST_FILE.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {MODEL_FILE.name} ({len(data)} bytes, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
