"""Eligibility rules: the TOML language, its validation, the default rules on real
and edited series, and the ``rules check`` dry run.

Variants are edited copies of the headers of ``tests/data/abdomen-noncontrast-112``
(read without pixel data); the files themselves are never modified.
"""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from pipelines.errors import PacsAiError
from pipelines.rules.ruleset import DEFAULT_RULES_PATH, Decision, RulesError, RuleSet, screen_series, series_values
from support.data import DATA, REPO, abdomen_files

ENHANCED = DATA / "single-slices" / "eCT_Supplemental.dcm"
SUBSET = slice(40, 60)  # 20 slices, 60 mm: enough for the default rules, quick to copy


@lru_cache(maxsize=1)
def _abdomen_headers() -> tuple[Dataset, ...]:
    return tuple(pydicom.dcmread(str(p), stop_before_pixels=True) for p in abdomen_files())


def abdomen(part: slice = SUBSET) -> list[Dataset]:
    """Fresh copies of abdomen headers (file order = ascending z)."""
    return [copy.deepcopy(ds) for ds in _abdomen_headers()[part]]


@lru_cache(maxsize=1)
def default_rules() -> RuleSet:
    return RuleSet.load(None)


def failures(decision: Decision) -> dict[str, str]:
    return {f.rule_id: f.reason for f in decision.failures}


# --------------------------------------------------------------------------- default rules on real series


def test_real_abdomen_series_is_eligible() -> None:
    decision = screen_series(abdomen_files(), default_rules())
    assert decision.eligible, decision.summary
    assert decision.reasons == []
    assert decision.summary == f"eligible: all {len(default_rules().rules)} rules passed"
    assert decision.values == {
        "slice_count": 112,
        "instance_count": 112,
        "slice_spacing_mm": 3.0,
        "coverage_mm": 336.0,
        "orientation": "AXIAL",
        "gantry_tilt_deg": 0.0,
        "geometry_problem": None,
    }


def test_default_rules_are_the_packaged_file() -> None:
    # Package data of pipelines.rules (setup.cfg).
    assert DEFAULT_RULES_PATH.name == "default_rules.toml"
    assert DEFAULT_RULES_PATH.parent.parts[-2:] == ("pipelines", "rules")
    assert default_rules().ids == [
        "modality_ct", "ct_image_storage", "not_localizer", "not_reformatted", "not_virtual_non_contrast",
        "no_contrast_agent", "no_contrast_administered", "axial", "slice_thickness", "min_slices",
        "min_coverage", "consistent_geometry", "no_gantry_tilt",
    ]


def test_the_subset_used_below_is_eligible() -> None:
    assert default_rules().evaluate(abdomen()).eligible


def _set(keyword: str, value: object) -> Callable[[list[Dataset]], list[Dataset]]:
    def edit(datasets: list[Dataset]) -> list[Dataset]:
        for ds in datasets:
            setattr(ds, keyword, value)
        return datasets

    return edit


def _usage(administered: str) -> Callable[[list[Dataset]], list[Dataset]]:
    """An Enhanced-CT-style Contrast/Bolus Usage Sequence on every slice."""

    def edit(datasets: list[Dataset]) -> list[Dataset]:
        for ds in datasets:
            item = Dataset()
            item.ContrastBolusAgentNumber = 1
            item.ContrastBolusAgentAdministered = administered
            ds.ContrastBolusUsageSequence = DicomSequence([item])
        return datasets

    return edit


def _vnc(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL", "VNC"]
        ds.ContrastBolusAgent = "IOMERON 400"  # VNC images keep the contrast module
        ds.ContrastBolusRoute = "IV"
    return datasets


def _coronal(datasets: list[Dataset]) -> list[Dataset]:
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # normal along +y (posterior)
        ds.ImagePositionPatient = [-185.0437, -150.0 + 3.0 * k, 200.0]
    return datasets


def _gap(datasets: list[Dataset]) -> list[Dataset]:
    del datasets[10]
    return datasets


def _mixed_frame_of_reference(datasets: list[Dataset]) -> list[Dataset]:
    datasets[7].FrameOfReferenceUID = generate_uid()
    return datasets


def _gantry_tilt(datasets: list[Dataset]) -> list[Dataset]:
    """A 15 degree tilted gantry: tilted image planes, positions moving with the table along z."""
    a = np.deg2rad(15)
    for ds in datasets:
        ds.GantryDetectorTilt = 15
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(a)), float(np.sin(a))]
    return datasets


