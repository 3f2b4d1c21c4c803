"""Bring your own model: an nnU-Net v2 trained model folder -> an ONNX bundle.

nnU-Net v2 (Isensee et al., Nature Methods 18:203, 2021) writes one results
folder per trained model, ``DatasetXXX_Name/<trainer>__<plans>__<configuration>/``,
holding ``plans.json`` (preprocessing and network architecture),
``dataset.json`` (input channels and labels) and ``fold_<f>/<checkpoint>.pth``
(a torch pickle with the weights). :func:`import_nnunet` rebuilds the network
from ``plans.json`` with ``dynamic_network_architectures`` (no nnU-Net
install needed), loads one fold's weights, exports it to ONNX, checks the ONNX
model against PyTorch on a random patch, and writes a bundle folder with a
schema-version-2 ``manifest.json`` and a ``MODEL_CARD.md``.

What maps and what does not:

* CT only: one input channel normalised with nnU-Net's ``CTNormalization``
  (clip to the foreground 0.5/99.5 percentiles, then z-score) becomes the
  manifest's ``clip_zscore`` intensity. Other schemes are refused.
* 3D configurations (``3d_fullres``, ``3d_lowres`` and custom ones inheriting
  from them); ``2d`` and cascade stages (``3d_cascade_fullres``) are refused.
* One fold: nnU-Net's default five-fold ensemble is not reproduced.
* Label-based (softmax) and region-based (sigmoid) training.
* Network classes from the ``dynamic_network_architectures`` package only
  (``PlainConvUNet``, ``ResidualEncoderUNet``, ...), from the nnU-Net >= 2.4
  ``architecture`` entry or the older ``UNet_class_name`` plans format.

Heavy dependencies (torch, dynamic_network_architectures, onnx, onnxruntime)
are imported inside :func:`import_nnunet`: ``pip install 'pacs-ai-node[train]'``.

Modules: :mod:`.importer` (:func:`import_nnunet`), :mod:`.plans` (plans.json),
:mod:`.labels` (dataset.json labels and their codes), :mod:`.network` (torch and
the ONNX export), :mod:`.bundle_writer` (manifest check, model card, atomic write).
"""

from __future__ import annotations

from pipelines.model.manifest import MANIFEST_NAME, SCHEMA_PATH
from pipelines.offline.nnunet_import.importer import (
    CHECK_TOLERANCE,
    MANUFACTURER,
    MAX_IR_VERSION,
    MODEL_CARD_NAME,
    OPSETS,
    UNKNOWN,
    ImportReport,
    import_nnunet,
)
from pipelines.offline.nnunet_import.labels import ANATOMICAL_STRUCTURE, BUILTIN_CODES, load_codes
from pipelines.offline.nnunet_import.network import INSTALL_HINT
from pipelines.offline.nnunet_import.plans import LAYER_PACKAGES, NETWORK_PACKAGES

__all__ = [
    "ImportReport",
    "import_nnunet",
    "load_codes",
    "BUILTIN_CODES",
    "ANATOMICAL_STRUCTURE",
    "CHECK_TOLERANCE",
    "INSTALL_HINT",
    "LAYER_PACKAGES",
    "MANIFEST_NAME",
    "MANUFACTURER",
    "MAX_IR_VERSION",
    "MODEL_CARD_NAME",
    "NETWORK_PACKAGES",
    "OPSETS",
    "SCHEMA_PATH",
    "UNKNOWN",
]
