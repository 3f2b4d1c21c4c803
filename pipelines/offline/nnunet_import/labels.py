"""Output labels: the label plan read from dataset.json, the built-in and user-supplied codes, the manifest's
segments."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError

_CODE_KEYS = ("value", "scheme", "meaning")
_CODE_LIMITS = {"value": 64, "scheme": 16, "meaning": 64}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

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
