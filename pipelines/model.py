"""Model bundles: an ONNX file with a manifest, checked and run by onnxruntime.

A bundle is a folder of ``onnx_models/`` holding ``manifest.json`` and the
``.onnx`` file it names. The manifest is the model's contract (input spacing,
intensity transform, output channels, segments with their codes); the sha256
of the model file is verified before the node accepts work.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.errors import ModelError
from pipelines.findings import AlgorithmIdentity, CodeSpec
from pipelines.uids import derive_uid

LOG = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUPPORTED_SCHEMA_VERSION = 1
#: Algorithm family for every bundle (DCM 123110, PS3.16 CID 7162).
AI_FAMILY = CodeSpec("123110", "DCM", "Artificial Intelligence")
POSTPROCESS_KEYS = frozenset({"largest_component", "fill_holes_per_slice", "within", "min_component_mm3"})


@dataclass(frozen=True)
class IntensityTransform:
    """Clip HU to ``clip_hu`` then ``(hu - offset_hu) * scale``."""

    clip_hu: tuple[float, float]
    scale: float
    offset_hu: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        clipped = np.clip(hu, self.clip_hu[0], self.clip_hu[1])
        return ((clipped - np.float32(self.offset_hu)) * np.float32(self.scale)).astype(np.float32)


@dataclass(frozen=True)
class SegmentSpec:
    """How one output segment is derived from the model's channels."""

    number: int
    label: str
    channels: tuple[str, ...]
    postprocess: dict[str, Any]
    category: CodeSpec
    type: CodeSpec
    finding_site: CodeSpec | None


