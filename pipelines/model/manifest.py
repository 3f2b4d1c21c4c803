"""Model bundle manifests (schema version 2): validated data, nothing executed.

A bundle is a folder of ``onnx_models/`` with ``manifest.json``, one or more
``.onnx`` artifacts and usually a model card. The manifest is checked in two
steps: the JSON Schema ``pipelines/manifest.schema.json`` (types, required
keys, value ranges), then :func:`parse_manifest` (references between parts:
every stage names a known artifact, regions and gates name earlier stages and
their channels, segments name channels of their stage, lesion sites name
organ segments). Errors name the file, the key path and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipelines.clinical.findings import CodeSpec
from pipelines.errors import ModelError

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SCHEMA_VERSION = 2


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The manifest JSON Schema (``manifest.schema.json``), read once."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


def schema_errors(data: Any) -> list[str]:
    """Every JSON Schema violation of ``data`` as 'key.path: message', sorted by path."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = []
    for error in validator.iter_errors(data):
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        errors.append(f"{path}: {_short(error)}")
    return sorted(errors)


def _short(error: ValidationError) -> str:
    if error.validator == "oneOf" and error.context:
        # Report the alternative the value meant (the one whose "method" constant matched), with the
        # sub-key of its own error, rather than "is not valid under any of the given schemas".
        by_branch: dict[str | int, list[ValidationError]] = {}
        for sub in error.context:
            by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
        chosen = None
        for subs in by_branch.values():
            if not any(list(s.relative_path) == ["method"] for s in subs):
                chosen = subs
                break
        best = (chosen or next(iter(by_branch.values())))[0]
        where = ".".join(str(p) for p in best.relative_path)
        return f"{where}: {best.message}" if where else best.message
    return error.message


@dataclass(frozen=True)
class Intensity:
    """Clip HU, then linear: ``(hu - offset) * scale``. Both methods reduce to this."""

    method: str
    clip_hu: tuple[float, float]
    offset_hu: float
    scale: float

    def apply(self, hu: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """The model input for HU values ``hu`` (float32, a new array)."""
        # In place on clip's result: np.clip always returns a new array, never its input.
        out = np.clip(hu, self.clip_hu[0], self.clip_hu[1]).astype(np.float32, copy=False)
        out -= np.float32(self.offset_hu)
        out *= np.float32(self.scale)
        return out


@dataclass(frozen=True)
class SlidingWindow:
    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    gaussian: bool = True
    mirror_axes: tuple[int, ...] = ()
    batch_size: int = 2


@dataclass(frozen=True)
class LabelRule:
    """Decision for one channel on the stage grid (region, gate, lesions)."""

    threshold: float = 0.5
    min_component_mm3: float = 0.0


@dataclass(frozen=True)
class StageRef:
    stage: str
    labels: tuple[str, ...]
    margin_mm: float = 0.0


@dataclass(frozen=True)
class Stage:
    id: str
    artifact: str
    task: str
    input_name: str
    target_spacing_mm: tuple[float, float, float]
    intensity: Intensity
    output_name: str
    activation: str
    channels: tuple[str, ...]
    patch_size: tuple[int, int, int] | None = None
    size_divisor: int = 1
    region: StageRef | None = None
    gate: StageRef | None = None
    sliding_window: SlidingWindow | None = None
    labels: dict[str, LabelRule] = field(default_factory=dict)

    def rule(self, channel: str) -> LabelRule:
        return self.labels.get(channel, LabelRule())


@dataclass(frozen=True)
class SegmentSpec:
    """How one output segment is derived from a stage's channels."""

    number: int
    label: str
    stage: str
    channels: tuple[str, ...]
    threshold: float
    postprocess: dict[str, Any]
    category: CodeSpec
    type: CodeSpec
    finding_site: CodeSpec | None
    role: str = "organ"


@dataclass(frozen=True)
class LesionSite:
    site: str
    organ_segment: str
    finding: CodeSpec
    threshold: float
    min_diameter_mm: float = 0.0
    min_component_mm3: float = 0.0


@dataclass(frozen=True)
class LesionSpec:
    stage: str
    channel: str
    sites: tuple[LesionSite, ...]
    typing_stage: str | None = None
    types: dict[str, CodeSpec] = field(default_factory=dict)
    malignant_types: tuple[str, ...] = ()

    def site(self, name: str) -> LesionSite:
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True)
class Artifact:
    id: str
    file: str
    sha256: str


@dataclass(frozen=True)
class ModelManifest:
    """The validated content of a bundle's ``manifest.json``."""

    id: str
    version: str
    name: str
    manufacturer: str
    intended_use: str
    regulatory_status: str
    licence: str
    authors: tuple[str, ...]
    artifacts: tuple[Artifact, ...]
    stages: tuple[Stage, ...]
    segments: tuple[SegmentSpec, ...]
    lesions: LesionSpec | None = None
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_card: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def stage(self, stage_id: str) -> Stage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    def segment(self, label: str) -> SegmentSpec:
        for s in self.segments:
            if s.label == label:
                return s
        raise KeyError(label)

    @property
    def combined_sha256(self) -> str:
        """One digest over every artifact (in manifest order): the identity of the exact model bytes."""
        import hashlib

        return hashlib.sha256("".join(a.sha256 for a in self.artifacts).encode()).hexdigest()


