"""Construct the body-and-lungs reference model as an ONNX graph.

This model is *constructed*, not trained: its weights are written down from
known CT physics, which makes its behaviour fully explainable and lets the node
run a real ONNX model end to end before trained models exist.

Graph (input ``ct``: float32 [N, 1, Z, Y, X], HU / 1000 after clipping):

1. ``AveragePool`` 3x3x3 (pads 1, pad excluded from the mean) of x and of
   x*x: the local mean s, which suppresses CT noise, and the local standard
   deviation d = sqrt(mean(x^2) - s^2), a texture feature.
2. ``Conv`` 1x1x1 over (s, d), three output channels: linear logits
     air    k * (-0.92 - s)
     lung   k2 * (0.15 - d)
     tissue k * (s + 0.45)
   so that dense voxels (s >= -0.45: fat, soft tissue, bone) are tissue,
   very dark ones (s < -0.92) are air, and the aerated lung is what lies in
   between *and* is locally homogeneous. The partial-volume rim around bowel
   gas or the skin has lung-like means but a high local deviation (about
   250-400 HU against 50-100 HU in lung parenchyma at 3 mm), so it is not lung.
3. ``Softmax`` over channels: probabilities, sharpened by k and k2.

The node's post-processing (manifest ``segments``) turns these channels into
the Body (tissue or lung, largest component, holes filled) and the Lungs (lung
channel inside the body, large components only).

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

#: Boundaries in HU / 1000 between the air, lung and tissue channels.
AIR_LUNG_BOUNDARY = -0.95
LUNG_TISSUE_BOUNDARY = -0.45
#: Local standard deviation (HU / 1000) above which a voxel is not lung parenchyma.
LUNG_MAX_DEVIATION = 0.20
#: Logit slopes: 40 per 1000 HU gives p > 0.98 100 HU away from a boundary.
SHARPNESS = 40.0
TEXTURE_SHARPNESS = 40.0
#: onnxruntime 1.31 reads IR version <= 13; the onnx package writes newer by default.
IR_VERSION = 8
OPSET = 17


def build_model() -> onnx.ModelProto:
    """Return the constructed ONNX model (deterministic)."""
    k, k2 = SHARPNESS, TEXTURE_SHARPNESS
    # Rows: output channel (air, lung, tissue); columns: input feature (s, d).
    weights = np.asarray([[-k, 0.0], [0.0, -k2], [k, 0.0]], dtype=np.float32).reshape(3, 2, 1, 1, 1)
    bias = np.asarray(
        [k * AIR_LUNG_BOUNDARY, k2 * LUNG_MAX_DEVIATION, -k * LUNG_TISSUE_BOUNDARY], dtype=np.float32
    )
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
        helper.make_node("Concat", ["mean", "deviation"], ["features"], axis=1, name="features"),
        helper.make_node("Conv", ["features", "W", "B"], ["logits"], kernel_shape=[1, 1, 1], name="classes"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "body_lungs",
        inputs=[helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, "Z", "Y", "X"])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="pacs-ai-node onnx_models/body-lungs/build_model.py",
        producer_version="1.0.0",
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
    manifest["artifact"]["sha256"] = digest
    MANIFEST_FILE.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {MODEL_FILE.name} ({len(data)} bytes, sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
