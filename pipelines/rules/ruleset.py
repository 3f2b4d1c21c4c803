"""Series eligibility as data: rules in TOML with explicit operators, never ``eval``.

A rules file is a list of ``[[rule]]`` tables. Each rule has an ``id``, a
``reason`` (shown when the rule fails) and one condition. A series is eligible
when every rule passes; otherwise every failed rule gives its reason, followed
by the values that made it fail::

    [[rule]]
    id = "no_contrast_agent"
    reason = "contrast agent present"
    all = [
      { tag = "ContrastBolusAgent", empty = true },
      { tag = "ContrastBolusRoute", present = false },
    ]

    -> contrast agent present (Contrast/Bolus Agent = "OMNIPAQUE")

A condition is either a test or a group:

- a test names its subject, ``tag = "Keyword"`` (a DICOM keyword, a
  ``"(gggg,eeee)"`` tag, or a path into sequences such as
  ``"ContrastBolusUsageSequence.ContrastBolusAgentAdministered"``) or
  ``derived = "name"`` (a value computed from the headers of the whole series,
  :data:`DERIVED_VALUES`), and one or more operators (:data:`OPERATORS`), all
  of which must hold;
- a group is ``all = [...]``, ``any = [...]`` or ``not = {...}``, nested freely.

Tag tests are evaluated on every slice (every instance, or every frame of an
Enhanced CT instance, where functional groups are searched per frame then
shared, PS3.3 C.7.6.16), and a rule passes only when it holds on every slice.
Every value of a multi-valued element must pass ``equals`` (a single value),
``in``, ``regex``, ``min`` and ``max``; ``contains`` and ``contains_any`` look
for one value among them. An absent or empty element fails every operator but
``present`` and ``empty``.
"""

from __future__ import annotations

import abc
import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description, dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import DSfloat

from pipelines.errors import PacsAiError, SeriesRejected
from pipelines.volume.geometry import (
    check_geometry,
    coverage_mm,
    distance_along,
    median_step,
    plane_of,
    slice_normal,
)

#: The rules the node applies when no rules file is configured.
DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.toml")

#: Operators of a test and what they check.
OPERATORS: dict[str, str] = {
    "equals": "every value equals a string or number; a list is the whole multi-valued element, in order",
    "in": "every value is one of a list",
    "regex": "every value matches a regular expression (Python re.search: anchor it with ^ and $)",
    "min": "every value is a number >= this",
    "max": "every value is a number <= this",
    "contains": "one of the values equals this",
    "contains_any": "one of the values equals one of a list",
    "present": "true: the element is there (maybe empty); false: it is absent",
    "empty": "true: the element is absent or has no value; false: it has a value",
}

#: Values computed from the headers of the whole series: name -> (type, meaning).
DERIVED_VALUES: dict[str, tuple[type, str]] = {
    "slice_count": (int, "number of slices: distinct instances, or frames of a multi-frame instance"),
    "instance_count": (int, "number of distinct SOP Instance UIDs"),
    "slice_spacing_mm": (float, "median distance between neighbouring slice positions along the normal"),
    "coverage_mm": (float, "length covered along the normal: first to last slice position plus one spacing"),
    "orientation": (str, "AXIAL, CORONAL, SAGITTAL or OBLIQUE, from the first slice's Image Orientation (Patient)"),
    "gantry_tilt_deg": (float, "largest |Gantry/Detector Tilt| of any slice; 0 when not recorded"),
    "geometry_problem": (
        str, "first geometry inconsistency found (pipelines.volume.geometry.check_geometry), empty if none"
    ),
}

_GROUPS = ("all", "any", "not")
_SUBJECTS = ("tag", "derived")
_RULE_KEYS = ("id", "reason")
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_TAG_FORM = re.compile(r"^\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)$")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_SHOWN = 120
#: Values never shown in a reason (reasons go to logs and the state database):
#: person names, and the patient's identifiers.
_WITHHELD_KEYWORDS = frozenset({
    "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber", "MedicalRecordLocator",
})


class RulesError(PacsAiError):
    """A rules file that cannot be used; the message names the file, the rule and the problem."""


# --------------------------------------------------------------------------- what a test sees


@dataclass(frozen=True)
class SliceView:
    """One slice of a series: an instance, or one frame (0-based) of a multi-frame instance."""

    dataset: Dataset
    frame_index: int | None = None


