"""The synthetic CT phantom: determinism, tissue attenuation, planted findings and
their truth, the T12/L1 rib rule on the label maps, field-of-view cuts, a DICOM
series the node loads and accepts (checked by dciodvfy too), the labelled case
folder and the command line.

Noise-free renders (``noise_sigma=0``) make the measurements exact enough to
compare with the truth within a few HU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.dicom_out.uids import derive_uid
from pipelines.offline.phantom import (
    BONE_DENSITY_CLASSES,
    HU_RANGES,
    LESION_TYPES,
    LEVEL_INDEX,
    LEVELS,
    ORGAN_IDS,
    ORGAN_LABELS,
    Grid,
    Phantom,
    PhantomError,
    RenderedPhantom,
    bone_density_class,
    kvp_bone_factor,
    main,
    render,
    sample_phantom,
    steatosis_class,
    write_case,
    write_dicom_series,
)
from pipelines.rules.ruleset import RuleSet, screen_series
from pipelines.volume.ct import load_series
from support.data import REPO
from support.validators import dciodvfy

QUIET = {"lesion_probability": 0.0, "lung_nodules": 0}


@cache
def clean_case(seed: int = 11, **options: object) -> tuple[Phantom, RenderedPhantom]:
    """A noise-free chest-abdomen phantom without lesions, rendered on the 3 mm grid."""
    phantom = sample_phantom(seed, noise_sigma=0, coverage="chest-abdomen", **QUIET, **options)
    return phantom, render(phantom, Grid.coarse(3.0, phantom))


def eroded(mask: np.ndarray, voxels: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=voxels)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_phantom_and_image_different_seed_different() -> None:
    first, second = sample_phantom(5), sample_phantom(5)
    assert first == second and first.to_json() == second.to_json()
    grid = Grid.coarse(4.0, first)
    a, b = render(first, grid), render(second, grid)
    for name in ("hu", "organs", "lesions", "vertebrae"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.truth == b.truth
    assert json.loads(json.dumps(a.truth)) == a.truth          # JSON-serialisable as it is

    other = sample_phantom(6)
    assert other != first
    assert other.body_profile != first.body_profile
    assert not np.array_equal(render(other, grid).hu, a.hu)


def test_phantom_json_round_trip_and_rerender() -> None:
    phantom = sample_phantom(42, lesions=[{"site": "liver", "diameter_mm": 15}])
    again = Phantom.from_json(phantom.to_json())
    assert again == phantom
    grid = Grid.coarse(6.0, phantom)
    assert np.array_equal(render(again, grid).hu, render(phantom, grid).hu)


def test_options_do_not_change_the_anatomy() -> None:
    """Acquisition, liver, bone and lesion options draw from their own streams."""
    plain = sample_phantom(9, **QUIET)
    varied = sample_phantom(9, noise_sigma=0, kvp=100, steatosis="moderate-severe", bone_density="osteoporotic",
                            **QUIET)
    assert varied.body_profile == plain.body_profile and varied.liver == plain.liver and varied.ribs == plain.ribs
    assert (varied.kvp, varied.noise_sigma_hu, varied.steatosis, varied.bone_density) == (
        100, 0.0, "moderate-severe", "osteoporotic")


# --------------------------------------------------------------------------- sampling ranges


def test_sampled_anatomy_and_acquisition_stay_in_range() -> None:
    phantoms = [sample_phantom(seed, **QUIET) for seed in range(16)]
    domes = []
    for p in phantoms:
        profile = np.asarray(p.body_profile)
        trunk = profile[:4]                                   # abdomen to the lung apex
        assert np.all((trunk[:, 1] >= 140) & (trunk[:, 1] <= 190)), p.seed
        assert np.all((trunk[:, 2] >= 100) & (trunk[:, 2] <= 145)), p.seed
        assert steatosis_class(p.tissues.liver) == p.steatosis
        assert bone_density_class(p.vertebra("L1").trabecular_hu) == p.bone_density
        assert 5 <= p.noise_sigma_hu <= 25 and p.kvp in (100, 120, 140)
        assert p.fov_top_mm > p.fov_bottom_mm
        assert [v.level for v in p.vertebrae] == list(LEVELS.values())
        assert all(upper.z_bottom - lower.z_top >= 5.9 for upper, lower in zip(p.vertebrae, p.vertebrae[1:]))
        assert sum(1 for rib in p.ribs) == 24 and all(rib.name.split()[1][0] == "T" for rib in p.ribs)
        domes.append(p.diaphragm.right_peak[2] - p.vertebra("T10").z_top)
    assert np.std(domes) > 5                                  # diaphragm height varies
    assert {p.steatosis for p in phantoms} == {"none", "mild", "moderate-severe"}
    assert {p.bone_density for p in phantoms} == set(BONE_DENSITY_CLASSES)


# --------------------------------------------------------------------------- attenuation


@pytest.mark.parametrize("blur", [False, True])
def test_label_medians_in_documented_ranges(blur: bool) -> None:
    phantom, _ = clean_case()
    rendered = render(phantom, Grid.coarse(3.0, phantom), blur=blur)
    hu, organs = rendered.hu, rendered.organs
    bone = kvp_bone_factor(phantom.kvp)                            # ranges are at 120 kVp
    expected = {
        "lung": HU_RANGES["lung"], "liver": HU_RANGES["liver"], "spleen": HU_RANGES["spleen"],
        "pancreas": HU_RANGES["pancreas"], "kidney": HU_RANGES["kidney"], "aorta": HU_RANGES["blood"],
        "vertebra": (HU_RANGES["trabecular_bone"][0] * bone, HU_RANGES["cortical_bone"][1] * bone),
        "rib": tuple(v * bone for v in HU_RANGES["rib"]) if not blur else (300.0, 700.0),  # 3 mm: partial volume
    }
    slack = 2.0 if blur else 0.5                                    # texture, and blur at organ edges
    for name, (low, high) in expected.items():
        median = float(np.median(hu[organs == ORGAN_IDS[name]]))
        assert low - slack <= median <= high + slack, f"{name} median {median} not in {low}..{high}"
    for name in ("stomach", "oesophagus", "colon"):               # hollow: wall and contents, no gas
        values = hu[(organs == ORGAN_IDS[name]) & (hu > -200)]
        assert -40 <= np.median(values) <= 50, name
    assert hu[0, 0, 0] == -1000                                     # outside air in the corner
    body = (organs == 0) & (hu > -300) & (hu < -50)                 # fat
    assert HU_RANGES["fat"][0] <= np.median(hu[body]) <= HU_RANGES["fat"][1]
    gas = hu[(organs == ORGAN_IDS["stomach"]) & (hu < -900)]
    assert gas.size > 0                                             # the stomach's gas cap


def test_noise_has_the_requested_sigma() -> None:
    phantom = sample_phantom(11, noise_sigma=20.0, coverage="chest-abdomen", **QUIET)
    grid = Grid.coarse(3.0, phantom)
    noisy, clean = render(phantom, grid).hu.astype(float), render(phantom, grid, noise=False).hu.astype(float)
    inside = eroded(clean_case()[1].organs == ORGAN_IDS["liver"], 2)
    assert np.std((noisy - clean)[inside]) == pytest.approx(20.0, rel=0.1)
    assert render(phantom, grid).truth["noise_sigma_hu"] == 20.0


# --------------------------------------------------------------------------- lesions


@pytest.mark.parametrize("site, kind, diameter, contrast", [
    ("liver", "malignant", 20.0, -12.0),
    ("liver", "cyst", 14.0, None),
    ("liver", "benign", 18.0, 10.0),
    ("pancreas", "malignant", 25.0, -15.0),
    ("stomach", "malignant", 20.0, -10.0),
    ("colon", "malignant", 30.0, -10.0),
    ("oesophagus", "malignant", 18.0, -10.0),
    ("lung", "nodule", 8.0, None),
])
def test_forced_lesion_has_its_size_contrast_and_organ(site: str, kind: str, diameter: float,
                                                        contrast: float | None) -> None:
    spec = {"site": site, "type": kind, "diameter_mm": diameter}
    if contrast is not None:
        spec["contrast_hu"] = contrast
    phantom = sample_phantom(7, noise_sigma=0, coverage="chest-abdomen", lesions=[spec], **QUIET)
    (lesion,) = phantom.lesions
    assert (lesion.site, lesion.type, lesion.diameter_mm) == (site, kind, diameter)
    assert phantom.fov_bottom_mm + diameter / 2 <= lesion.centre_mm[2] <= phantom.fov_top_mm - diameter / 2
    # a 1 mm grid around the lesion: the phantom renders on any grid
    centre = np.asarray(lesion.centre_mm)
    grid = Grid((int(2 * diameter) + 1,) * 3, (1.0, 1.0, 1.0), tuple(centre - diameter))
    rendered = render(phantom, grid)
    mask = rendered.lesions == 1
    (truth,) = rendered.truth["lesions"]
    nominal = 4 / 3 * np.pi * (diameter / 2) ** 3
    assert truth["volume_mm3"] == pytest.approx(nominal, rel=0.25)
    assert truth["voxel_count"] == mask.sum() and truth["visible"]
    assert np.all(rendered.organs[mask] == ORGAN_IDS[site])        # inside (and labelled as) its organ
    assert mask[tuple(truth["centre_voxel"])]
    assert rendered.truth["sites_with_lesions"] == [site]
    lesion_mean = float(rendered.hu[eroded(mask, 2)].mean())
    assert lesion_mean == pytest.approx(truth["hu"], abs=3)
    if kind == "cyst":
        assert 0 <= truth["hu"] <= 15
    elif kind == "nodule":
        assert 0 <= truth["hu"] <= 40 and 3 <= diameter <= 30
    else:
        assert truth["contrast_hu"] == contrast
    if site in ("liver", "pancreas"):                                # solid organ: measured contrast
        organ = eroded((rendered.organs == ORGAN_IDS[site]) & ~mask, 2)
        organ &= ndimage.distance_transform_edt(~mask) > 3
        measured = lesion_mean - float(np.median(rendered.hu[organ]))
        assert measured == pytest.approx(truth["contrast_hu"], abs=3.5)


def test_lesion_types_scheme_and_random_lesions() -> None:
    assert set(LESION_TYPES) == {"pancreas", "liver", "oesophagus", "stomach", "colon", "lung"}
    assert "cyst" in LESION_TYPES["pancreas"] and "cyst" in LESION_TYPES["liver"]
    assert "cyst" not in LESION_TYPES["stomach"] and LESION_TYPES["colon"] == ("malignant",)
    phantom = sample_phantom(3, lesion_probability=1.0, lung_nodules=2, coverage="chest-abdomen")
    sites = [lesion.site for lesion in phantom.lesions]
    assert sites.count("lung") == 2 and len(set(sites) - {"lung"}) >= 4
    assert [lesion.number for lesion in phantom.lesions] == list(range(1, len(sites) + 1))
    none = sample_phantom(3, lesion_probability=0.0, lung_nodules=0)
    assert none.lesions == ()


# --------------------------------------------------------------------------- steatosis and bone


@pytest.mark.parametrize("options, expected", [
    ({"steatosis": "mild"}, "mild"),
    ({"liver_hu": 30.0}, "moderate-severe"),
    ({"steatosis": "none"}, "none"),
])
def test_liver_truth_matches_the_image(options: dict, expected: str) -> None:
    _, rendered = clean_case(**options)
    truth = rendered.truth
    liver = eroded((rendered.organs == ORGAN_IDS["liver"]) & (rendered.lesions == 0), 1)
    spleen = eroded(rendered.organs == ORGAN_IDS["spleen"], 1)
    assert float(np.mean(rendered.hu[liver])) == pytest.approx(truth["liver_mean_hu"], abs=2)
    assert float(np.mean(rendered.hu[spleen])) == pytest.approx(truth["spleen_mean_hu"], abs=2)
    assert truth["steatosis"] == expected == steatosis_class(truth["liver_mean_hu"])
    assert truth["liver_minus_spleen_hu"] == pytest.approx(truth["liver_mean_hu"] - truth["spleen_mean_hu"], abs=0.02)


@pytest.mark.parametrize("options", [
    {"bone_density": "osteopenic"},
    {"bone_density": "osteoporotic", "kvp": 100},
    {"trabecular_hu": 200.0, "kvp": 140},
])
def test_bone_truth_matches_the_eroded_l1_body(options: dict) -> None:
    phantom, rendered = clean_case(**options)
    truth = rendered.truth
    l1 = eroded(rendered.vertebrae == LEVEL_INDEX["L1"], 2)
    assert l1.sum() > 20
    assert float(rendered.hu[l1].mean()) == pytest.approx(truth["l1_trabecular_mean_hu"], abs=10)
    assert truth["l1_trabecular_mean_hu"] == truth["trabecular_mean_hu"]["L1"]
    at_120 = truth["trabecular_mean_hu_120kvp"]["L1"]
    assert truth["trabecular_mean_hu"]["L1"] == pytest.approx(at_120 * kvp_bone_factor(phantom.kvp), abs=0.02)
    assert truth["bone_density"] == bone_density_class(at_120)
    if "bone_density" in options:
        assert truth["bone_density"] == options["bone_density"]
    t12 = eroded(rendered.vertebrae == LEVEL_INDEX["T12"], 2)       # the substitute level
    assert float(rendered.hu[t12].mean()) == pytest.approx(truth["trabecular_mean_hu"]["T12"], abs=10)


# --------------------------------------------------------------------------- T12 / L1 from ribs


def rib_rule(rendered: RenderedPhantom) -> tuple[str, str | None]:
    """Lowest vertebral body with a rib within 5 mm (T12), and the next body below it (L1),
    found on the organ masks alone; levels read from ``vertebrae`` only to name them."""
    spacing = rendered.grid.spacing_mm
    bodies, count = ndimage.label(rendered.organs == ORGAN_IDS["vertebra"], np.ones((3, 3, 3)))
    rib_distance = ndimage.distance_transform_edt(rendered.organs != ORGAN_IDS["rib"], sampling=spacing)
    found = []
    for i in range(1, count + 1):
        component = bodies == i
        level = LEVELS[int(np.bincount(rendered.vertebrae[component]).argmax())]
        found.append((float(np.argwhere(component)[:, 0].mean()), level, float(rib_distance[component].min())))
    found.sort()                                                     # by height, feet first
    ribbed = [f for f in found if f[2] <= 5.0]
    assert all(level.startswith("T") for _, level, _ in ribbed)
    assert all(d > 5.0 for _, level, d in found if level.startswith("L"))
    t12 = ribbed[0]
    below = [f for f in found if f[0] < t12[0]]
    return t12[1], (below[-1][1] if below else None)


@pytest.mark.parametrize("seed, spacing", [(11, 3.0), (23, 3.0), (31, 2.0), (47, 5.0)])
def test_rib_rule_finds_t12_and_l1_on_the_masks(seed: int, spacing: float) -> None:
    phantom = sample_phantom(seed, coverage="chest-abdomen", **QUIET)
    rendered = render(phantom, Grid.coarse(spacing, phantom), noise=False, blur=False)
    assert rib_rule(rendered) == ("T12", "L1")
    assert {"T12", "L1"} <= set(rendered.truth["levels_in_view"])


# --------------------------------------------------------------------------- field of view


def test_field_of_view_cuts_organs_and_truth_says_so() -> None:
    full_phantom, full = clean_case()
    assert "lung" not in full.truth["organs_cut"]                    # apex to L2-L3: lungs whole
    assert "L1" in full.truth["levels_in_view"] and full.truth["l1_trabecular_mean_hu"] is not None

    liver_middle = full_phantom.liver.centre[2]
    cut = sample_phantom(11, noise_sigma=0, fov_bottom_mm=liver_middle, **QUIET)
    assert cut.coverage == "custom" and cut.fov_bottom_mm == pytest.approx(liver_middle, abs=0.01)
    rendered = render(cut, Grid.coarse(3.0, cut), noise=False)
    truth = rendered.truth
    assert "liver" in truth["organs_cut"] and "liver" in truth["organs_in_view"]
    assert "L1" not in truth["levels_in_view"] and truth["l1_trabecular_mean_hu"] is None
    assert np.any(rendered.organs[0] == ORGAN_IDS["liver"])          # touches the first slice

    narrow = Grid.chest_ct(pixel_mm=0.5, rows=512, slice_mm=5.0, phantom=full_phantom)   # 256 mm across
    in_plane = render(full_phantom, narrow, noise=False, blur=False).truth
    assert "lung" in in_plane["organs_cut"] and "rib" in in_plane["organs_cut"]

    assert len({sample_phantom(s, coverage="chest", **QUIET).fov_bottom_mm > sample_phantom(s, **QUIET).vertebra(
        "L1").z_top for s in range(12)}) == 2                         # chest scans: L1 sometimes out of view


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_loads_matches_and_is_eligible(tmp_path: Path) -> None:
    phantom = sample_phantom(5, kvp=100)
    grid = Grid.chest_ct(pixel_mm=1.5, rows=256, slice_mm=5.0, phantom=phantom)
    rendered = render(phantom, grid)
    paths = write_dicom_series(rendered, grid, tmp_path / "a")
    assert len(paths) == grid.shape[0] and [p.name for p in paths][:2] == ["0001.dcm", "0002.dcm"]

    volume = load_series(paths)
    assert volume.shape == grid.shape
    assert np.array_equal(volume.hu, rendered.hu.astype(np.float32))  # ascending z, same HU
    assert volume.spacing_zyx == pytest.approx(grid.spacing_mm)
    assert volume.origin == pytest.approx(grid.origin_mm)
    assert np.allclose(volume.row_direction, [1, 0, 0]) and np.allclose(volume.column_direction, [0, 1, 0])
    assert np.allclose(volume.slice_direction, [0, 0, 1])

    decision = screen_series(paths, RuleSet.load(None))
    assert decision.eligible, decision.summary

    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.KVP == 100 and float(ds.SliceThickness) == 5.0 and ds.BodyPartExamined == "CHEST"
    assert ds.StudyDescription == "CT CHEST WO CONTRAST" and "synthetic phantom" in ds.SeriesDescription
    assert ds.Manufacturer == "pacs-ai-node phantom" and str(ds.PatientName) == "PHANTOM^5"
    assert "ContrastBolusAgent" not in ds and "ContrastBolusRoute" not in ds
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, -1024, 0)
    assert ds.InstanceNumber == 1 and float(ds.ImagePositionPatient[2]) == pytest.approx(volume.frames[-1].position[2])
    assert ds.StudyInstanceUID == derive_uid("pacs-ai-node-phantom", "5", "study")
    errors, _ = dciodvfy(paths[0])
    assert errors == [], errors

    again = write_dicom_series(rendered, grid, tmp_path / "b")          # deterministic UIDs
    first_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in again] == first_uids
    other = write_dicom_series(render(phantom, Grid.coarse(8.0, phantom)), Grid.coarse(8.0, phantom), tmp_path / "c",
                               patient_name="DOE^JANE", patient_id="X1")
    first_other = pydicom.dcmread(other[0], stop_before_pixels=True)
    assert first_other.StudyInstanceUID == ds.StudyInstanceUID
    assert first_other.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert first_other.SeriesInstanceUID != ds.SeriesInstanceUID          # another grid, another series
    assert (str(first_other.PatientName), first_other.PatientID) == ("DOE^JANE", "X1")
    with pytest.raises(PhantomError, match="does not match"):
        write_dicom_series(rendered, Grid.coarse(8.0, phantom), tmp_path / "d")


# --------------------------------------------------------------------------- speed


def test_coarse_render_is_fast() -> None:
    phantom = sample_phantom(8)
    grid = Grid.coarse(3.0, phantom)
    assert 90 <= grid.shape[0] <= 150 and 70 <= grid.shape[1] <= 120 and 95 <= grid.shape[2] <= 140
    render(phantom, grid)                                              # warm caches
    started = time.perf_counter()
    render(phantom, grid)
    assert time.perf_counter() - started < 3.0


# --------------------------------------------------------------------------- case folder and CLI


def test_write_case_layout(tmp_path: Path) -> None:
    phantom = sample_phantom(13, lesions=[{"site": "pancreas", "diameter_mm": 20}], lung_nodules=1)
    grid = Grid.coarse(5.0, phantom)
    case = write_case(phantom, grid, tmp_path / "case_0000")
    dicom = sorted((case / "dicom").glob("*.dcm"))
    assert len(dicom) == grid.shape[0]
    volume = load_series(dicom)
    with np.load(case / "labels.npz") as labels:
        assert set(labels.files) == {"organs", "lesions", "vertebrae"}
        arrays = {name: labels[name] for name in labels.files}
    rendered = render(phantom, grid)
    for name, array in arrays.items():
        assert array.dtype == np.uint8 and array.shape == volume.shape
        assert np.array_equal(array, getattr(rendered, name)), name
    assert np.array_equal(volume.hu, rendered.hu.astype(np.float32))
    truth = json.loads((case / "truth.json").read_text())
    assert truth["label_names"] == {str(k): v for k, v in ORGAN_LABELS.items()}
    assert truth["level_names"]["13"] == "L1"
    assert Grid.from_dict(truth["grid"]) == grid
    assert Phantom.from_dict(truth["phantom"]) == phantom
    for key in ("kvp", "noise_sigma_hu", "slice_thickness_mm", "liver_mean_hu", "spleen_mean_hu", "steatosis",
                "bone_density", "trabecular_mean_hu", "levels_in_view", "organs_cut", "lesions",
                "sites_with_lesions"):
        assert key in truth, key
    assert truth["lesions"][0]["site"] == "pancreas" and "pancreas" in truth["sites_with_lesions"]
    assert truth["slice_thickness_mm"] == 5.0


def test_command_line_writes_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--cases", "2", "--seed", "100", "--spacing", "6", "--no-dicom"]) == 0
    for i, seed in enumerate((100, 101)):
        case = tmp_path / "out" / f"case_{i:04d}"
        assert {p.name for p in case.iterdir()} == {"image.npz", "labels.npz", "truth.json"}
        assert json.loads((case / "truth.json").read_text())["seed"] == seed
        with np.load(case / "image.npz") as image:
            assert image["hu"].dtype == np.int16 and tuple(image["spacing_mm"]) == (6.0, 6.0, 6.0)
    assert "case_0001: seed 101" in capsys.readouterr().out
    done = subprocess.run([sys.executable, "-m", "pipelines.offline.phantom", str(tmp_path / "cli"), "--spacing", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cli" / "case_0000" / "dicom").glob("*.dcm"))) > 10


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("options, message", [
    ({"lesions": [{"site": "brain"}]}, "unknown site 'brain'"),
    ({"lesions": [{"site": "stomach", "type": "cyst"}]}, "type 'cyst' is not one of"),
    ({"lesions": [{"site": "liver", "diameter_mm": 100}]}, "diameter_mm must be 2-60 mm, got 100"),
    ({"lesions": [{"site": "liver", "size": 10}]}, "unknown key"),
    ({"steatosis": "severe"}, "steatosis must be one of"),
    ({"bone_density": "weak"}, "bone_density must be one of"),
    ({"coverage": "pelvis"}, "coverage must be one of"),
    ({"lesion_probability": {"brain": 0.5}}, "unknown site"),
    ({"lesion_probability": 2.0}, "must be 0-1"),
    ({"fov_top_mm": 10.0, "fov_bottom_mm": 0.0}, "at least 20 mm above"),
    ({"fov_bottom_mm": 180.0, "fov_top_mm": 300.0, "lesions": [{"site": "liver"}]}, "liver is not in the field"),
])
def test_bad_options_raise_naming_the_value(options: dict, message: str) -> None:
    with pytest.raises(PhantomError, match=message):
        sample_phantom(1, **options)


def test_bad_arguments_raise() -> None:
    with pytest.raises(PhantomError, match="seed must be a non-negative integer"):
        sample_phantom(-1)
    with pytest.raises(TypeError, match="lesions\\[0\\] must be a mapping"):
        sample_phantom(1, lesions=["liver"])
    with pytest.raises(PhantomError, match="spacing_mm must be positive"):
        Grid((10, 10, 10), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(PhantomError, match="shape must be positive integers"):
        Grid((10, 2.5, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="grid must be a Grid"):
        render(sample_phantom(1, **QUIET), (10, 10, 10))  # type: ignore[arg-type]
