"""The bundle runtime, part 1: manifest v2 parsing and its errors, and loading a ModelBundle
(sessions, hashes, providers). Bundles come from :mod:`support.models`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.analysis import SeriesAnalyzer
from pipelines.errors import ModelError
from pipelines.model import bundle as model_module
from pipelines.model.bundle import ModelBundle, default_providers
from pipelines.model.manifest import MANIFEST_NAME, SlidingWindow, parse_manifest, schema_errors
from pipelines.volume.ct import build_volume
from support.models import (
    CPU,
    LESION_SPACING,
    LIVER,
    SOLID,
    TYPING_PATCH,
    lesion_manifest,
    lesion_models,
    liver_phantom,
    manifest,
    segment,
    series,
    stage,
    threshold_model,
    write_bundle,
)

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


def _edit(path: str, value: Any = None, *, delete: bool = False) -> Callable[[dict[str, Any]], None]:
    """Change (or delete) the value at a dotted key path; list items by index."""

    def change(data: dict[str, Any]) -> None:
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
def test_schema_errors_name_the_key_path(change: Callable[[dict[str, Any]], None], expected: list[str]) -> None:
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
def test_cross_reference_errors_name_the_key(change: Callable[[dict[str, Any]], None], expected: list[str]) -> None:
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
def test_intensity_error_names_the_offending_key(intensity: dict[str, Any], key: str) -> None:
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
    data = manifest("shared", ["m"],
                    [stage("a", "m", (2.0, 1.0, 1.0), ["fg"]), stage("b", "m", (2.0, 2.0, 2.0), ["fg"])],
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