@dataclass(frozen=True)
class ModelManifest:
    """The validated content of a bundle's ``manifest.json``."""

    id: str
    version: str
    name: str
    manufacturer: str
    intended_use: str
    regulatory_status: str
    artifact_file: str
    sha256: str
    input_name: str
    target_spacing_mm: tuple[float, float, float]
    intensity: IntensityTransform
    output_name: str
    activation: str
    channels: tuple[str, ...]
    segments: tuple[SegmentSpec, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "ModelManifest":
        """Validate a parsed manifest; errors name the key and the problem."""
        reader = _ManifestReader(data, where)
        if reader.get("schema_version", int) != SUPPORTED_SCHEMA_VERSION:
            raise ModelError(f"{where}: schema_version must be {SUPPORTED_SCHEMA_VERSION}")
        channels = tuple(reader.get("output.channels", list))
        if not channels or not all(isinstance(c, str) for c in channels) or len(set(channels)) != len(channels):
            raise ModelError(f"{where}: output.channels must be a list of distinct names")
        activation = reader.get("output.activation", str)
        if activation not in ("softmax", "sigmoid"):
            raise ModelError(f"{where}: output.activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if reader.get("input.axis_order", str) != "NCZYX":
            raise ModelError(f"{where}: input.axis_order must be 'NCZYX'")
        spacing = reader.get("input.target_spacing_mm", list)
        if len(spacing) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in spacing):
            raise ModelError(f"{where}: input.target_spacing_mm must be three positive numbers (z, y, x)")
        clip = reader.get("input.intensity.clip_hu", list)
        if len(clip) != 2 or not clip[0] < clip[1]:
            raise ModelError(f"{where}: input.intensity.clip_hu must be [low, high] with low < high")
        sha = reader.get("artifact.sha256", str).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ModelError(f"{where}: artifact.sha256 must be 64 hex digits, got {sha!r}")
        segments = []
        labels: set[str] = set()
        for i, item in enumerate(reader.get("segments", list)):
            seg = _ManifestReader(item, f"{where}: segments[{i}]")
            used = tuple(seg.get("channels", list))
            unknown = [c for c in used if c not in channels]
            if not used or unknown:
                raise ModelError(f"{where}: segments[{i}].channels names unknown channels {unknown or used}")
            post = seg.get("postprocess", dict)
            bad = set(post) - POSTPROCESS_KEYS
            if bad:
                raise ModelError(f"{where}: segments[{i}].postprocess has unknown keys {sorted(bad)}")
            for flag in ("largest_component", "fill_holes_per_slice"):
                if flag in post and not isinstance(post[flag], bool):
                    raise ModelError(
                        f"{where}: segments[{i}].postprocess.{flag} must be true or false, got {post[flag]!r}"
                    )
            if "min_component_mm3" in post:
                size = post["min_component_mm3"]
                if isinstance(size, bool) or not isinstance(size, (int, float)) or not size >= 0:
                    raise ModelError(
                        f"{where}: segments[{i}].postprocess.min_component_mm3 must be a number >= 0, got {size!r}"
                    )
            if "within" in post and (not isinstance(post["within"], str) or post["within"] not in labels):
                raise ModelError(f"{where}: segments[{i}].postprocess.within names {post['within']!r}, not an earlier segment")
            label = seg.get("label", str)
            if label in labels:
                raise ModelError(f"{where}: segments[{i}].label {label!r} is already used by an earlier segment")
            labels.add(label)
            site = item.get("finding_site")
            segments.append(
                SegmentSpec(
                    number=seg.get("number", int),
                    label=label,
                    channels=used,
                    postprocess=dict(post),
                    category=_code(seg.get("category", dict), f"{where}: segments[{i}].category"),
                    type=_code(seg.get("type", dict), f"{where}: segments[{i}].type"),
                    finding_site=None if site is None else _code(site, f"{where}: segments[{i}].finding_site"),
                )
            )
        numbers = [s.number for s in segments]
        if not segments or numbers != list(range(1, len(segments) + 1)):
            raise ModelError(f"{where}: segments must be numbered 1..n in order, got {numbers}")
        return cls(
            id=reader.get("id", str),
            version=reader.get("version", str),
            name=reader.get("name", str),
            manufacturer=reader.get("manufacturer", str),
            intended_use=reader.get("intended_use", str),
            regulatory_status=reader.get("regulatory_status", str),
            artifact_file=reader.get("artifact.file", str),
            sha256=sha,
            input_name=reader.get("input.name", str),
            target_spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            intensity=IntensityTransform(
                clip_hu=(float(clip[0]), float(clip[1])),
                scale=float(reader.get("input.intensity.scale", (int, float))),
                offset_hu=float(reader.get("input.intensity.offset_hu", (int, float))),
            ),
            output_name=reader.get("output.name", str),
            activation=activation,
            channels=channels,
            segments=tuple(segments),
        )


class _ManifestReader:
    """Typed look-ups of dotted keys with errors that name the key."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ModelError(f"{where}: expected an object, got {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, dotted: str, kind: type | tuple[type, ...]) -> Any:
        value: Any = self.data
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ModelError(f"{self.where}: missing key {dotted!r}")
            value = value[part]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ModelError(f"{self.where}: key {dotted!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, str) and not value:
            raise ModelError(f"{self.where}: key {dotted!r} is empty")
        return value


def _code(data: dict[str, Any], where: str) -> CodeSpec:
    reader = _ManifestReader(data, where)
    return CodeSpec(reader.get("value", str), reader.get("scheme", str), reader.get("meaning", str))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelBundle:
    """A verified manifest with a warm onnxruntime session.

    ``providers`` defaults to CUDA when onnxruntime offers it, then CPU. The
    provider actually in use is in :attr:`provider` and logged at load time;
    ``require_gpu`` refuses to run on a silent CPU fallback.
    """

    def __init__(
        self,
        folder: Path | str,
        *,
        providers: Sequence[str] | None = None,
        require_gpu: bool = False,
        intra_op_threads: int = 0,
    ) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        try:
            data = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{manifest_path}: no manifest.json in the bundle folder") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{manifest_path}: not valid JSON ({exc})") from exc
        self.manifest = ModelManifest.from_dict(data, str(manifest_path))
        self.model_path = self.folder / self.manifest.artifact_file
        if not self.model_path.is_file():
            raise ModelError(f"{manifest_path}: artifact {self.manifest.artifact_file!r} not found")
        actual = sha256_file(self.model_path)
        if actual != self.manifest.sha256:
            raise ModelError(
                f"{self.model_path}: sha256 {actual} does not match the manifest ({self.manifest.sha256}); "
                "refusing to load a model that is not the one described"
            )
        self.session = self._create_session(providers, intra_op_threads)
        self.provider = self.session.get_providers()[0]
        if require_gpu and self.provider == "CPUExecutionProvider":
            raise ModelError(
                f"{self.manifest.id}: a GPU execution provider is required (models.require_gpu) but "
                f"onnxruntime is running on {self.provider}"
            )
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self.manifest.input_name not in inputs:
            raise ModelError(f"{self.model_path}: no input named {self.manifest.input_name!r} (has {sorted(inputs)})")
        if self.manifest.output_name not in outputs:
            raise ModelError(f"{self.model_path}: no output named {self.manifest.output_name!r} (has {sorted(outputs)})")
        shape = inputs[self.manifest.input_name].shape
        if len(shape) != 5:
            raise ModelError(f"{self.model_path}: input must be 5-D NCZYX, got shape {shape}")
        LOG.info(
            "model %s %s loaded from %s on %s (sha256 %s)",
            self.manifest.id,
            self.manifest.version,
            self.folder,
            self.provider,
            self.manifest.sha256[:12],
        )

    def _create_session(self, providers: Sequence[str] | None, intra_op_threads: int):  # noqa: ANN202
        import onnxruntime as ort  # imported here: nothing heavy happens at import time

        available = ort.get_available_providers()
        if providers is None:
            # onnxruntime-gpu lists CUDA even on machines without an NVIDIA driver,
            # then logs a load error and falls back: ask for CUDA only with a driver.
            wanted = ["CUDAExecutionProvider"] if Path("/proc/driver/nvidia/version").exists() else []
            providers = [p for p in (*wanted, "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        try:
            return ort.InferenceSession(str(self.model_path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{self.model_path}: onnxruntime cannot load the model: {exc}") from exc

    @property
    def key(self) -> str:
        """Identity of the exact model: id, version and hash prefix (used in UIDs)."""
        return f"{self.manifest.id}@{self.manifest.version}+{self.manifest.sha256[:16]}"

    def algorithm_identity(self, software_version: str) -> AlgorithmIdentity:
        m = self.manifest
        return AlgorithmIdentity(
            name=m.id,
            version=m.version,
            family=AI_FAMILY,
            manufacturer=m.manufacturer,
            model_name=m.name[:64],
            software_version=software_version,
            # IHE AIR: the Device UID changes whenever the model bytes change.
            device_uid=derive_uid("device", m.id, m.version, m.sha256),
        )

    def predict(self, model_input: np.ndarray) -> np.ndarray:
        """Run the model on one NCZYX float32 array; returns the channel probabilities."""
        if model_input.ndim != 5 or model_input.dtype != np.float32:
            raise ModelError(f"{self.manifest.id}: input must be float32 NCZYX, got {model_input.dtype} {model_input.shape}")
        (output,) = self.session.run([self.manifest.output_name], {self.manifest.input_name: model_input})
        if output.shape[1] != len(self.manifest.channels) or output.shape[2:] != model_input.shape[2:]:
            raise ModelError(
                f"{self.manifest.id}: output shape {output.shape} does not match {len(self.manifest.channels)} "
                f"channels on the input grid {model_input.shape[2:]}"
            )
        return output


def discover_bundles(models_dir: Path | str) -> list[Path]:
    """Bundle folders (those with a manifest.json) directly under ``models_dir``, sorted."""
    root = Path(models_dir)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist")
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST_NAME}"))