@dataclass(frozen=True)
class Observed:
    """The element a test looked at on one slice: whether it is there, and its values."""

    name: str
    present: bool
    values: tuple[Any, ...] = ()
    sequence: bool = False
    derived: bool = False
    withheld: bool = False

    def describe(self) -> str:
        if self.derived:
            return f"{self.name} = {_render(self.values, limit=None)}" if self.values else f"{self.name} unknown"
        if not self.present:
            return f"{self.name} absent"
        if self.sequence:
            n = len(self.values)
            return f"{self.name} present ({n} item{'s' if n != 1 else ''})"
        if not self.values:
            return f"{self.name} empty"
        if self.withheld:
            return f"{self.name} = (patient data, not shown)"
        return f"{self.name} = {_render(self.values)}"


def _render(values: Sequence[Any], limit: int | None = _MAX_SHOWN) -> str:
    """Values as DICOM writes them (backslash-separated), text quoted, long text cut."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "\\".join(_number(v) for v in values)
    text = "\\".join(str(v) for v in values)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return f'"{text}"'


def _number(v: int | float) -> str:
    if isinstance(v, float) and not isinstance(v, DSfloat):
        return f"{v:g}"
    return str(v)


@dataclass(frozen=True)
class TagPath:
    """A DICOM element, or a path to one through sequences, as written in a rule."""

    text: str
    tags: tuple[BaseTag, ...]
    name: str
    vr: str | None
    withheld: bool = False

    @classmethod
    def parse(cls, text: str) -> TagPath:
        """Parse ``Keyword``, ``(gggg,eeee)`` or ``Seq.Keyword``; raises ValueError naming the part."""
        parts = [p.strip() for p in text.split(".")]
        tags: list[BaseTag] = []
        vrs: list[str | None] = []
        for part in parts:
            tag, vr = _parse_tag(part)
            tags.append(tag)
            vrs.append(vr)
        for part, vr in zip(parts[:-1], vrs[:-1]):
            if vr is not None and vr != "SQ":
                raise ValueError(f"{part!r} is not a sequence (VR {vr}), so nothing can follow it in {text!r}")
        last = tags[-1]
        try:
            name = dictionary_description(last)
        except KeyError:
            name = f"({last.group:04X},{last.element:04X})"
        withheld = vrs[-1] == "PN" or keyword_for_tag(last) in _WITHHELD_KEYWORDS
        return cls(text=text, tags=tuple(tags), name=name, vr=vrs[-1], withheld=withheld)


def _parse_tag(part: str) -> tuple[BaseTag, str | None]:
    match = _TAG_FORM.match(part)
    if match:
        tag = Tag(int(match.group(1), 16), int(match.group(2), 16))
    elif part.startswith("("):
        raise ValueError(f"malformed tag {part!r}; write (gggg,eeee) with four hex digits each")
    else:
        number = tag_for_keyword(part)
        if number is None:
            close = difflib.get_close_matches(part.replace(" ", ""), keyword_dict.keys(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown DICOM keyword {part!r}{hint}")
        tag = Tag(number)
    try:
        vr: str | None = dictionary_VR(tag)
    except KeyError:
        vr = None  # a private or unknown tag: its VR is whatever the file says
    return tag, vr


def slice_views(headers: Iterable[Dataset]) -> list[SliceView]:
    """The slices of a series: one per distinct instance, one per frame for multi-frame instances."""
    views: list[SliceView] = []
    seen: set[str] = set()
    for i, ds in enumerate(headers):
        uid = str(ds.get("SOPInstanceUID") or f"#{i}")
        if uid in seen:
            continue
        seen.add(uid)
        if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
            frames = int(ds.get("NumberOfFrames") or 1)
            views.extend(SliceView(ds, f) for f in range(frames))
        else:
            views.append(SliceView(ds))
    return views


def _frame_groups(ds: Dataset, frame_index: int) -> list[Dataset]:
    """The functional group items that apply to one frame: per-frame first, then shared."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        groups.append(per_frame[frame_index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    return groups


def _top_elements(view: SliceView, tag: BaseTag) -> list[DataElement]:
    ds = view.dataset
    if tag in ds:
        return [ds[tag]]
    if view.frame_index is None:
        return []
    for group in _frame_groups(ds, view.frame_index):
        if tag in group:  # a functional group macro itself, e.g. Contrast/Bolus Usage Sequence
            return [group[tag]]
        for elem in group:  # an attribute inside a macro's one item, e.g. Slice Thickness
            if elem.VR == "SQ" and elem.value and tag in elem.value[0]:
                return [elem.value[0][tag]]
    return []


