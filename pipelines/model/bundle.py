"""Model bundles: verified manifests with warm onnxruntime sessions.

A bundle is a folder of ``onnx_models/`` holding ``manifest.json`` (schema
version 2, :mod:`pipelines.model.manifest`) and the ``.onnx`` artifacts it names.
Every artifact's sha256 is verified before a session is created; sessions are
created once and kept for the life of the process.

Execution providers: TensorRT, then CUDA, then CPU, each only when onnxruntime
offers it *and* an NVIDIA driver is present (onnxruntime-gpu lists CUDA on
machines without a GPU, then logs a load error and silently runs on the CPU).
``require_gpu`` turns that silent fallback into an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipelines.clinical.findings import AlgorithmIdentity, CodeSpec
from pipelines.dicom_out.uids import derive_uid
from pipelines.errors import ModelError
from pipelines.model.manifest import MANIFEST_NAME, ModelManifest, SegmentSpec, load_manifest  # noqa: F401 (re-export)

LOG = logging.getLogger(__name__)

#: Algorithm family for every bundle (DCM 123110, PS3.16 CID 7162).
AI_FAMILY = CodeSpec("123110", "DCM", "Artificial Intelligence")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensorrt_libraries_present() -> bool:
    """Whether TensorRT's runtime library loads (onnxruntime-gpu lists its TensorRT provider without it)."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def default_providers(available: Sequence[str], *, tensorrt: bool = True) -> list[str]:
    """The providers to ask for, best first, among ``available``."""
    wanted: list[str] = []
    if NVIDIA_DRIVER.exists():
        wanted = ["CUDAExecutionProvider"]
        if tensorrt and tensorrt_libraries_present():
            wanted.insert(0, "TensorrtExecutionProvider")
    return [p for p in (*wanted, "CPUExecutionProvider") if p in available]


class IOBinding(Protocol):
    """The part of ``onnxruntime.IOBinding`` used here (onnxruntime ships no type information)."""

    def bind_cpu_input(self, name: str, arr_on_cpu: np.ndarray) -> None: ...

    def bind_output(self, name: str, device_type: str) -> None: ...

    def copy_outputs_to_cpu(self) -> list[np.ndarray]: ...