def _code(data: dict[str, Any]) -> CodeSpec:
    return CodeSpec(data["value"], data["scheme"], data["meaning"])


def _zyx(values: list[float]) -> tuple[float, float, float]:
    """A schema-checked ``[z, y, x]`` of numbers (the schema's ``zyx``: exactly three), as floats."""
    z, y, x = values
    return float(z), float(y), float(x)


def _zyx_int(values: list[int]) -> tuple[int, int, int]:
    """A schema-checked ``[z, y, x]`` of integers (the schema's ``zyx_int``: exactly three)."""
    z, y, x = values
    return z, y, x


def load_manifest(path: Path | str) -> tuple[ModelManifest, dict[str, Any]]:
    """Read, schema-check and parse one manifest file; returns the manifest and its raw data."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no {MANIFEST_NAME} in the bundle folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    return parse_manifest(data, str(path)), data


def parse_manifest(data: Any, where: str) -> ModelManifest:
    """Validate ``data`` against the schema and the cross-references; errors name ``where``."""
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        raise ModelError(
            f"{where}: schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r} "
            "(see pipelines/manifest.schema.json)"
        )
    errors = schema_errors(data)
    if errors:
        shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise ModelError(f"{where}: does not follow the manifest schema: {shown}")
    problems: list[str] = []

    artifacts = tuple(Artifact(a["id"], a["file"], a["sha256"]) for a in data["artifacts"])
    artifact_ids = [a.id for a in artifacts]
    if len(set(artifact_ids)) != len(artifact_ids):
        problems.append(f"artifacts: ids must be distinct, got {artifact_ids}")

    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        key = f"stages[{i}]"
        known = {s.id: s for s in stages}
        if raw["id"] in known:
            problems.append(f"{key}.id: {raw['id']!r} is already used by an earlier stage")
        if raw["artifact"] not in artifact_ids:
            problems.append(f"{key}.artifact: {raw['artifact']!r} is not one of the artifacts {artifact_ids}")
        refs = {}
        for part in ("region", "gate"):
            if part in raw:
                ref = raw[part]
                earlier = known.get(ref["stage"])
                if earlier is None:
                    problems.append(f"{key}.{part}.stage: {ref['stage']!r} is not an earlier stage")
                else:
                    bad = [c for c in ref["labels"] if c not in earlier.channels]
                    if bad:
                        problems.append(f"{key}.{part}.labels: {bad} are not channels of stage {earlier.id!r}")
                    if earlier.task != "segmentation":
                        problems.append(f"{key}.{part}.stage: {earlier.id!r} is not a segmentation stage")
                refs[part] = StageRef(ref["stage"], tuple(ref["labels"]), float(ref.get("margin_mm", 0.0)))
        channels = tuple(raw["output"]["channels"])
        bad_labels = [c for c in raw.get("labels", {}) if c not in channels]
        if bad_labels:
            problems.append(f"{key}.labels: {bad_labels} are not output channels {list(channels)}")
        task = raw["task"]
        inp = raw["input"]
        if task == "classification":
            if "patch_size" not in inp:
                problems.append(f"{key}.input.patch_size: a classification stage needs the patch it reads")
            if "gate" not in raw:
                problems.append(f"{key}.gate: a classification stage runs once per component of a gate's labels")
            if "sliding_window" in raw:
                problems.append(f"{key}.sliding_window: not used by a classification stage")
        clip = inp["intensity"]["clip_hu"]
        if not clip[0] < clip[1]:
            problems.append(f"{key}.input.intensity.clip_hu: must be [low, high] with low < high, got {clip}")
        intensity = _intensity(inp["intensity"])
        sw = raw.get("sliding_window")
        stages.append(
            Stage(
                id=raw["id"],
                artifact=raw["artifact"],
                task=task,
                input_name=inp["name"],
                target_spacing_mm=_zyx(inp["target_spacing_mm"]),
                intensity=intensity,
                output_name=raw["output"]["name"],
                activation=raw["output"]["activation"],
                channels=channels,
                patch_size=_zyx_int(inp["patch_size"]) if "patch_size" in inp else None,
                size_divisor=int(inp.get("size_divisor", 1)),
                region=refs.get("region"),
                gate=refs.get("gate"),
                sliding_window=None if sw is None else SlidingWindow(
                    patch_size=_zyx_int(sw["patch_size"]),
                    overlap=float(sw.get("overlap", 0.5)),
                    gaussian=bool(sw.get("gaussian", True)),
                    mirror_axes=tuple(sw.get("mirror_axes", ())),
                    batch_size=int(sw.get("batch_size", 2)),
                ),
                labels={c: LabelRule(float(r.get("threshold", 0.5)), float(r.get("min_component_mm3", 0.0)))
                        for c, r in raw.get("labels", {}).items()},
            )
        )
    by_id = {s.id: s for s in stages}

    segments: list[SegmentSpec] = []
    for i, raw in enumerate(data["segments"]):
        key = f"segments[{i}]"
        stage = by_id.get(raw["stage"])
        if stage is None:
            problems.append(f"{key}.stage: {raw['stage']!r} is not a stage")
        elif stage.task != "segmentation":
            problems.append(f"{key}.stage: {raw['stage']!r} is not a segmentation stage")
        else:
            bad = [c for c in raw["channels"] if c not in stage.channels]
            if bad:
                problems.append(f"{key}.channels: {bad} are not channels of stage {stage.id!r}")
        if any(s.label == raw["label"] for s in segments):
            problems.append(f"{key}.label: {raw['label']!r} is already used by an earlier segment")
        post = raw.get("postprocess", {})
        if "within" in post and not any(s.label == post["within"] for s in segments):
            problems.append(f"{key}.postprocess.within: {post['within']!r} is not an earlier segment")
        site = raw.get("finding_site")
        segments.append(
            SegmentSpec(
                number=raw["number"],
                label=raw["label"],
                stage=raw["stage"],
                channels=tuple(raw["channels"]),
                threshold=float(raw.get("threshold", 0.5)),
                postprocess=dict(post),
                category=_code(raw["category"]),
                type=_code(raw["type"]),
                finding_site=None if site is None else _code(site),
                role=raw.get("role", "organ"),
            )
        )
    numbers = [s.number for s in segments]
    if numbers != list(range(1, len(segments) + 1)):
        problems.append(f"segments: must be numbered 1..n in order, got {numbers}")
    labels = {s.label for s in segments}

    lesions = None
    if "lesions" in data:
        raw = data["lesions"]
        stage = by_id.get(raw["stage"])
        if stage is None or stage.task != "segmentation":
            problems.append(f"lesions.stage: {raw['stage']!r} is not a segmentation stage")
        elif raw["channel"] not in stage.channels:
            problems.append(f"lesions.channel: {raw['channel']!r} is not a channel of stage {stage.id!r}")
        typing = raw.get("typing_stage")
        types = {k: _code(v) for k, v in raw.get("types", {}).items()}
        if typing is not None:
            tstage = by_id.get(typing)
            if tstage is None or tstage.task != "classification":
                problems.append(f"lesions.typing_stage: {typing!r} is not a classification stage")
            else:
                missing = [c for c in tstage.channels if c not in types]
                if missing:
                    problems.append(f"lesions.types: no code for typing channels {missing}")
                bad = [c for c in raw.get("malignant_types", []) if c not in tstage.channels]
                if bad:
                    problems.append(f"lesions.malignant_types: {bad} are not channels of stage {typing!r}")
        sites = []
        for j, s in enumerate(raw["sites"]):
            if s["organ_segment"] not in labels:
                problems.append(f"lesions.sites[{j}].organ_segment: {s['organ_segment']!r} is not a segment label")
            sites.append(LesionSite(s["site"], s["organ_segment"], _code(s["finding"]), float(s["threshold"]),
                                    float(s.get("min_diameter_mm", 0.0)), float(s.get("min_component_mm3", 0.0))))
        names = [s.site for s in sites]
        if len(set(names)) != len(names):
            problems.append(f"lesions.sites: site names must be distinct, got {names}")
        lesions = LesionSpec(raw["stage"], raw["channel"], tuple(sites), typing, types,
                             tuple(raw.get("malignant_types", ())))

    measurements = data.get("measurements", {})
    for name, conf in measurements.items():
        for k, v in conf.items():
            if k.endswith("_segment") and v not in labels:
                problems.append(f"measurements.{name}.{k}: {v!r} is not a segment label")
        if name == "lung_nodules" and (lesions is None or conf["site"] not in {s.site for s in lesions.sites}):
            problems.append(f"measurements.lung_nodules.site: {conf['site']!r} is not a lesions.sites entry")
    if problems:
        raise ModelError(f"{where}: " + "; ".join(problems))
    return ModelManifest(
        id=data["id"],
        version=data["version"],
        name=data["name"],
        manufacturer=data["manufacturer"],
        intended_use=data["intended_use"],
        regulatory_status=data["regulatory_status"],
        licence=data["licence"],
        authors=tuple(data["authors"]),
        artifacts=artifacts,
        stages=tuple(stages),
        segments=tuple(segments),
        lesions=lesions,
        measurements={k: dict(v) for k, v in measurements.items()},
        model_card=data.get("model_card"),
        provenance=dict(data.get("provenance", {})),
    )


def _intensity(raw: dict[str, Any]) -> Intensity:
    clip = (float(raw["clip_hu"][0]), float(raw["clip_hu"][1]))
    if raw["method"] == "window":
        return Intensity("window", clip, float(raw["offset_hu"]), float(raw["scale"]))
    return Intensity("clip_zscore", clip, float(raw["mean_hu"]), 1.0 / float(raw["std_hu"]))
