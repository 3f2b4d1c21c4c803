""":func:`import_nnunet`: an nnU-Net v2 trained model folder -> a checked ONNX bundle, and its :class:`ImportReport`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.model.bundle import sha256_file
from pipelines.model.manifest import MANIFEST_NAME
from pipelines.offline.nnunet_import.bundle_writer import _dist_version, _model_card, _validate_manifest, _write_bundle
from pipelines.offline.nnunet_import.labels import _label_plan, _segments
from pipelines.offline.nnunet_import.network import (
    INSTALL_HINT,
    _build_network,
    _export_onnx,
    _load_checkpoint,
    _load_weights,
    _mirror_axes,
    _wrap,
)
from pipelines.offline.nnunet_import.plans import (
    _architecture,
    _check_transpose,
    _ct_intensity,
    _read_json,
    _resolve_configuration,
    _zyx,
)

MODEL_CARD_NAME = "MODEL_CARD.md"
MANUFACTURER = "nnU-Net v2 import"
UNKNOWN = "unknown: set it"
#: Largest ONNX IR version written: onnxruntime reads IR <= 10 since 1.16 (newer onnx packages write 11+).
MAX_IR_VERSION = 10
#: Opsets that IR version 10 can carry (opset 21 came with IR 10) and the exported layers need.
OPSETS = range(13, 22)
#: The ONNX check passes when max |torch - onnx| <= CHECK_TOLERANCE * max(1, max |torch logits|).
CHECK_TOLERANCE = 1e-3
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,47}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
)
#: Trainers known to build exactly the network plans.json describes (they change epochs or augmentation).
_PLAIN_TRAINER_RE = re.compile(r"^nnUNetTrainer(_\d+epochs)?(_?NoMirroring)?$")

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
        import dynamic_network_architectures  # noqa: F401  (only to give the install hint)
        import jsonschema  # noqa: F401
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
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
    raw_init_args = ckpt.get("init_args")
    init_args = raw_init_args if isinstance(raw_init_args, dict) else {}
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
    module = _wrap(network, transpose_forward, transpose_backward, flips)
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
            "checkpoint_sha256": sha256_file(ckpt_path),
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
