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
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.errors import ModelError

__all__ = ["ImportReport", "import_nnunet", "load_codes", "BUILTIN_CODES"]

MANIFEST_NAME = "manifest.json"
MODEL_CARD_NAME = "MODEL_CARD.md"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
MANUFACTURER = "nnU-Net v2 import"
UNKNOWN = "unknown: set it"
INSTALL_HINT = "pip install 'pacs-ai-node[train]'"
#: Largest ONNX IR version written: onnxruntime reads IR <= 10 since 1.16 (newer onnx packages write 11+).
MAX_IR_VERSION = 10
#: Opsets that IR version 10 can carry (opset 21 came with IR 10) and the exported layers need.
OPSETS = range(13, 22)
#: The ONNX check passes when max |torch - onnx| <= CHECK_TOLERANCE * max(1, max |torch logits|).
CHECK_TOLERANCE = 1e-3
#: Packages whose classes plans.json may name; nothing else is ever imported from it.
NETWORK_PACKAGES = ("dynamic_network_architectures",)
LAYER_PACKAGES = ("torch.nn", "dynamic_network_architectures")

_CODE_KEYS = ("value", "scheme", "meaning")
_CODE_LIMITS = {"value": 64, "scheme": 16, "meaning": 64}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
)
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: Trainers known to build exactly the network plans.json describes (they change epochs or augmentation).
_PLAIN_TRAINER_RE = re.compile(r"^nnUNetTrainer(_\d+epochs)?(_?NoMirroring)?$")