def observe(view: SliceView | None, path: TagPath) -> Observed:
    """The element ``path`` names on one slice (every item of the sequences on the way)."""
    elements = _top_elements(view, path.tags[0]) if view is not None else []
    for tag in path.tags[1:]:
        elements = [
            item[tag]
            for elem in elements
            if elem.VR == "SQ"
            for item in elem.value
            if tag in item
        ]
    values: list[Any] = []
    sequence = bool(elements) and all(e.VR == "SQ" for e in elements)
    for elem in elements:
        if elem.VR == "SQ":
            values.extend(elem.value)
        else:
            values.extend(_element_values(elem.value))
    return Observed(path.name, bool(elements), tuple(values), sequence, withheld=path.withheld)


def _element_values(value: Any) -> list[Any]:
    if value is None:
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out: list[bytes | bytearray | int | float | str] = []
    for v in items:
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray)):
            out.append(v)
        elif isinstance(v, (int, float)):
            out.append(v)
        else:
            text = str(v).strip()
            if text:
                out.append(text)
    return out


# --------------------------------------------------------------------------- conditions

#: (passed, evidence): evidence says which values made the condition pass or fail.
Result = tuple[bool, list[str]]


class Condition(abc.ABC):
    """A node of a rule's condition tree; ``uses_tags``: whether it reads slice headers."""

    uses_tags: bool = False

    @abc.abstractmethod
    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        """Whether the condition holds on one slice (None: no slice), and the values that decided."""


@dataclass(frozen=True)
class Check:
    """One operator of a test with its operand."""

    operator: str
    operand: Any
    pattern: re.Pattern[str] | None = None

    def holds(self, seen: Observed) -> bool:
        op, x, values = self.operator, self.operand, seen.values
        if op == "present":
            return bool(seen.present == x)
        if op == "empty":
            return bool((not values) == x)
        if not values:
            return False
        if op == "equals":
            if isinstance(x, list):
                return len(values) == len(x) and all(_same(v, w) for v, w in zip(values, x))
            return all(_same(v, x) for v in values)
        if op == "in":
            return all(any(_same(v, w) for w in x) for v in values)
        if op == "regex":
            assert self.pattern is not None
            return all(isinstance(v, (str, int, float)) and self.pattern.search(str(v)) for v in values)
        if op == "min":
            return all((n := _as_number(v)) is not None and n >= x for v in values)
        if op == "max":
            return all((n := _as_number(v)) is not None and n <= x for v in values)
        if op == "contains":
            return any(_same(v, x) for v in values)
        if op == "contains_any":
            return any(_same(v, w) for v in values for w in x)
        raise AssertionError(f"operator {op} passed validation but has no implementation")


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _same(v: Any, expected: str | int | float) -> bool:
    if isinstance(expected, (int, float)):
        n = _as_number(v)
        return n is not None and n == float(expected)
    if isinstance(v, (str, int, float)):
        return str(v).strip() == expected
    return False


@dataclass(frozen=True)
class TagTest(Condition):
    """A test on one DICOM element of each slice."""

    path: TagPath
    checks: tuple[Check, ...]
    uses_tags: bool = True

    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        seen = observe(view, self.path)
        return all(c.holds(seen) for c in self.checks), [seen.describe()]


@dataclass(frozen=True)
class DerivedTest(Condition):
    """A test on a value computed from the headers of the whole series."""

    name: str
    checks: tuple[Check, ...]

    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        value = derived.get(self.name)
        values: tuple[Any, ...] = () if value is None or value == "" else (value,)
        seen = Observed(self.name, value is not None, values, derived=True)
        return all(c.holds(seen) for c in self.checks), [seen.describe()]


@dataclass(frozen=True)
class AllOf(Condition):
    """Every member holds; evidence of a failure comes from the members that failed."""

    members: tuple[Condition, ...]
    uses_tags: bool = False

    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        results = [m.evaluate(view, derived) for m in self.members]
        ok = all(r[0] for r in results)
        return ok, [e for r in results if ok or not r[0] for e in r[1]]


@dataclass(frozen=True)
class AnyOf(Condition):
    """At least one member holds; a failure shows what every member saw."""

    members: tuple[Condition, ...]
    uses_tags: bool = False

    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        results = [m.evaluate(view, derived) for m in self.members]
        ok = any(r[0] for r in results)
        return ok, [e for r in results if not ok or r[0] for e in r[1]]