def _no_thickness(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        del ds.SliceThickness
    return datasets


def _contrast_on_some(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets[5:8]:
        ds.ContrastBolusAgent = "OMNIPAQUE"
    return datasets


VARIANTS = {
    "contrast-agent": (
        _set("ContrastBolusAgent", "OMNIPAQUE"),
        {"no_contrast_agent": 'contrast agent present (Contrast/Bolus Agent = "OMNIPAQUE")'},
    ),
    "contrast-route-only": (
        _set("ContrastBolusRoute", "IV"),
        {"no_contrast_agent": 'contrast agent present (Contrast/Bolus Route = "IV")'},
    ),
    "contrast-on-3-slices": (
        _contrast_on_some,
        {"no_contrast_agent": 'contrast agent present (Contrast/Bolus Agent = "OMNIPAQUE"; on 3 of 20 slices)'},
    ),
    "agent-administered-yes": (
        _usage("YES"),
        {
            "no_contrast_administered": "contrast agent administered (Contrast/Bolus Usage Sequence present "
            '(1 item), Contrast/Bolus Agent Administered = "YES")'
        },
    ),
    "virtual-non-contrast": (
        _vnc,
        {
            "not_virtual_non_contrast": 'virtual non-contrast image (Image Type = "DERIVED\\PRIMARY\\AXIAL\\VNC")',
            "no_contrast_agent": 'contrast agent present (Contrast/Bolus Agent = "IOMERON 400", '
            'Contrast/Bolus Route = "IV")',
        },
    ),
    "localizer": (
        _set("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        {"not_localizer": 'localizer (scout) image (Image Type = "ORIGINAL\\PRIMARY\\LOCALIZER")'},
    ),
    "mpr": (
        _set("ImageType", ["DERIVED", "SECONDARY", "MPR"]),
        {"not_reformatted": 'reformatted or projection image (Image Type = "DERIVED\\SECONDARY\\MPR")'},
    ),
    "coronal-reformat": (_coronal, {"axial": 'not an axial series (orientation = "CORONAL")'}),
    "slice-thickness-7mm": (
        _set("SliceThickness", "7"),
        {"slice_thickness": "slice thickness over 5 mm or not recorded (Slice Thickness = 7)"},
    ),
    "slice-thickness-missing": (
        _no_thickness,
        {"slice_thickness": "slice thickness over 5 mm or not recorded (Slice Thickness absent)"},
    ),
    "missing-slice": (
        _gap,
        {
            "consistent_geometry": 'inconsistent slice geometry (geometry_problem = "missing slices: gap of '
            '6.00 mm between slices 10 and 11 where the spacing is 3.00 mm (about 1 missing)")'
        },
    ),
    "mixed-frame-of-reference": (
        _mixed_frame_of_reference,
        {
            "consistent_geometry": 'inconsistent slice geometry (geometry_problem = "different Frame of '
            'Reference UIDs (2 distinct values of FrameOfReferenceUID)")'
        },
    ),
    "gantry-tilt": (
        _gantry_tilt,
        {
            "consistent_geometry": 'inconsistent slice geometry (geometry_problem = "slice positions are not '
            'along the image normal (gantry tilt or sheared stack)")',
            "no_gantry_tilt": "gantry tilt (gantry_tilt_deg = 15)",
        },
    ),
    "too-few-slices": (
        lambda datasets: datasets[:5],
        {
            "min_slices": "too few slices (slice_count = 5)",
            "min_coverage": "too short a scan (coverage_mm = 15)",
        },
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_edited_series_is_rejected_with_its_reasons(name: str) -> None:
    edit, expected = VARIANTS[name]
    decision = default_rules().evaluate(edit(abdomen()))
    assert not decision.eligible
    assert failures(decision) == expected
    assert decision.summary == "rejected: " + "; ".join(expected.values())


def test_gantry_tilt_variant_is_still_axial() -> None:
    """15 degrees off the z axis is still an axial acquisition: tilt, not orientation, rejects it."""
    values = series_values(_gantry_tilt(abdomen()))
    assert values["orientation"] == "AXIAL"
    assert values["gantry_tilt_deg"] == 15.0


@pytest.mark.parametrize(
    "edit",
    [
        _set("ContrastBolusAgent", ""),
        _usage("NO"),
        _set("GantryDetectorTilt", 0),
        _set("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
    ],
    ids=["empty-agent", "agent-administered-no", "zero-tilt", "original-primary-axial"],
)
def test_allowed_variants_stay_eligible(edit: Callable[[list[Dataset]], list[Dataset]]) -> None:
    decision = default_rules().evaluate(edit(abdomen()))
    assert decision.eligible, decision.summary


def test_enhanced_ct_is_evaluated_per_frame() -> None:
    decision = screen_series([ENHANCED], default_rules())
    assert failures(decision) == {
        "no_contrast_administered": "contrast agent administered (Contrast/Bolus Usage Sequence present (1 item), "
        'Contrast/Bolus Agent Administered = "YES")',
        "slice_thickness": "slice thickness over 5 mm or not recorded (Slice Thickness = 10.0000)",
        "min_slices": "too few slices (slice_count = 2)",
        "min_coverage": "too short a scan (coverage_mm = 20)",
    }
    assert decision.values["orientation"] == "AXIAL"  # (-1,0,0) x (0,1,0): normal along -z
    assert decision.values["instance_count"] == 1
    assert decision.values["geometry_problem"] is None


def test_enhanced_ct_per_frame_groups_override_shared_ones() -> None:
    ds = pydicom.dcmread(str(ENHANCED), stop_before_pixels=True)
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    ds.PerFrameFunctionalGroupsSequence[1].CTImageFrameTypeSequence = DicomSequence([frame_type])
    reasons = failures(default_rules().evaluate([ds]))
    assert reasons["not_localizer"] == (
        'localizer (scout) image (Frame Type = "ORIGINAL\\PRIMARY\\LOCALIZER\\NONE"; on 1 of 2 slices)'
    )


def test_unreadable_file_is_one_more_reason(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not DICOM" * 10)
    decision = screen_series([*abdomen_files()[SUBSET], bad], default_rules())
    assert decision.failures[0].rule_id == "readable"
    assert decision.reasons[0].startswith("unreadable instance broken.dcm")
    assert set(failures(decision)) == {"readable"}  # the 20 readable slices pass the rules


def test_no_headers_is_rejected() -> None:
    reasons = failures(default_rules().evaluate([]))
    assert reasons["min_slices"] == "too few slices (slice_count = 0)"
    assert reasons["consistent_geometry"] == 'inconsistent slice geometry (geometry_problem = "no instances")'


# --------------------------------------------------------------------------- the rule language


def one_rule(condition: str, reason: str = "failed") -> RuleSet:
    return RuleSet.from_toml(f'[[rule]]\nid = "r"\nreason = "{reason}"\n{condition}\n', "test.toml")


def ct_header(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def passes(condition: str, *headers: Dataset) -> bool:
    return one_rule(condition).evaluate(list(headers) or [ct_header()]).eligible


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('tag = "Modality"\nequals = "CT"', True),
        ('tag = "Modality"\nequals = "MR"', False),
        ('tag = "SliceThickness"\nequals = 2.5', True),  # numbers compare as numbers ...
        ('tag = "SliceThickness"\nequals = "2.5"', True),  # ... strings as the stored text
        ('tag = "ImageType"\nequals = ["ORIGINAL", "PRIMARY", "AXIAL"]', True),
        ('tag = "ImageType"\nequals = ["ORIGINAL", "AXIAL"]', False),
        ('tag = "ImageType"\nequals = "AXIAL"', False),  # a single value must match every value
        ('tag = "Modality"\nin = ["CT", "MR"]', True),
        ('tag = "Modality"\nin = ["MR", "PT"]', False),
        ('tag = "ImageType"\nin = ["ORIGINAL", "PRIMARY", "AXIAL", "LOCALIZER"]', True),
        ('tag = "Modality"\nregex = "^C"', True),
        ('tag = "ImageType"\nregex = "^(ORIGINAL|PRIMARY|AXIAL)$"', True),
        ('tag = "ImageType"\nregex = "^ORIG"', False),
        ('tag = "SliceThickness"\nmin = 1\nmax = 5', True),
        ('tag = "SliceThickness"\nmax = 2', False),
        ('tag = "SliceThickness"\nmin = 3', False),
        ('tag = "KVP"\nmin = 80\nmax = 140', True),
        ('tag = "Modality"\nmin = 0', False),  # text is not a number
        ('tag = "ImageType"\ncontains = "AXIAL"', True),
        ('tag = "ImageType"\ncontains = "LOCALIZER"', False),
        ('tag = "ImageType"\ncontains_any = ["MPR", "AXIAL"]', True),
        ('tag = "ImageType"\ncontains_any = ["MPR", "VNC"]', False),
        ('tag = "Modality"\npresent = true', True),
        ('tag = "ContrastBolusAgent"\npresent = false', True),
        ('tag = "ContrastBolusAgent"\nempty = true', True),
        ('tag = "Modality"\nempty = false', True),
        ('tag = "Modality"\nempty = true', False),
        ('tag = "(0008,0060)"\nequals = "CT"', True),
        ('tag = "(0018,0010)"\npresent = false', True),
        ('tag = "ContrastBolusAgent"\nequals = "X"', False),  # absent fails value operators
        ('tag = "ContrastBolusAgent"\nregex = ".*"', False),
    ],
)
def test_operators(condition: str, expected: bool) -> None:
    assert passes(condition) is expected


def test_present_and_empty_tell_absent_from_empty() -> None:
    empty = ct_header(ContrastBolusAgent="")
    assert not passes('tag = "ContrastBolusAgent"\npresent = false', empty)
    assert passes('tag = "ContrastBolusAgent"\npresent = true', empty)
    assert passes('tag = "ContrastBolusAgent"\nempty = true', empty)
    reason = one_rule('tag = "ContrastBolusAgent"\npresent = false', "agent").evaluate([empty]).reasons
    assert reason == ["agent (Contrast/Bolus Agent empty)"]


def test_groups_nest() -> None:
    condition = """all = [
  { tag = "Modality", equals = "CT" },
  { any = [ { tag = "SliceThickness", max = 1 }, { not = { tag = "ImageType", contains = "LOCALIZER" } } ] },
]"""
    assert passes(condition)
    assert not passes(condition, ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert passes(condition, ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SliceThickness=1))
    assert not passes(condition, ct_header(Modality="MR"))
    assert passes('not = { not = { tag = "Modality", equals = "CT" } }')
    assert not passes('any = [ { tag = "Modality", equals = "MR" }, { tag = "KVP", max = 100 } ]')


def test_reason_shows_the_values_that_decided() -> None:
    rules = one_rule(
        """any = [ { tag = "Modality", equals = "MR" }, { tag = "KVP", max = 100 } ]""", "wrong modality or kVp"
    )
    assert rules.evaluate([ct_header()]).reasons == ['wrong modality or kVp (Modality = "CT", KVP = 120)']
    # all: only the members that failed; not: what its member matched
    rules = one_rule('all = [ { tag = "Modality", equals = "CT" }, { tag = "KVP", max = 100 } ]', "kVp")
    assert rules.evaluate([ct_header()]).reasons == ["kVp (KVP = 120)"]
    rules = one_rule('not = { tag = "ImageType", contains = "AXIAL" }', "axial")
    assert rules.evaluate([ct_header()]).reasons == ['axial (Image Type = "ORIGINAL\\PRIMARY\\AXIAL")']


def test_patient_data_is_never_shown_in_a_reason() -> None:
    headers = [ct_header(PatientName="Doe^Jane", PatientID="MRN-12345")]
    reasons = one_rule(
        'any = [ { tag = "PatientName", equals = "Test^Phantom" }, { tag = "PatientID", regex = "^PHANTOM" } ]',
        "not a phantom",
    ).evaluate(headers).reasons
    assert reasons == [
        "not a phantom (Patient's Name = (patient data, not shown), Patient ID = (patient data, not shown))"
    ]
    assert "Doe" not in reasons[0] and "12345" not in reasons[0]


def test_a_rule_must_hold_on_every_slice() -> None:
    headers = [ct_header(), ct_header(Modality="MR"), ct_header()]
    assert one_rule('tag = "Modality"\nequals = "CT"', "not CT").evaluate(headers).reasons == [
        'not CT (Modality = "MR"; on 1 of 3 slices)'
    ]


def test_sequence_paths_collect_every_item() -> None:
    items = []
    for answer in ("NO", "YES"):
        item = Dataset()
        item.ContrastBolusAgentAdministered = answer
        items.append(item)
    ds = ct_header(ContrastBolusUsageSequence=DicomSequence(items))
    path = "ContrastBolusUsageSequence.ContrastBolusAgentAdministered"
    assert not passes(f'tag = "{path}"\nequals = "NO"', ds)
    assert passes(f'tag = "{path}"\ncontains = "YES"', ds)
    assert passes('tag = "(0018,9341).(0018,9342)"\nin = ["NO", "YES"]', ds)
    assert passes('tag = "ContrastBolusUsageSequence"\nempty = false', ds)
    reasons = one_rule(f'tag = "{path}"\nequals = "NO"', "given").evaluate([ds]).reasons
    assert reasons == ['given (Contrast/Bolus Agent Administered = "NO\\YES")']


def test_derived_values() -> None:
    headers = abdomen()
    assert passes('derived = "slice_count"\nequals = 20', *headers)
    assert passes('derived = "coverage_mm"\nmin = 60\nmax = 60', *headers)
    assert passes('derived = "slice_spacing_mm"\nequals = 3', *headers)
    assert passes('derived = "orientation"\nin = ["AXIAL", "OBLIQUE"]', *headers)
    assert passes('derived = "orientation"\nregex = "^AX"', *headers)
    assert passes('derived = "geometry_problem"\npresent = false', *headers)
    assert passes('derived = "instance_count"\nequals = 20', *headers, *copy.deepcopy(headers[:3]))  # duplicates
    reasons = one_rule('derived = "coverage_mm"\nmin = 100', "short").evaluate(headers).reasons
    assert reasons == ["short (coverage_mm = 60)"]
    reasons = one_rule('derived = "slice_spacing_mm"\nmin = 1', "spacing").evaluate(headers[:1]).reasons
    assert reasons == ["spacing (slice_spacing_mm unknown)"]


def test_a_permissive_rules_file_accepts_what_the_default_rejects(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[[rule]]\nid = "ct"\nreason = "not CT"\ntag = "Modality"\nequals = "CT"\n')
    rules = RuleSet.load(path)
    assert rules.source == str(path) and rules.ids == ["ct"]
    contrast = _set("ContrastBolusAgent", "OMNIPAQUE")(abdomen())
    assert rules.evaluate(contrast).summary == "eligible: all 1 rules passed"


# --------------------------------------------------------------------------- validation


RULE = '[[rule]]\nid = "r1"\nreason = "why"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\n", "invalid TOML"),
        ("", "no rules"),
        ('rules = []\n', "unknown top-level key 'rules'"),
        ('[[rule]]\nreason = "x"\ntag = "Modality"\nequals = "CT"\n', "rule #1: id missing"),
        ('[[rule]]\nid = "has space"\nreason = "x"\ntag = "Modality"\nequals = "CT"\n', "rule #1: id 'has space'"),
        (RULE + 'tag = "Modality"\nequals = "CT"\n' + RULE + 'tag = "Modality"\nequals = "CT"\n',
         "rule 'r1': the id is used twice"),
        ('[[rule]]\nid = "r1"\ntag = "Modality"\nequals = "CT"\n', "rule 'r1': 'reason' missing or empty"),
        (RULE + 'tag = "Modality"\nequal = "CT"\n', "rule 'r1': unknown key 'equal'; did you mean 'equals'?"),
        (RULE + 'tag = "Modalty"\nequals = "CT"\n',
         "rule 'r1': unknown DICOM keyword 'Modalty'; did you mean Modality"),
        (RULE + 'tag = "Slice Thickness"\nmax = 5\n', "did you mean SliceThickness"),
        (RULE + 'tag = "(0018,00GG)"\npresent = true\n', "malformed tag '(0018,00GG)'; write (gggg,eeee)"),
        (RULE + 'tag = "Modality"\nregex = "(CT"\n',
         "rule 'r1': invalid regex '(CT': missing ), unterminated subpattern"),
        (RULE + 'tag = "SliceThickness"\nmax = "5"\n', "rule 'r1': 'max' must be a number, got string '5'"),
        (RULE + 'tag = "SliceThickness"\nmin = true\n', "'min' must be a number, got boolean True"),
        (RULE + 'tag = "Modality"\nequals = true\n', "'equals' must be a string, a number or a non-empty list"),
        (RULE + 'tag = "Modality"\nin = "CT"\n', "'in' must be a non-empty list of strings or numbers, got string"),
        (RULE + 'tag = "Modality"\nin = []\n', "'in' must be a non-empty list"),
        (RULE + 'tag = "ImageType"\ncontains = ["A"]\n', "'contains' must be a string or a number, got list"),
        (RULE + 'tag = "Modality"\npresent = "yes"\n', "'present' must be true or false, got string 'yes'"),
        (RULE + 'tag = "SliceThickness"\nmin = 5\nmax = 1\n', "min 5 is greater than max 1"),
        (RULE + 'tag = "Modality"\n', "rule 'r1': no operator for tag 'Modality'"),
        (RULE, "rule 'r1': no condition"),
        (RULE + 'tag = 8\nequals = "CT"\n', "'tag' must be a DICOM keyword"),
        (RULE + 'tag = "Modality"\nderived = "slice_count"\nequals = "CT"\n', "either 'tag' or 'derived'"),
        (RULE + 'derived = "slices"\nmin = 10\n', "unknown derived value 'slices' (known: slice_count"),
        (RULE + 'derived = "orientation"\nmin = 1\n', "derived value 'orientation' is text; 'min' needs a number"),
        (RULE + 'derived = "coverage_mm"\nregex = "5"\n', "derived value 'coverage_mm' is a number"),
        (RULE + 'all = []\n', "'all' takes a non-empty list of condition tables, got list []"),
        (RULE + 'any = { tag = "Modality", equals = "CT" }\n', "'any' takes a non-empty list"),
        (RULE + 'not = [{ tag = "Modality", equals = "CT" }]\n', "'not' takes one condition table, got list"),
        (RULE + 'all = ["Modality"]\n', "rule 'r1' > all[1]: a condition must be a table, got string"),
        (RULE + 'tag = "Modality"\nequals = "CT"\nall = [{ tag = "Modality", equals = "CT" }]\n',
         "'all' cannot be combined with 'tag' in one table; nest them"),
        (RULE + 'all = [{ tag = "Modality", equals = "CT" }, { any = [{ tag = "KVP", maxx = 1 }] }]\n',
         "rule 'r1' > all[2] > any[1]: unknown key 'maxx'; did you mean 'max'?"),
        (RULE + 'tag = "ContrastBolusUsageSequence"\nequals = "NO"\n',
         "ContrastBolusUsageSequence is a sequence: only 'present' and 'empty' apply to it, not 'equals'"),
        (RULE + 'tag = "Modality.CodeValue"\nequals = "CT"\n', "'Modality' is not a sequence (VR CS)"),
        (RULE + 'tag = "PixelData"\nequals = "x"\n', "PixelData holds binary data (VR OB or OW)"),
        ('rule = ["x"]\n', "rule #1 is not a table"),
    ],
)
def test_invalid_rules_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(RulesError) as info:
        RuleSet.from_toml(text, "site.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("rules file site.toml")
    assert isinstance(info.value, PacsAiError)


def test_missing_rules_file_is_a_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"rules file .*nope\.toml: cannot be read"):
        RuleSet.load(tmp_path / "nope.toml")


def test_rule_text_is_data_not_code() -> None:
    """Operands are compared, never evaluated: a Python expression is just a string that does not match."""
    assert not passes('tag = "Modality"\nequals = "__import__(\'os\').getcwd()"')
    assert passes('tag = "Modality"\nregex = "^(?!__import__).*$"')


# --------------------------------------------------------------------------- rules check


def _write_series(folder: Path, datasets: list[Dataset]) -> None:
    folder.mkdir(parents=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"IM{k:04d}.dcm")


def _contrast_copy(files: list[Path]) -> list[Dataset]:
    """Full copies of ``files`` as a new series given OMNIPAQUE."""
    series_uid = generate_uid()
    datasets = []
    for path in files:
        ds = pydicom.dcmread(str(path))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = 2
        ds.SeriesDescription = "with contrast"
        ds.ContrastBolusAgent = "OMNIPAQUE"
        datasets.append(ds)
    return datasets


@pytest.fixture
def check_folder(tmp_path: Path) -> tuple[Path, str, str]:
    """A folder with 20 slices of the eligible series, a rejected contrast copy, and a text file."""
    files = abdomen_files()[SUBSET]
    folder = tmp_path / "incoming"
    (folder / "eligible").mkdir(parents=True)
    for path in files:
        shutil.copy(path, folder / "eligible" / path.name)
    contrast = _contrast_copy(files)
    _write_series(folder / "nested" / "contrast", contrast)
    (folder / "notes.txt").write_text("not DICOM")
    eligible_uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    return folder, eligible_uid, str(contrast[0].SeriesInstanceUID)


RUN_CLI = (
    "import argparse, sys, node.cli.rules as m\n"
    "p = argparse.ArgumentParser(prog='pacs-ai-node')\n"
    "m.add_parser(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_rules_check_end_to_end(check_folder: tuple[Path, str, str]) -> None:
    folder, eligible_uid, contrast_uid = check_folder
    result = run_cli("rules", "check", str(folder))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"skipped {folder / 'notes.txt'}: not a DICOM file" in lines
    description = "example_ct.nii.gz wrapped as DICOM (3 mm)"
    assert f'series {eligible_uid}: would run (20 instances, series 1 "{description}")' in lines
    rejected = lines.index(f'series {contrast_uid}: rejected (20 instances, series 2 "with contrast")')
    assert lines[rejected + 1] == '  no_contrast_agent: contrast agent present (Contrast/Bolus Agent = "OMNIPAQUE")'
    assert lines[-1] == f"2 series checked with {DEFAULT_RULES_PATH} (13 rules): 1 would run, 1 rejected"


def test_rules_check_with_a_site_rules_file(check_folder: tuple[Path, str, str], tmp_path: Path) -> None:
    folder, eligible_uid, contrast_uid = check_folder
    site = tmp_path / "site.toml"
    site.write_text('[[rule]]\nid = "ct"\nreason = "not CT"\ntag = "Modality"\nequals = "CT"\n')
    out = io.StringIO()
    args = argparse.Namespace(paths=[str(folder / "eligible"), str(folder / "nested")], rules=site)
    from node.cli.rules import cmd_rules_check

    assert cmd_rules_check(args, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1] == f"2 series checked with {site} (1 rules): 2 would run, 0 rejected"
    assert any(line.startswith(f"series {contrast_uid}: would run") for line in lines)


def test_rules_check_refuses_invalid_rules_with_exit_2(check_folder: tuple[Path, str, str], tmp_path: Path) -> None:
    folder, _, _ = check_folder
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nid = "thin"\nreason = "thick"\ntag = "SliceThickness"\nmax = "5"\n')
    result = run_cli("rules", "check", str(folder), "--rules", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"error: rules file {bad}: rule 'thin': 'max' must be a number, got string '5'" in result.stderr


def test_rules_check_exit_codes_without_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli.rules import cmd_rules_check

    (tmp_path / "empty").mkdir()
    assert cmd_rules_check(argparse.Namespace(paths=[str(tmp_path / "empty")], rules=None)) == 1
    assert "no DICOM series found" in capsys.readouterr().out
    assert cmd_rules_check(argparse.Namespace(paths=[str(tmp_path / "absent")], rules=None)) == 2
    assert "absent does not exist" in capsys.readouterr().err


def test_rules_check_takes_single_files() -> None:
    result = run_cli("rules", "check", str(ENHANCED))
    assert result.returncode == 0, result.stderr
    assert "  min_slices: too few slices (slice_count = 2)" in result.stdout.splitlines()
