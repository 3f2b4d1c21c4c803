"""The bundle folder: manifest validation against the schema, the model card, and the atomic write."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.model.manifest import SCHEMA_PATH
from pipelines.offline.nnunet_import.labels import _LabelPlan

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


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