@dataclass(frozen=True)
class Not(Condition):
    """The member does not hold; its evidence is why it did."""

    member: Condition
    uses_tags: bool = False

    def evaluate(self, view: SliceView | None, derived: Mapping[str, Any]) -> Result:
        ok, evidence = self.member.evaluate(view, derived)
        return not ok, evidence


# --------------------------------------------------------------------------- rules and decisions


@dataclass(frozen=True)
class RuleFailure:
    """A rule a series failed, and why, with the offending values."""

    rule_id: str
    reason: str


@dataclass(frozen=True)
class Rule:
    """One eligibility rule: an id, the reason shown when it fails, and a condition."""

    id: str
    reason: str
    condition: Condition

    def check(self, views: Sequence[SliceView], derived: Mapping[str, Any]) -> RuleFailure | None:
        """None when the rule holds on every slice, else the failure with the first offending values."""
        if not self.condition.uses_tags or not views:
            ok, evidence = self.condition.evaluate(views[0] if views else None, derived)
            return None if ok else RuleFailure(self.id, _reason(self.reason, evidence))
        failing = 0
        first: list[str] | None = None
        for view in views:
            ok, evidence = self.condition.evaluate(view, derived)
            if not ok:
                failing += 1
                first = first if first is not None else evidence
        if first is None:
            return None
        where = "" if failing == len(views) else f"; on {failing} of {len(views)} slices"
        return RuleFailure(self.id, _reason(self.reason, first, where))


def _reason(text: str, evidence: list[str], suffix: str = "") -> str:
    shown = list(dict.fromkeys(evidence))
    return f"{text} ({', '.join(shown)}{suffix})" if shown else text


@dataclass(frozen=True)
class Decision:
    """Whether a series would be analysed, and every reason why not."""

    failures: tuple[RuleFailure, ...]
    rules_checked: int
    values: Mapping[str, Any] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return not self.failures

    @property
    def reasons(self) -> list[str]:
        return [f.reason for f in self.failures]

    @property
    def summary(self) -> str:
        """One line: ``eligible: all N rules passed`` or ``rejected: reason; reason``."""
        if self.eligible:
            return f"eligible: all {self.rules_checked} rules passed"
        return "rejected: " + "; ".join(self.reasons)


@dataclass(frozen=True)
class RuleSet:
    """Validated eligibility rules; :meth:`evaluate` decides on one series' headers."""

    rules: tuple[Rule, ...]
    source: str

    @classmethod
    def load(cls, path: Path | str | None = None) -> RuleSet:
        """Read and validate a rules file (None: the packaged default); raises :class:`RulesError`."""
        path = Path(path) if path is not None else DEFAULT_RULES_PATH
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"rules file {path}: cannot be read ({exc.strerror or exc})") from exc
        return cls.from_toml(text, str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<rules>") -> RuleSet:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RulesError(f"rules file {source}: invalid TOML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<rules>") -> RuleSet:
        """Validate parsed TOML: every problem names the rule, the place in it and the value."""
        unknown = [k for k in data if k != "rule"]
        if unknown:
            raise RulesError(f"rules file {source}: unknown top-level key {unknown[0]!r}; rules are [[rule]] tables")
        tables = data.get("rule")
        if not isinstance(tables, list) or not tables:
            raise RulesError(f"rules file {source}: no rules; write at least one [[rule]] table")
        rules: list[Rule] = []
        seen: set[str] = set()
        for index, table in enumerate(tables, 1):
            rule = _parse_rule(table, index, source)
            if rule.id in seen:
                raise RulesError(f"rules file {source}: rule {rule.id!r}: the id is used twice")
            seen.add(rule.id)
            rules.append(rule)
        return cls(tuple(rules), source)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.rules]

    def evaluate(self, headers: Sequence[Dataset]) -> Decision:
        """Check every rule on the headers of one series (pixel data not needed)."""
        views = slice_views(headers)
        values = series_values(headers, views)
        failures = tuple(f for f in (r.check(views, values) for r in self.rules) if f is not None)
        return Decision(failures, len(self.rules), values)