class NodeArg(Protocol):
    """An input or output of an onnxruntime session: its name and shape (symbolic axes as str or None)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> list[int | str | None]: ...


class InferenceSession(Protocol):
    """The part of ``onnxruntime.InferenceSession`` used here (onnxruntime ships no type information)."""

    def get_providers(self) -> list[str]: ...

    def get_inputs(self) -> list[NodeArg]: ...

    def get_outputs(self) -> list[NodeArg]: ...

    def io_binding(self) -> IOBinding: ...

    def run_with_iobinding(self, iobinding: IOBinding) -> None: ...

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass
class ModelSession:
    """One artifact's onnxruntime session; runs NCZYX float32 batches."""

    artifact_id: str
    path: Path
    session: InferenceSession
    input_name: str
    output_name: str

    @property
    def provider(self) -> str:
        """The execution provider onnxruntime actually chose (the first of its list)."""
        return self.session.get_providers()[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch. On a GPU provider, I/O binding keeps onnxruntime from
        copying the input twice and lets it allocate the output on the device
        (copied back once)."""
        if batch.dtype != np.float32:
            raise ModelError(f"{self.artifact_id}: input must be float32, got {batch.dtype}")
        batch = np.ascontiguousarray(batch)
        session = self.session
        if self.provider in GPU_PROVIDERS:
            binding = session.io_binding()
            binding.bind_cpu_input(self.input_name, batch)
            binding.bind_output(self.output_name, "cuda")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        (out,) = session.run([self.output_name], {self.input_name: batch})
        return out


class ModelBundle:
    """A verified manifest with one warm session per artifact."""

    def __init__(
        self,
        folder: Path | str,
        *,
        providers: Sequence[str] | None = None,
        require_gpu: bool = False,
        intra_op_threads: int = 0,
        tensorrt_cache_dir: Path | None = None,
        verify_only: bool = False,
    ) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        self.manifest, self.raw = load_manifest(manifest_path)
        self.paths: dict[str, Path] = {}
        for artifact in self.manifest.artifacts:
            path = self.folder / artifact.file
            if not path.is_file():
                raise ModelError(f"{manifest_path}: artifact {artifact.file!r} not found in {self.folder}")
            actual = sha256_file(path)
            if actual != artifact.sha256:
                raise ModelError(
                    f"{path}: sha256 {actual} does not match the manifest ({artifact.sha256}); "
                    "refusing to load a model that is not the one described"
                )
            self.paths[artifact.id] = path
        self.sessions: dict[str, ModelSession] = {}
        self.provider: str | None = None
        if verify_only:
            return
        for artifact in self.manifest.artifacts:
            stage = next((s for s in self.manifest.stages if s.artifact == artifact.id), None)
            if stage is None:
                continue
            self.sessions[artifact.id] = self._session(
                artifact.id, stage.input_name, stage.output_name, providers, intra_op_threads, tensorrt_cache_dir
            )
        for stage in self.manifest.stages:
            session = self.sessions[stage.artifact]
            if (session.input_name, session.output_name) != (stage.input_name, stage.output_name):
                raise ModelError(
                    f"{manifest_path}: stage {stage.id!r} names input/output {stage.input_name}/{stage.output_name} "
                    f"but artifact {stage.artifact!r} is used by another stage with "
                    f"{session.input_name}/{session.output_name}"
                )
        self.provider = self.sessions[self.manifest.stages[0].artifact].provider
        if require_gpu:
            slow = [s.artifact_id for s in self.sessions.values() if s.provider not in GPU_PROVIDERS]
            if slow:
                raise ModelError(
                    f"{self.manifest.id}: a GPU execution provider is required (models.require_gpu) but "
                    f"artifacts {slow} run on CPUExecutionProvider"
                )
        LOG.info(
            "model %s %s loaded from %s on %s (%d artifacts, sha256 %s)",
            self.manifest.id, self.manifest.version, self.folder, self.provider,
            len(self.sessions), self.manifest.combined_sha256[:12],
        )

    def _session(
        self,
        artifact_id: str,
        input_name: str,
        output_name: str,
        providers: Sequence[str] | None,
        intra_op_threads: int,
        tensorrt_cache_dir: Path | None,
    ) -> ModelSession:
        import onnxruntime as ort  # imported here: nothing heavy happens at import time

        path = self.paths[artifact_id]
        available = ort.get_available_providers()
        chosen = list(providers) if providers is not None else default_providers(available)
        provider_args: list[object] = []
        for name in chosen:
            if name == "TensorrtExecutionProvider":
                trt_options: dict[str, bool | str] = {"trt_fp16_enable": False}
                if tensorrt_cache_dir is not None:
                    os.makedirs(tensorrt_cache_dir, exist_ok=True)
                    trt_options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(tensorrt_cache_dir))
                provider_args.append((name, trt_options))
            else:
                provider_args.append(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        try:
            session: InferenceSession = ort.InferenceSession(str(path), sess_options=options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if input_name not in inputs:
            raise ModelError(f"{path}: no input named {input_name!r} (has {sorted(inputs)})")
        if output_name not in outputs:
            raise ModelError(f"{path}: no output named {output_name!r} (has {sorted(outputs)})")
        if len(inputs[input_name].shape) != 5:
            raise ModelError(f"{path}: input must be 5-D NCZYX, got shape {inputs[input_name].shape}")
        return ModelSession(artifact_id, path, session, input_name, output_name)

    @property
    def providers(self) -> dict[str, str]:
        """Execution provider in use per artifact."""
        return {a: s.provider for a, s in self.sessions.items()}

    @property
    def key(self) -> str:
        """Identity of the exact model: id, version and hash prefix (used in UIDs)."""
        return f"{self.manifest.id}@{self.manifest.version}+{self.manifest.combined_sha256[:16]}"

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
            device_uid=derive_uid("device", m.id, m.version, m.combined_sha256),
        )


def discover_bundles(models_dir: Path | str) -> list[Path]:
    """Bundle folders (those with a manifest.json) directly under ``models_dir``, sorted."""
    root = Path(models_dir)
    if not root.is_dir():
        raise ModelError(f"models directory {root} does not exist")
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST_NAME}"))