ANATOMICAL_STRUCTURE = {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"}


def _sct(value: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme": "SCT", "meaning": meaning}


# SNOMED CT body structures with the code meanings PS3.16 uses (checked against
# pydicom's copy of the DICOM concept dictionaries). Left/right variants share
# the structure's code: the manifest has no laterality modifier (PS3.16 CID 244).
_ORGANS: dict[str, dict[str, str]] = {
    "liver": _sct("10200004", "Liver"),
    "spleen": _sct("78961009", "Spleen"),
    "pancreas": _sct("15776009", "Pancreas"),
    "kidney": _sct("64033007", "Kidney"),
    "kidneys": _sct("64033007", "Kidney"),
    "kidney_left": _sct("64033007", "Kidney"),
    "kidney_right": _sct("64033007", "Kidney"),
    "left_kidney": _sct("64033007", "Kidney"),
    "right_kidney": _sct("64033007", "Kidney"),
    "stomach": _sct("69695003", "Stomach"),
    "esophagus": _sct("32849002", "Esophagus"),
    "oesophagus": _sct("32849002", "Esophagus"),
    "colon": _sct("71854001", "Colon"),
    "rectum": _sct("34402009", "Rectum"),
    "duodenum": _sct("38848004", "Duodenum"),
    "small_bowel": _sct("30315005", "Small intestine"),
    "small_intestine": _sct("30315005", "Small intestine"),
    "lung": _sct("39607008", "Lung"),
    "lungs": _sct("39607008", "Lung"),
    "lung_left": _sct("39607008", "Lung"),
    "lung_right": _sct("39607008", "Lung"),
    "left_lung": _sct("39607008", "Lung"),
    "right_lung": _sct("39607008", "Lung"),
    "lung_upper_lobe_left": _sct("45653009", "Upper lobe of lung"),
    "lung_upper_lobe_right": _sct("45653009", "Upper lobe of lung"),
    "lung_middle_lobe_right": _sct("72481006", "Middle lobe of right lung"),
    "lung_lower_lobe_left": _sct("90572001", "Lower lobe of lung"),
    "lung_lower_lobe_right": _sct("90572001", "Lower lobe of lung"),
    "trachea": _sct("44567001", "Trachea"),
    "heart": _sct("80891009", "Heart"),
    "aorta": _sct("15825003", "Aorta"),
    "pulmonary_artery": _sct("81040000", "Pulmonary artery"),
    "inferior_vena_cava": _sct("64131007", "Inferior vena cava"),
    "superior_vena_cava": _sct("48345005", "Superior vena cava"),
    "portal_vein": _sct("32764006", "Portal vein"),
    "splenic_vein": _sct("35819009", "Splenic vein"),
    "iliac_artery_left": _sct("10293006", "Iliac artery"),
    "iliac_artery_right": _sct("10293006", "Iliac artery"),
    "iliac_vena_left": _sct("244411005", "Iliac vein"),
    "iliac_vena_right": _sct("244411005", "Iliac vein"),
    "gallbladder": _sct("28231008", "Gallbladder"),
    "urinary_bladder": _sct("89837001", "Bladder"),
    "bladder": _sct("89837001", "Bladder"),
    "adrenal_gland": _sct("23451007", "Adrenal gland"),
    "adrenal_gland_left": _sct("23451007", "Adrenal gland"),
    "adrenal_gland_right": _sct("23451007", "Adrenal gland"),
    "thyroid": _sct("69748006", "Thyroid"),
    "thyroid_gland": _sct("69748006", "Thyroid"),
    "prostate": _sct("41216001", "Prostate"),
    "uterus": _sct("35039007", "Uterus"),
    "brain": _sct("12738006", "Brain"),
    "spinal_cord": _sct("2748008", "Spinal cord"),
    "sacrum": _sct("54735007", "Sacrum"),
    "coccyx": _sct("64688005", "Coccyx"),
    "sternum": _sct("56873002", "Sternum"),
    "skull": _sct("89546000", "Skull"),
    "costal_cartilages": _sct("50016007", "Costal Cartilage"),
    "rib": _sct("113197003", "Rib"),
    "ribs": _sct("113197003", "Rib"),
}
for _side in ("", "_left", "_right"):
    _ORGANS["humerus" + _side] = _sct("85050009", "Humerus")
    _ORGANS["femur" + _side] = _sct("71341001", "Femur")
    _ORGANS["scapula" + _side] = _sct("79601000", "Scapula")
    _ORGANS["clavicle" + _side] = _sct("51299004", "Clavicle")
    _ORGANS["clavicula" + _side] = _sct("51299004", "Clavicle")

_VERTEBRAE = {
    "C1": "14806007", "C2": "39976000", "C3": "113205007", "C4": "5329002", "C5": "36978003",
    "C6": "36054005", "C7": "87391001",
    "T1": "64864005", "T2": "53733008", "T3": "1626008", "T4": "73071006", "T5": "56401006",
    "T6": "45296009", "T7": "62487009", "T8": "11068009", "T9": "82687006", "T10": "7610001",
    "T11": "12989004", "T12": "23215003",
    "L1": "66794005", "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003",
}
for _level, _value in _VERTEBRAE.items():
    for _key in (f"vertebrae_{_level}", f"vertebra_{_level}", f"{_level}_vertebra", _level):
        _ORGANS[_key.lower()] = _sct(_value, f"{_level} vertebra")

#: Label name (lower case, spaces and hyphens as "_") -> SNOMED CT code, used when ``codes`` has no entry.
BUILTIN_CODES: Mapping[str, Mapping[str, str]] = _ORGANS
#: Compact organs where a second component is a false positive: keep the largest only.
_SOLID_ORGANS = frozenset({
    "liver", "spleen", "kidney_left", "kidney_right", "left_kidney", "right_kidney",
    "gallbladder", "heart", "urinary_bladder", "bladder",
})
_RIB_RE = re.compile(r"^ribs?(_(left|right))?(_\d{1,2})?$")


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_nnunet` wrote and how well the ONNX model matches PyTorch."""

    bundle_dir: Path
    manifest_path: Path
    onnx_path: Path
    sha256: str
    bundle_id: str
    configuration: str
    #: Output channels in order (background first for softmax models).
    labels: tuple[str, ...]
    activation: str
    #: max / mean |PyTorch - ONNX| over the check's logits; None when ``check`` was off.
    max_abs_diff: float | None
    mean_abs_diff: float | None
    #: max |PyTorch logits| on the check volume: the scale the tolerance is relative to.
    logits_scale: float | None
    #: Shape (N, C, Z, Y, X) of the random check volume; None when ``check`` was off.
    check_input_shape: tuple[int, ...] | None
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _LabelPlan:
    channels: tuple[str, ...]  # manifest channel names, output order
    names: tuple[str, ...]  # dataset.json names, output order
    activation: str  # softmax | sigmoid
    foreground: tuple[int, ...]  # output indices that become segments


def load_codes(path: Path | str) -> dict[str, dict[str, Any]]:
    """Read a JSON file mapping label name -> code (``{"value", "scheme", "meaning"}``) or
    ``{"type": code, "finding_site": code | null, "category": code}``; checked by :func:`import_nnunet`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: codes file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ModelError(f"{path}: must be a JSON object mapping label name -> code object")
    return data


def import_nnunet(
    trained_model_folder: Path | str,
    out_dir: Path | str,
    *,
    fold: str = "0",
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    bundle_id: str | None = None,
    version: str = "1.0.0",
    codes: Mapping[str, Mapping[str, Any]] | None = None,
    licence: str | None = None,
    authors: Sequence[str] | None = None,
    flip_axes: Sequence[int] = (),
    opset: int = 17,
    check: bool = True,
    seed: int = 0,
    allow_pickle: bool = True,
    overwrite: bool = False,
) -> ImportReport:
    """Turn one fold of an nnU-Net v2 trained model folder into the bundle ``out_dir/<bundle_id>/``.

    ``trained_model_folder`` is ``.../DatasetXXX_Name/<trainer>__<plans>__<configuration>``;
    ``configuration`` defaults to the last ``__`` part of its name. ``fold`` is ``"0"``..
    or ``"all"``. ``codes`` maps label names to SNOMED CT (or other) codes where the
    built-in table (:data:`BUILTIN_CODES`) has none. ``flip_axes`` (0=Z, 1=Y, 2=X of the
    node's LPS grid) mirrors those axes inside the ONNX graph, for a model trained without
    mirroring on arrays stored in another orientation (e.g. ``(1, 2)`` for RAS-canonical
    NIfTI, as TotalSegmentator stores them). With ``check``, a seeded random patch is run
    through PyTorch and onnxruntime and the bundle is written only if they agree.

    Security: nnU-Net checkpoints are Python pickles, and unpickling can run arbitrary
    code. The checkpoint is first loaded with ``torch.load(weights_only=True)``; real
    nnU-Net checkpoints usually hold numpy scalars that this refuses, and then (unless
    ``allow_pickle`` is False) it is loaded with ``weights_only=False``. Only import
    checkpoints from a source you trust, as you would before running nnU-Net itself.

    The bundle is built in a temporary folder beside it and renamed into place, so a
    failed import leaves nothing behind. Raises :class:`ModelError` naming the file or
    key at fault.
    """
    folder = Path(trained_model_folder)
    out_dir = Path(out_dir)
    fold = _check_fold(fold)
    _check_str("checkpoint", checkpoint)
    if "/" in checkpoint or "\\" in checkpoint or checkpoint in (".", ".."):
        raise ModelError(f"checkpoint must be a file name inside fold_{fold}/, got {checkpoint!r}")
    if not isinstance(version, str) or not _SEMVER_RE.match(version):
        raise ModelError(f"version must be a semantic version such as '1.0.0', got {version!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ModelError(f"opset must be an integer from {OPSETS.start} to {OPSETS.stop - 1}, got {opset!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModelError(f"seed must be an integer, got {seed!r}")
    flips = _check_flip_axes(flip_axes)
    if licence is not None:
        _check_str("licence", licence)
    author_list = _check_authors(authors)
    warn: list[str] = []

    # --- the folder and its JSON files (no torch needed up to the checkpoint) ---
    if not folder.is_dir():
        raise ModelError(f"{folder}: trained model folder not found (expected .../DatasetXXX_Name/"
                         "<trainer>__<plans>__<configuration>)")
    folder = folder.resolve()
    plans = _read_json(folder / "plans.json")
    dataset = _read_json(folder / "dataset.json")
    name_parts = folder.name.split("__")
    if configuration is None:
        if len(name_parts) != 3 or not all(name_parts):
            raise ModelError(
                f"{folder}: the folder name is not <trainer>__<plans>__<configuration>; "
                "pass the configuration (e.g. '3d_fullres') explicitly"
            )
        configuration = name_parts[2]
    _check_str("configuration", configuration)
    dataset_name = plans.get("dataset_name") or folder.parent.name
    if not isinstance(dataset_name, str) or not dataset_name:
        raise ModelError(f"{folder / 'plans.json'}: 'dataset_name' must be a non-empty string")
    plans_name = plans.get("plans_name", name_parts[1] if len(name_parts) == 3 else None)

    cfg = _resolve_configuration(plans, configuration, folder / "plans.json")
    where = f"{folder / 'plans.json'}: configurations.{configuration}"
    transpose_forward = _check_transpose(plans, folder / "plans.json")
    transpose_backward = [transpose_forward.index(i) for i in range(3)]
    if "previous_stage" in cfg:
        raise ModelError(
            f"{where}: is a cascade stage (previous_stage {cfg['previous_stage']!r}): it needs the previous "
            "stage's segmentation as extra input channels, which the node does not provide; import "
            f"{cfg['previous_stage']!r} or '3d_fullres' instead"
        )
    spacing = _zyx(cfg, "spacing", where, float)
    patch = _zyx(cfg, "patch_size", where, int)
    spacing_zyx = [spacing[transpose_backward[j]] for j in range(3)]
    patch_zyx = [patch[transpose_backward[j]] for j in range(3)]
    intensity = _ct_intensity(plans, cfg, dataset, folder)
    labels = _label_plan(dataset, folder / "dataset.json")
    segments = _segments(labels, codes)
    arch = _architecture(cfg, where, warn)

    fold_dir = folder / f"fold_{fold}"
    if not fold_dir.is_dir():
        present = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
        raise ModelError(f"{fold_dir}: fold folder not found (present: {present or 'none'})")
    ckpt_path = fold_dir / checkpoint
    if not ckpt_path.is_file():
        present = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise ModelError(f"{ckpt_path}: checkpoint not found (present in {fold_dir.name}: {present or 'none'})")
    other_folds = sorted(p.name for p in folder.glob("fold_*") if p.is_dir() and p != fold_dir)
    if other_folds:
        warn.append(
            f"only {fold_dir.name} is imported; nnU-Net predicts with the ensemble of "
            f"{[fold_dir.name, *other_folds]} by default, so results can differ slightly from nnUNetv2_predict"
        )

    bundle_id = _bundle_id(bundle_id, dataset_name)
    bundle_dir = out_dir / bundle_id
    if bundle_dir.exists() and not overwrite:
        raise ModelError(f"{bundle_dir}: already exists; remove it, choose another bundle_id or pass overwrite")

    # --- torch side: build, load, export, check ---
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
        import dynamic_network_architectures  # noqa: F401  (only to give the install hint)
        import jsonschema  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"importing nnU-Net models needs torch, dynamic_network_architectures, onnx, onnxruntime and jsonschema "
            f"({exc.name or exc} is missing): {INSTALL_HINT}"
        ) from exc

    ckpt = _load_checkpoint(ckpt_path, allow_pickle, warn)
    trainer_name = ckpt.get("trainer_name")
    if not isinstance(trainer_name, str):
        trainer_name = name_parts[0] if len(name_parts) == 3 else "unknown"
        warn.append(f"{ckpt_path}: no 'trainer_name'; assuming {trainer_name!r}")
    if not _PLAIN_TRAINER_RE.match(trainer_name):
        warn.append(
            f"trainer {trainer_name!r} is not a stock nnUNetTrainer variant; if it overrides "
            "build_network_architecture the network rebuilt from plans.json may differ from the trained one "
            "(the weights loaded strictly, which catches most such differences)"
        )
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    trained_cfg = init_args.get("configuration")
    if isinstance(trained_cfg, str) and trained_cfg != configuration:
        warn.append(f"{ckpt_path}: trained as configuration {trained_cfg!r}, imported as {configuration!r}")
    mirror_axes = _mirror_axes(ckpt, ckpt_path, transpose_forward, warn)

    network = _build_network(arch, n_outputs=len(labels.channels), where=where)
    state = ckpt.get("network_weights")
    if not isinstance(state, Mapping):
        raise ModelError(f"{ckpt_path}: no 'network_weights' state dict (is this an nnU-Net v2 checkpoint?)")
    _load_weights(network, state, ckpt_path, trainer_name)
    network.eval()
    module = _wrap(network, transpose_forward, transpose_backward, flips, torch)
    module.eval()

    rng = np.random.default_rng(seed)
    example = torch.from_numpy(rng.standard_normal((1, 1, *patch_zyx), dtype=np.float32))
    onnx_bytes = _export_onnx(module, example, opset)
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as exc:  # onnx raises protobuf's DecodeError
        raise ModelError(f"the exported ONNX model cannot be parsed: {exc}") from exc
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    onnx_bytes = model.SerializeToString()
    sha256 = hashlib.sha256(onnx_bytes).hexdigest()

    diffs: dict[str, Any] | None = None
    if check:
        with torch.no_grad():
            expected = module(example).numpy()
        try:
            session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            (actual,) = session.run(["logits"], {"ct": example.numpy()})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot run the exported model: {exc}") from exc
        if actual.shape != expected.shape:
            raise ModelError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        scale = float(np.abs(expected).max())
        diffs = {
            "input_shape": list(example.shape),
            "seed": seed,
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "logits_scale": scale,
            "tolerance": CHECK_TOLERANCE * max(1.0, scale),
            "argmax_agreement": float((actual.argmax(1) == expected.argmax(1)).mean()),
        }
        if not math.isfinite(diffs["max_abs_diff"]) or diffs["max_abs_diff"] > diffs["tolerance"]:
            raise ModelError(
                f"the ONNX export does not reproduce PyTorch on a random {tuple(example.shape)} patch: "
                f"max abs diff {diffs['max_abs_diff']:.3g} > tolerance {diffs['tolerance']:.3g} "
                f"(mean {diffs['mean_abs_diff']:.3g}, logits up to {scale:.3g}); nothing was written"
            )
    else:
        warn.append("the ONNX export was not compared with PyTorch (check=False)")

    if mirror_axes == [] and not flips:
        warn.append(
            "the model was trained without mirroring, so it may depend on the orientation of its training "
            "arrays; the node feeds LPS (Z foot->head, Y anterior->posterior, X right->left): if the training "
            "images were stored otherwise (e.g. RAS-canonical NIfTI) pass flip_axes"
        )

    # --- manifest, model card, atomic write ---
    onnx_file = re.sub(r"[^A-Za-z0-9._-]", "_", bundle_id) + ".onnx"
    provenance = {
        "source": {
            "format": "nnU-Net v2 trained model folder",
            "trained_model_folder": str(folder),
            "dataset_name": dataset_name,
            "plans_name": plans_name,
            "configuration": configuration,
            "fold": fold,
            "checkpoint": checkpoint,
            "checkpoint_sha256": _sha256_file(ckpt_path),
            "trainer_name": trainer_name,
            "current_epoch": ckpt.get("current_epoch") if isinstance(ckpt.get("current_epoch"), int) else None,
            "network_class_name": arch["network_class_name"],
            "transpose_forward": transpose_forward,
            "normalization_schemes": cfg.get("normalization_schemes"),
            "labels": dataset.get("labels"),
        },
        "export": {
            "tool": "pacs-ai-node pipelines.nnunet_import",
            "torch": str(torch.__version__),
            "dynamic_network_architectures": _dist_version("dynamic_network_architectures"),
            "onnx": str(onnx.__version__),
            "opset": opset,
            "ir_version": int(model.ir_version),
            "flip_axes": flips,
        },
        "check": diffs,
        "warnings": list(warn),
    }
    manifest: dict[str, Any] = {
        "schema_version": 2,
        "id": bundle_id,
        "version": version,
        "name": f"{dataset_name} ({configuration}, fold {fold}), imported from nnU-Net v2"[:200],
        "manufacturer": MANUFACTURER,
        "intended_use": (
            f"Segment {', '.join(labels.names[i] for i in labels.foreground)} on CT, as trained with nnU-Net v2 "
            f"on {dataset_name}. Imported by pacs-ai-node from an nnU-Net v2 model; not validated: run "
            "`pacs-ai-node models validate` on local labelled data before clinical use."
        ),
        "regulatory_status": (
            "Not validated. Imported by pacs-ai-node from an nnU-Net v2 model; run `pacs-ai-node models validate` "
            "on local labelled data before any clinical use. For research use only unless the model's "
            "manufacturer states otherwise."
        ),
        "licence": licence or UNKNOWN,
        "authors": author_list,
        "model_card": MODEL_CARD_NAME,
        "provenance": provenance,
        "artifacts": [{"id": "segmentation", "file": onnx_file, "sha256": sha256}],
        "stages": [{
            "id": "segmentation",
            "artifact": "segmentation",
            "task": "segmentation",
            "input": {
                "name": "ct",
                "axis_order": "NCZYX",
                "orientation": "LPS",
                "target_spacing_mm": spacing_zyx,
                "intensity": intensity,
            },
            "sliding_window": {
                "patch_size": patch_zyx,
                "overlap": 0.5,
                "gaussian": True,
                "mirror_axes": mirror_axes,
                "batch_size": 2,
            },
            "output": {"name": "logits", "activation": labels.activation, "channels": list(labels.channels)},
        }],
        "segments": segments,
    }
    _validate_manifest(manifest)
    card = _model_card(manifest, labels, warn)
    _write_bundle(out_dir, bundle_dir, {
        onnx_file: onnx_bytes,
        MANIFEST_NAME: (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        MODEL_CARD_NAME: card.encode("utf-8"),
    }, overwrite)
    return ImportReport(
        bundle_dir=bundle_dir,
        manifest_path=bundle_dir / MANIFEST_NAME,
        onnx_path=bundle_dir / onnx_file,
        sha256=sha256,
        bundle_id=bundle_id,
        configuration=configuration,
        labels=labels.channels,
        activation=labels.activation,
        max_abs_diff=None if diffs is None else diffs["max_abs_diff"],
        mean_abs_diff=None if diffs is None else diffs["mean_abs_diff"],
        logits_scale=None if diffs is None else diffs["logits_scale"],
        check_input_shape=None if diffs is None else tuple(diffs["input_shape"]),
        warnings=tuple(warn),
    )


# ----------------------------------------------------------------- arguments


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"{name} must be a non-empty string, got {value!r}")


def _check_fold(fold: object) -> str:
    if isinstance(fold, int) and not isinstance(fold, bool):
        fold = str(fold)
    if not isinstance(fold, str) or not re.fullmatch(r"\d+|all", fold):
        raise ModelError(f"fold must be a fold number such as '0' or 'all', got {fold!r}")
    return fold


def _check_flip_axes(axes: Sequence[int]) -> list[int]:
    if isinstance(axes, (str, bytes)) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ModelError(f"flip_axes must be spatial axes from 0 (Z), 1 (Y), 2 (X), got {axes!r}")
    out = sorted(set(axes))
    if any(a not in (0, 1, 2) for a in out) or len(out) != len(list(axes)):
        raise ModelError(f"flip_axes must be distinct spatial axes from 0 (Z), 1 (Y), 2 (X), got {axes!r}")
    return out


def _check_authors(authors: Sequence[str] | None) -> list[str]:
    if authors is None:
        return [UNKNOWN]
    if isinstance(authors, str) or not authors or not all(isinstance(a, str) and a.strip() for a in authors):
        raise ModelError(f"authors must be a non-empty list of non-empty strings, got {authors!r}")
    return list(authors)


def _bundle_id(bundle_id: str | None, dataset_name: str) -> str:
    if bundle_id is None:
        slug = re.sub(r"[^a-z0-9.]+", "-", dataset_name.lower()).strip("-.")
        bundle_id = ("nnunet-" + slug)[:48].rstrip("-.")
    if not isinstance(bundle_id, str) or not _ID_RE.match(bundle_id):
        raise ModelError(
            f"bundle_id must be lower-case letters, digits, '.', '_' or '-' (at most 48, starting with a "
            f"letter or digit), got {bundle_id!r}"
        )
    return bundle_id


# ------------------------------------------------------------ plans, dataset


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: not found (an nnU-Net v2 trained model folder holds plans.json, "
                         "dataset.json and fold_<f>/)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve_configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration with ``inherits_from`` parents merged in (shallow, child wins), as nnU-Net does."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        raise ModelError(f"{path}: no 'configurations' object")
    chain: list[str] = []
    current = name
    while True:
        if current in chain:
            raise ModelError(f"{path}: configurations inherit in a circle: {' -> '.join([*chain, current])}")
        cfg = configs.get(current)
        if not isinstance(cfg, dict):
            which = "configuration" if current == name else f"parent configuration (inherits_from of {chain[-1]!r})"
            raise ModelError(f"{path}: no {which} {current!r} in configurations (has {sorted(configs)})")
        chain.append(current)
        parent = cfg.get("inherits_from")
        if parent is None:
            break
        current = parent
    merged: dict[str, Any] = {}
    for c in reversed(chain):
        merged.update(configs[c])
    return merged


def _check_transpose(plans: dict[str, Any], path: Path) -> list[int]:
    tf = plans.get("transpose_forward", [0, 1, 2])
    tb = plans.get("transpose_backward")
    if not isinstance(tf, list) or sorted(tf) != [0, 1, 2] or not all(isinstance(i, int) for i in tf):
        raise ModelError(f"{path}: transpose_forward must be a permutation of [0, 1, 2], got {tf!r}")
    if tb is not None and tb != [tf.index(i) for i in range(3)]:
        raise ModelError(f"{path}: transpose_backward {tb!r} is not the inverse of transpose_forward {tf!r}")
    return list(tf)


def _zyx(cfg: dict[str, Any], key: str, where: str, kind: type) -> list[Any]:
    value = cfg.get(key)
    if isinstance(value, list) and len(value) == 2:
        raise ModelError(f"{where}.{key}: {value!r} is 2D; 2D configurations predict slice by slice, the "
                         "node runs 3D patches: import a 3d_fullres or 3d_lowres model")
    if not isinstance(value, list) or len(value) != 3:
        raise ModelError(f"{where}.{key}: must be three numbers, got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelError(f"{where}.{key}: must be positive numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise ModelError(f"{where}.{key}: must be whole numbers, got {value!r}")
    return [kind(v) for v in value]


def _ct_intensity(plans: dict[str, Any], cfg: dict[str, Any], dataset: dict[str, Any], folder: Path) -> dict[str, Any]:
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise ModelError(f"{folder / 'dataset.json'}: no 'channel_names' object (e.g. {{\"0\": \"CT\"}})")
    if len(channels) != 1:
        raise ModelError(
            f"{folder / 'dataset.json'}: channel_names {channels!r} has {len(channels)} input channels; the node "
            "feeds one CT volume, so only single-channel CT models can be imported"
        )
    schemes = cfg.get("normalization_schemes")
    where = f"{folder / 'plans.json'}: configurations normalization_schemes"
    if not isinstance(schemes, list) or len(schemes) != 1:
        raise ModelError(f"{where}: must list one scheme for the one input channel, got {schemes!r}")
    if schemes[0] != "CTNormalization":
        raise ModelError(
            f"{where}: {schemes[0]!r} is not supported: the node feeds Hounsfield units and reproduces only "
            "nnU-Net's CTNormalization (clip to the dataset's foreground percentiles, then z-score); a model "
            f"normalised per image ({schemes[0]}) would see different inputs than it was trained on"
        )
    props = plans.get("foreground_intensity_properties_per_channel", {})
    stats = props.get("0") if isinstance(props, dict) else None
    where = f"{folder / 'plans.json'}: foreground_intensity_properties_per_channel.0"
    if not isinstance(stats, dict):
        raise ModelError(f"{where}: missing; CTNormalization needs the foreground intensity statistics")
    values = {}
    for key in ("percentile_00_5", "percentile_99_5", "mean", "std"):
        v = stats.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ModelError(f"{where}.{key}: must be a finite number, got {v!r}")
        values[key] = float(v)
    if not values["percentile_00_5"] < values["percentile_99_5"]:
        raise ModelError(f"{where}: percentile_00_5 {values['percentile_00_5']} must be below "
                         f"percentile_99_5 {values['percentile_99_5']}")
    if values["std"] <= 0:
        raise ModelError(f"{where}.std: must be positive, got {values['std']}")
    return {
        "method": "clip_zscore",
        "clip_hu": [values["percentile_00_5"], values["percentile_99_5"]],
        "mean_hu": values["mean"],
        "std_hu": values["std"],
    }


def _label_plan(dataset: dict[str, Any], path: Path) -> _LabelPlan:
    """Output channels as nnU-Net's LabelManager orders them."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError(f"{path}: no 'labels' object (name -> integer, background 0)")
    if labels.get("background") != 0 and labels.get("background") != [0]:
        raise ModelError(f"{path}: labels.background must be 0, got {labels.get('background')!r}")
    entries = {k: v for k, v in labels.items() if k != "ignore"}

    def as_ints(name: str, v: Any) -> list[int]:
        vs = v if isinstance(v, list) else [v]
        if not vs or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vs):
            raise ModelError(f"{path}: labels.{name} must be a non-negative integer or a list of them, got {v!r}")
        return vs

    regions = any(isinstance(v, list) and len(v) > 1 for v in entries.values())
    if regions:
        order = dataset.get("regions_class_order")
        fg = [k for k in entries if k != "background"]
        for k in fg:
            as_ints(k, entries[k])
        if not isinstance(order, list) or len(order) != len(fg):
            raise ModelError(f"{path}: region-based labels need 'regions_class_order' with one entry per region "
                             f"({len(fg)}), got {order!r}")
        names = tuple(fg)
        channels = _channel_names(names, path)
        return _LabelPlan(channels, names, "sigmoid", tuple(range(len(names))))
    by_value: dict[int, str] = {}
    for k, v in entries.items():
        ints = as_ints(k, v)
        if len(ints) != 1:
            raise ModelError(f"{path}: labels.{k} must be one integer, got {v!r}")
        value = ints[0]
        if value in by_value:
            raise ModelError(f"{path}: labels {by_value[value]!r} and {k!r} share the value {value}")
        by_value[value] = k
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise ModelError(f"{path}: label values must be consecutive from 0 (nnU-Net requires it), got {values}")
    if len(values) < 2:
        raise ModelError(f"{path}: labels has no foreground label")
    names = tuple(by_value[v] for v in values)
    return _LabelPlan(_channel_names(names, path), names, "softmax", tuple(range(1, len(names))))


def _channel_names(names: Sequence[str], path: Path) -> tuple[str, ...]:
    out = []
    for name in names:
        channel = re.sub(r"[^A-Za-z0-9_-]+", "_", name.strip()).strip("_-")[:64]
        if not channel or not _NAME_RE.match(channel):
            raise ModelError(f"{path}: label name {name!r} cannot be made a channel name (letters, digits, _ and -)")
        out.append(channel)
    if len(set(out)) != len(out):
        raise ModelError(f"{path}: label names {list(names)} are not distinct as channel names {out}")
    return tuple(out)


def _label_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _check_code(code: Any, where: str) -> dict[str, str]:
    if not isinstance(code, Mapping) or set(code) != set(_CODE_KEYS):
        raise ModelError(f"{where}: a code must be an object with exactly 'value', 'scheme', 'meaning', got {code!r}")
    for key in _CODE_KEYS:
        v = code[key]
        if not isinstance(v, str) or not v.strip() or len(v) > _CODE_LIMITS[key]:
            raise ModelError(f"{where}.{key}: must be a non-empty string of at most {_CODE_LIMITS[key]} "
                             f"characters, got {v!r}")
    return {k: code[k] for k in _CODE_KEYS}


def _segments(labels: _LabelPlan, codes: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """One segment per foreground channel, coded from ``codes`` or :data:`BUILTIN_CODES`."""
    codes = dict(codes or {})
    if not all(isinstance(k, str) for k in codes):
        raise ModelError(f"codes: keys must be label names, got {list(codes)!r}")
    foreground_names = [labels.names[i] for i in labels.foreground]
    unknown = sorted(set(codes) - set(foreground_names))
    if unknown:
        raise ModelError(f"codes: {unknown} are not foreground labels of this model ({foreground_names})")
    segments: list[dict[str, Any]] = []
    unmapped: list[str] = []
    for number, index in enumerate(labels.foreground, start=1):
        name = labels.names[index]
        if len(name) > 64:
            raise ModelError(f"dataset.json: label name {name!r} is longer than 64 characters (DICOM LO)")
        given = codes.get(name)
        key = _label_key(name)
        category = dict(ANATOMICAL_STRUCTURE)
        postprocess: dict[str, Any] = {}
        role = None
        if given is not None:
            where = f"codes.{name}"
            if "type" in given:
                extra = set(given) - {"type", "finding_site", "category"}
                if extra:
                    raise ModelError(f"{where}: unknown keys {sorted(extra)} (use type, finding_site, category)")
                type_ = _check_code(given["type"], f"{where}.type")
                site = given.get("finding_site", type_)
                finding_site = None if site is None else _check_code(site, f"{where}.finding_site")
                if "category" in given:
                    category = _check_code(given["category"], f"{where}.category")
            else:
                type_ = _check_code(given, where)
                finding_site = type_
            if category["value"] != ANATOMICAL_STRUCTURE["value"]:
                role = "other"
        elif key in BUILTIN_CODES or _RIB_RE.match(key):
            type_ = dict(BUILTIN_CODES.get(key) or BUILTIN_CODES["rib"])
            finding_site = dict(type_)
            if key in _SOLID_ORGANS:
                postprocess = {"largest_component": True}
            if type_["meaning"].endswith(" vertebra"):
                role = "vertebrae"
            elif type_["value"] == BUILTIN_CODES["rib"]["value"]:
                role = "ribs"
        else:
            unmapped.append(name)
            continue
        segment: dict[str, Any] = {
            "number": number,
            "label": name,
            "stage": "segmentation",
            "channels": [labels.channels[index]],
        }
        if postprocess:
            segment["postprocess"] = postprocess
        segment.update(category=category, type=type_, finding_site=finding_site)
        if role is not None:
            segment["role"] = role
        segments.append(segment)
    if unmapped:
        raise ModelError(
            f"dataset.json: no code for labels {unmapped}; pass codes (a JSON file mapping each label to "
            '{"value": ..., "scheme": "SCT", "meaning": ...}, e.g. {"'
            f'{unmapped[0]}": {{"value": "...", "scheme": "SCT", "meaning": "..."}}}})'
        )
    return segments


def _architecture(cfg: dict[str, Any], where: str, warn: list[str]) -> dict[str, Any]:
    """The nnU-Net >= 2.4 ``architecture`` entry; older plans (``UNet_class_name``) are converted."""
    arch = cfg.get("architecture")
    if arch is None and "UNet_class_name" in cfg:
        arch = _legacy_architecture(cfg, where)
        warn.append(f"{where}: plans from nnU-Net < 2.4 (UNet_class_name); architecture rebuilt from it")
    if not isinstance(arch, dict):
        raise ModelError(f"{where}.architecture: missing (expected network_class_name and arch_kwargs)")
    name = arch.get("network_class_name")
    kwargs = arch.get("arch_kwargs")
    imports = arch.get("_kw_requires_import", [])
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where}.architecture.network_class_name: must be a class name, got {name!r}")
    if not isinstance(kwargs, dict):
        raise ModelError(f"{where}.architecture.arch_kwargs: must be an object, got {kwargs!r}")
    if not isinstance(imports, list) or not all(isinstance(k, str) for k in imports):
        raise ModelError(f"{where}.architecture._kw_requires_import: must be a list of keys, got {imports!r}")
    # Refuse names outside the allowed packages before anything is imported.
    _check_dotted(name, NETWORK_PACKAGES, f"{where}.architecture.network_class_name", short_ok=True)
    for key in imports:
        if key not in kwargs:
            raise ModelError(f"{where}.architecture._kw_requires_import: {key!r} is not in arch_kwargs")
        if kwargs[key] is not None:
            _check_dotted(kwargs[key], LAYER_PACKAGES, f"{where}.architecture.arch_kwargs.{key}")
    conv = kwargs.get("conv_op")
    if isinstance(conv, str) and conv.endswith("2d"):
        raise ModelError(f"{where}.architecture.arch_kwargs.conv_op: {conv!r} is 2D; the node runs 3D patches: "
                         "import a 3d_fullres or 3d_lowres model")
    return {"network_class_name": name, "arch_kwargs": kwargs, "_kw_requires_import": imports, "where": where}


def _legacy_architecture(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """nnU-Net < 2.4 plans -> the >= 2.4 ``architecture`` entry (the same network nnU-Net built then)."""
    try:
        cls = cfg["UNet_class_name"]
        kernels = cfg["conv_kernel_sizes"]
        strides = cfg["pool_op_kernel_sizes"]
        base = int(cfg["UNet_base_num_features"])
        top = int(cfg["unet_max_num_features"])
        enc = cfg["n_conv_per_stage_encoder"]
        dec = cfg["n_conv_per_stage_decoder"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: old-style plans lack or mistype {exc}") from None
    if cls not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ModelError(f"{where}.UNet_class_name: {cls!r} is not PlainConvUNet or ResidualEncoderUNet")
    dim = len(kernels[0])
    n = len(kernels)
    kwargs = {
        "n_stages": n,
        "features_per_stage": [min(base * 2**i, top) for i in range(n)],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage" if cls == "PlainConvUNet" else "n_blocks_per_stage": enc,
        "n_conv_per_stage_decoder": dec,
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{cls}",
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _check_dotted(name: Any, packages: Sequence[str], where: str, *, short_ok: bool = False) -> None:
    if not isinstance(name, str) or not _DOTTED_RE.match(name) or any(p.startswith("__") for p in name.split(".")):
        raise ModelError(f"{where}: {name!r} is not a dotted class name")
    if short_ok and "." not in name:
        return  # looked up among dynamic_network_architectures.architectures, as nnU-Net does
    if not any(name.startswith(p + ".") for p in packages):
        raise ModelError(
            f"{where}: {name!r} is outside the packages an import may use ({', '.join(packages)}); "
            "custom network code cannot be imported"
        )


# ---------------------------------------------------------------- torch side


def _resolve_class(name: str, packages: Sequence[str], where: str, base: type) -> type:
    """Import ``name`` (already checked by :func:`_check_dotted`) and require a subclass of ``base``
    defined in one of ``packages``."""
    obj: Any = None
    if "." not in name:
        import dynamic_network_architectures.architectures as archs

        for info in pkgutil.iter_modules(archs.__path__, archs.__name__ + "."):
            try:
                candidate = getattr(importlib.import_module(info.name), name, None)
            except ImportError:
                continue  # an architecture module whose own optional dependency is missing
            if inspect.isclass(candidate):
                obj = candidate
                break
        if obj is None:
            raise ModelError(f"{where}: no class {name!r} in dynamic_network_architectures.architectures")
    else:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:i])
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and not module_name.startswith(exc.name):
                    raise ModelError(f"{where}: importing {module_name!r} needs {exc.name!r}: {INSTALL_HINT}") from exc
                continue
            break
        else:
            raise ModelError(f"{where}: cannot import {name!r}")
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                raise ModelError(f"{where}: {name!r} not found (is dynamic_network_architectures up to date?)")
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise ModelError(f"{where}: {name!r} is not a {base.__module__}.{base.__name__} class")
    if not any(obj.__module__ == p or obj.__module__.startswith(p + ".") for p in packages):
        raise ModelError(f"{where}: {name!r} resolves to {obj.__module__}.{obj.__name__}, outside {list(packages)}")
    return obj


def _build_network(arch: dict[str, Any], *, n_outputs: int, where: str) -> Any:
    import torch

    cls = _resolve_class(arch["network_class_name"], NETWORK_PACKAGES,
                         f"{where}.architecture.network_class_name", torch.nn.Module)
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = _resolve_class(kwargs[key], LAYER_PACKAGES, f"{where}.architecture.arch_kwargs.{key}",
                                         torch.nn.Module)
    params = inspect.signature(cls).parameters
    if "deep_supervision" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["deep_supervision"] = False  # inference uses the full-resolution head only; weights load the same
    try:
        return cls(input_channels=1, num_classes=n_outputs, **kwargs)
    except Exception as exc:  # the architectures assert and raise TypeError/ValueError on bad kwargs
        raise ModelError(f"{where}.architecture: {cls.__name__}(**arch_kwargs) fails: {exc!r}") from exc


def _load_checkpoint(path: Path, allow_pickle: bool, warn: list[str]) -> dict[str, Any]:
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise ModelError(
                f"{path}: holds Python objects beyond tensors ({str(exc).splitlines()[0]}) and allow_pickle is off; "
                "nnU-Net checkpoints usually do: load it only if it comes from a source you trust"
            ) from exc
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelError(f"{path}: cannot be loaded as a torch checkpoint: {exc2}") from exc2
        warn.append(f"{path.name}: loaded as a full pickle (weights_only=False); it must come from a trusted source")
    except Exception as exc:
        raise ModelError(f"{path}: cannot be loaded as a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: holds a {type(ckpt).__name__}, not an nnU-Net checkpoint dict")
    return ckpt


def _mirror_axes(ckpt: dict[str, Any], path: Path, transpose_forward: list[int], warn: list[str]) -> list[int]:
    """nnU-Net's allowed mirroring axes (spatial, in its transposed order) -> the node's Z/Y/X axes."""
    axes = ckpt.get("inference_allowed_mirroring_axes")
    if "inference_allowed_mirroring_axes" not in ckpt:
        warn.append(f"{path.name}: no inference_allowed_mirroring_axes; test-time mirroring is off, as in nnU-Net")
    if axes is None:
        return []
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and a in (0, 1, 2) for a in axes):
        raise ModelError(f"{path}: inference_allowed_mirroring_axes must be spatial axes 0..2, got {axes!r}")
    return sorted({transpose_forward[a] for a in axes})


def _load_weights(network: Any, state: Mapping[str, Any], path: Path, trainer: str) -> None:
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP and torch.compile wrappers
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    expected = network.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong = sorted(k for k in set(expected) & set(cleaned)
                   if tuple(getattr(cleaned[k], "shape", ())) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append("shape mismatch " + ", ".join(
                f"{k} {tuple(cleaned[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ModelError(
            f"{path}: network_weights do not fit the network plans.json describes ({'; '.join(details)}); "
            f"trainer {trainer!r} may build its own architecture, which cannot be imported"
        )
    network.load_state_dict(cleaned, strict=True)


def _wrap(network: Any, tf: list[int], tb: list[int], flips: list[int], torch: Any) -> Any:
    """The network as the node calls it: NCZYX in LPS order, nnU-Net's transposition and any flips inside."""
    if tf == [0, 1, 2] and not flips:
        return network

    class OrientedNetwork(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: Any) -> Any:
            if flips:
                x = torch.flip(x, [a + 2 for a in flips])
            if tf != [0, 1, 2]:
                x = x.permute(0, 1, *[a + 2 for a in tf])
            y = self.network(x)
            if tf != [0, 1, 2]:
                y = y.permute(0, 1, *[a + 2 for a in tb])
            if flips:
                y = torch.flip(y, [a + 2 for a in flips])
            return y

    return OrientedNetwork()


def _export_onnx(module: Any, example: Any, opset: int) -> bytes:
    """TorchScript-based export with dynamic batch and spatial axes; returns the model bytes."""
    import torch

    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice, tracer notes on shape checks and instance_norm's
        # "train=True" (instance statistics are what nnU-Net uses at inference) are expected.
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, (example,), buffer,
                    input_names=["ct"], output_names=["logits"],
                    dynamic_axes={"ct": axes, "logits": axes},
                    opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types
            raise ModelError(f"torch.onnx.export failed at opset {opset}: {exc}") from exc
    return buffer.getvalue()


# --------------------------------------------------------- manifest, writing


def _validate_manifest(manifest: dict[str, Any]) -> None:
    import jsonschema

    try:
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{SCHEMA_PATH}: cannot read the manifest schema ({exc})") from exc
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}"
        for e in validator.iter_errors(manifest)
    )
    if errors:
        raise ModelError(f"the generated manifest does not follow {SCHEMA_PATH.name}: {'; '.join(errors[:8])}")


def _model_card(manifest: dict[str, Any], labels: _LabelPlan, warn: list[str]) -> str:
    src = manifest["provenance"]["source"]
    check = manifest["provenance"]["check"]
    stage = manifest["stages"][0]
    inp, sw = stage["input"], stage["sliding_window"]
    lines = [
        f"# {manifest['name']}",
        "",
        "Imported by pacs-ai-node from an nnU-Net v2 model. **Not validated**: run "
        "`pacs-ai-node models validate` on local labelled data before any clinical use.",
        "",
        "## Source",
        "",
        f"- Trained model folder: `{src['trained_model_folder']}`",
        f"- Dataset: {src['dataset_name']}; plans: {src['plans_name']}; configuration: {src['configuration']}",
        f"- Fold: {src['fold']}; checkpoint: `{src['checkpoint']}` (sha256 `{src['checkpoint_sha256']}`)",
        f"- Trainer: {src['trainer_name']}; epoch: {src['current_epoch']}",
        f"- Network: `{src['network_class_name']}`",
        f"- Licence: {manifest['licence']}; authors: {', '.join(manifest['authors'])}",
        "",
        "## Input and output",
        "",
        f"- CT in HU, resampled to {inp['target_spacing_mm']} mm (Z, Y, X), clipped to "
        f"{inp['intensity']['clip_hu']} HU, then (HU - {inp['intensity']['mean_hu']:.6g}) / "
        f"{inp['intensity']['std_hu']:.6g}",
        f"- Sliding window: patch {sw['patch_size']}, overlap {sw['overlap']}, Gaussian weighting, "
        f"mirroring along axes {sw['mirror_axes']}",
        f"- Output `{stage['output']['name']}`: {stage['output']['activation']} over channels "
        f"{', '.join(labels.channels)}",
        "",
        "| segment | channel | code |",
        "|---|---|---|",
    ]
    for seg in manifest["segments"]:
        t = seg["type"]
        lines.append(f"| {seg['label']} | {', '.join(seg['channels'])} | {t['scheme']} {t['value']} {t['meaning']} |")
    lines += ["", "## Export check", ""]
    if check is None:
        lines.append("Not run (check=False).")
    else:
        lines.append(
            f"PyTorch and onnxruntime (CPU) on a seeded random volume {check['input_shape']} (seed {check['seed']}): "
            f"max |diff| {check['max_abs_diff']:.3g}, mean |diff| {check['mean_abs_diff']:.3g}, logits up to "
            f"{check['logits_scale']:.3g} (tolerance {check['tolerance']:.3g}); argmax agreement "
            f"{check['argmax_agreement']:.4%}."
        )
    lines += [
        "",
        "This check shows the ONNX file computes what the PyTorch network computes; it says nothing about "
        "accuracy on this site's scans. nnU-Net's own resampling (third-order spline, separate Z for anisotropic "
        "data) and its argmax are approximated by the node's resampling and per-segment thresholds.",
    ]
    if warn:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warn]
    return "\n".join(lines) + "\n"


def _write_bundle(out_dir: Path, bundle_dir: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """Write ``files`` into a temporary sibling folder, fsync, then rename it to ``bundle_dir``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", suffix=".tmp", dir=out_dir))
    except OSError as exc:
        raise ModelError(f"{out_dir}: cannot create the bundle folder ({exc})") from exc
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        old = None
        if bundle_dir.exists():
            if not overwrite:
                raise ModelError(f"{bundle_dir}: already exists; remove it or pass overwrite")
            old = out_dir / f".{bundle_dir.name}.old-{os.getpid()}"
            os.replace(bundle_dir, old)
        try:
            os.replace(tmp, bundle_dir)
        except OSError:
            if old is not None:
                os.replace(old, bundle_dir)  # put the previous bundle back
            raise
        _fsync_dir(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise ModelError(f"{bundle_dir}: cannot write the bundle ({exc})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