def screen_series(paths: Sequence[Path | str], rules: RuleSet) -> Decision:
    """Read the headers of one series' files (no pixel data) and evaluate ``rules``.

    An unreadable file does not stop the check: it is one more reason, next to
    those of the rules on the files that could be read.
    """
    headers: list[Dataset] = []
    unreadable: list[RuleFailure] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(str(path), stop_before_pixels=True))
        except Exception as exc:  # pydicom raises many types for bad files
            unreadable.append(RuleFailure("readable", f"unreadable instance {Path(path).name}: {exc}"))
    decision = rules.evaluate(headers)
    if unreadable:
        decision = replace(decision, failures=tuple(unreadable) + decision.failures)
    return decision


# --------------------------------------------------------------------------- derived values


def series_values(headers: Sequence[Dataset], views: Sequence[SliceView] | None = None) -> dict[str, Any]:
    """The :data:`DERIVED_VALUES` of a series, from its headers only."""
    views = slice_views(headers) if views is None else views
    orientation_path = TagPath.parse("ImageOrientationPatient")
    position_path = TagPath.parse("ImagePositionPatient")
    tilt_path = TagPath.parse("GantryDetectorTilt")

    normal = None
    for view in views:
        normal = slice_normal(_numbers(observe(view, orientation_path).values))
        if normal is not None:
            break
    spacing = coverage = None
    if normal is not None:
        positions = [_numbers(observe(v, position_path).values) for v in views]
        # Rounded to 1 um and distinct: the values describe the series even when
        # check_geometry rejects it (duplicates, gaps), which geometry_problem reports.
        distances = sorted({round(distance_along(p, normal), 3) for p in positions if len(p) == 3})
        if len(distances) >= 2:
            spacing = round(median_step(distances), 3)
            coverage = round(coverage_mm(distances[0], distances[-1], spacing), 2)
    tilts = [abs(t) for v in views for t in _numbers(observe(v, tilt_path).values)]
    try:
        check_geometry(list(headers), require_ct=False)
        problem = None
    except SeriesRejected as exc:
        problem = exc.reason
    return {
        "slice_count": len(views),
        "instance_count": len({id(v.dataset) for v in views}),
        "slice_spacing_mm": spacing,
        "coverage_mm": coverage,
        "orientation": plane_of(normal) if normal is not None else None,
        "gantry_tilt_deg": max(tilts, default=0.0),
        "geometry_problem": problem,
    }


def _numbers(values: Sequence[Any]) -> np.ndarray:
    numbers = [_as_number(v) for v in values]
    return np.asarray([n for n in numbers if n is not None], dtype=float)


# --------------------------------------------------------------------------- validation


def _parse_rule(table: Any, index: int, source: str) -> Rule:
    if not isinstance(table, dict):
        raise RulesError(f"rules file {source}: rule #{index} is not a table")
    rule_id = table.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
        shown = f"{rule_id!r}" if rule_id is not None else "missing"
        raise RulesError(
            f"rules file {source}: rule #{index}: id {shown}; give a name of letters, digits, '_', '.' or '-'"
        )
    where = f"rules file {source}: rule {rule_id!r}"
    reason = table.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise RulesError(f"{where}: 'reason' missing or empty; it is the text shown when the rule fails")
    condition = {k: v for k, v in table.items() if k not in _RULE_KEYS}
    return Rule(rule_id, reason.strip(), _parse_condition(condition, where))


def _fail(where: str, problem: str) -> RulesError:
    return RulesError(f"{where}: {problem}")


def _parse_condition(table: Any, where: str) -> Condition:
    if not isinstance(table, dict):
        raise _fail(where, f"a condition must be a table, got {_kind(table)} {table!r}")
    allowed = (*_GROUPS, *_SUBJECTS, *OPERATORS)
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(where, f"unknown key {key!r}{hint} (operators: {', '.join(OPERATORS)}; groups: all, any, not)")
    groups = [k for k in _GROUPS if k in table]
    subjects = [k for k in _SUBJECTS if k in table]
    operators = [k for k in OPERATORS if k in table]
    if groups:
        if len(groups) > 1 or subjects or operators:
            extra = [k for k in table if k != groups[0]]
            raise _fail(where, f"{groups[0]!r} cannot be combined with {extra[0]!r} in one table; nest them")
        return _parse_group(groups[0], table[groups[0]], where)
    if not subjects:
        raise _fail(where, "no condition: give tag = ... or derived = ... with operators, or all/any/not")
    if len(subjects) > 1:
        raise _fail(where, "give either 'tag' or 'derived', not both")
    if not operators:
        raise _fail(where, f"no operator for {subjects[0]} {table[subjects[0]]!r} (operators: {', '.join(OPERATORS)})")
    checks = tuple(_parse_check(op, table[op], where) for op in operators)
    _check_range(table, where)
    if subjects[0] == "tag":
        text = table["tag"]
        if not isinstance(text, str) or not text.strip():
            raise _fail(where, f"'tag' must be a DICOM keyword or \"(gggg,eeee)\", got {_kind(text)} {text!r}")
        try:
            path = TagPath.parse(text.strip())
        except ValueError as exc:
            raise _fail(where, str(exc)) from exc
        _check_vr(path, operators, where)
        return TagTest(path, checks)
    name = table["derived"]
    if not isinstance(name, str) or name not in DERIVED_VALUES:
        raise _fail(where, f"unknown derived value {name!r} (known: {', '.join(DERIVED_VALUES)})")
    value_type = DERIVED_VALUES[name][0]
    for check in checks:
        if value_type is str and check.operator in ("min", "max"):
            raise _fail(where, f"derived value {name!r} is text; {check.operator!r} needs a number")
        if value_type is not str and check.operator == "regex":
            raise _fail(where, f"derived value {name!r} is a number; use min/max rather than 'regex'")
    return DerivedTest(name, checks)


def _parse_group(kind: str, value: Any, where: str) -> Condition:
    if kind == "not":
        if not isinstance(value, dict):
            raise _fail(where, f"'not' takes one condition table, got {_kind(value)} {value!r}")
        member = _parse_condition(value, f"{where} > not")
        return Not(member, uses_tags=member.uses_tags)
    if not isinstance(value, list) or not value:
        raise _fail(where, f"{kind!r} takes a non-empty list of condition tables, got {_kind(value)} {value!r}")
    members = tuple(_parse_condition(m, f"{where} > {kind}[{i}]") for i, m in enumerate(value, 1))
    uses_tags = any(m.uses_tags for m in members)
    return AllOf(members, uses_tags) if kind == "all" else AnyOf(members, uses_tags)


def _kind(value: Any) -> str:
    return {
        bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table",
    }.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str) or _is_number(value)


_OPERAND_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "equals": (lambda v: _is_scalar(v) or (isinstance(v, list) and bool(v) and all(map(_is_scalar, v))),
               "a string, a number or a non-empty list of them"),
    "in": (lambda v: isinstance(v, list) and bool(v) and all(map(_is_scalar, v)),
           "a non-empty list of strings or numbers"),
    "contains_any": (lambda v: isinstance(v, list) and bool(v) and all(map(_is_scalar, v)),
                     "a non-empty list of strings or numbers"),
    "contains": (_is_scalar, "a string or a number"),
    "regex": (lambda v: isinstance(v, str), "a string"),
    "min": (_is_number, "a number"),
    "max": (_is_number, "a number"),
    "present": (lambda v: isinstance(v, bool), "true or false"),
    "empty": (lambda v: isinstance(v, bool), "true or false"),
}


def _parse_check(operator: str, operand: Any, where: str) -> Check:
    accepts, expected = _OPERAND_RULES[operator]
    if not accepts(operand):
        raise _fail(where, f"{operator!r} must be {expected}, got {_kind(operand)} {operand!r}")
    if operator == "regex":
        try:
            return Check(operator, operand, re.compile(operand))
        except re.error as exc:
            raise _fail(where, f"invalid regex {operand!r}: {exc}") from exc
    return Check(operator, operand)


def _check_range(table: Mapping[str, Any], where: str) -> None:
    if "min" in table and "max" in table and table["min"] > table["max"]:
        raise _fail(where, f"min {table['min']} is greater than max {table['max']}: nothing can pass")


def _check_vr(path: TagPath, operators: list[str], where: str) -> None:
    value_ops = [op for op in operators if op not in ("present", "empty")]
    if not value_ops or path.vr is None:
        return
    if path.vr == "SQ":
        raise _fail(
            where,
            f"{path.text} is a sequence: only 'present' and 'empty' apply to it, not {value_ops[0]!r}; "
            f"test an attribute inside it with a path such as {path.text}.Keyword",
        )
    if set(path.vr.split(" or ")) <= _BINARY_VRS:
        raise _fail(where, f"{path.text} holds binary data (VR {path.vr}): only 'present' and 'empty' apply to it")
