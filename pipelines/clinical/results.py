"""Typed results of one bundle's analysis, as the result writers and the summary read them.

These sit below both the analysis (which makes them) and the writers
(:mod:`pipelines.dicom_out.report`, :mod:`pipelines.clinical.risk`, the key
images), so that neither has to import the other. Every type is a frozen
dataclass that checks its values when built and names the bad one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipelines.clinical.findings import CodeSpec

#: Site statuses produced by the analysis.
PRESENT, ABSENT, NOT_EVALUABLE = "present", "absent", "not evaluable"
SITE_STATUSES: tuple[str, ...] = (PRESENT, ABSENT, NOT_EVALUABLE)

#: Bone density categories (Pickhardt et al. 2013) and the vertebrae they are read at.
BONE_DENSITY_CATEGORIES: tuple[str, ...] = ("osteoporosis", "osteopenia", "normal", "not evaluable")
BONE_DENSITY_LEVELS: tuple[str, ...] = ("L1", "T12")
#: Hepatic steatosis grades (Boyce et al. 2010; Pickhardt et al. 2012).
STEATOSIS_GRADES_ALL: tuple[str, ...] = ("none", "mild", "moderate-severe", "not evaluable")
#: Lung-RADS v2022 categories a nodule may carry.
LUNG_RADS_CATEGORIES: tuple[str, ...] = ("0", "1", "2", "3", "4A", "4B", "4X")


def _finite_number(value: object, where: str, *, allow_nan: bool = False) -> float:
    """``value`` as a float, refusing booleans, non-numbers and (unless allowed) NaN and infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) and not (allow_nan and math.isnan(number)):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return number


def _optional_number(value: object, where: str) -> float | None:
    return None if value is None else _finite_number(value, where)


def _texts(values: Iterable[str], where: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{where} must be a sequence of strings, got the string {values!r}")
    texts = tuple(values)
    bad = [v for v in texts if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{where} must hold strings, got {bad!r}")
    return texts


@dataclass(frozen=True)
class SiteResult:
    """The per-site screening answer of one bundle: present / absent / not evaluable.

    ``score`` is the lesion detector's score within 0..1 (for an absent site,
    its best candidate below the site threshold); ``reason`` says why a site
    is not evaluable; ``lesion_labels`` are the summary texts of the lesions
    behind a "present" answer.
    """

    site: str
    finding: CodeSpec
    status: str
    score: float
    reason: str = ""
    lesion_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"SiteResult.site must be a non-empty string, got {self.site!r}")
        if not isinstance(self.finding, CodeSpec):
            raise TypeError(f"site {self.site!r}: finding must be a CodeSpec, got {self.finding!r}")
        if self.status not in SITE_STATUSES:
            raise ValueError(f"site {self.site!r}: status {self.status!r} is not one of {list(SITE_STATUSES)!r}")
        score = _finite_number(self.score, f"score of {self.site!r}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score of {self.site!r}: must lie within 0..1, got {self.score!r}")
        if not isinstance(self.reason, str):
            raise TypeError(f"site {self.site!r}: reason must be a string, got {self.reason!r}")
        object.__setattr__(self, "lesion_labels", _texts(self.lesion_labels, f"site {self.site!r}: lesion_labels"))

    def line(self) -> str:
        """A one-line answer without risk tier, e.g. ``liver: no lesion (best candidate score 0.12)``."""
        if self.status == PRESENT:
            return f"{self.site}: lesion present (score {self.score:.2f}; {', '.join(self.lesion_labels)})"
        if self.status == ABSENT:
            return f"{self.site}: no lesion (best candidate score {self.score:.2f})"
        return f"{self.site}: not evaluable ({self.reason})"


@dataclass(frozen=True)
class OrganStats:
    """Size and attenuation of one segmented structure.

    ``std_hu`` is the population standard deviation (ddof=0). An empty mask
    gives ``voxel_count`` 0, zero volume and NaN for the HU statistics.
    """

    voxel_count: int
    volume_mm3: float
    volume_ml: float
    mean_hu: float
    median_hu: float
    std_hu: float
    cut_by_field_of_view: bool

    @property
    def is_empty(self) -> bool:
        """Whether the structure has no voxel."""
        return self.voxel_count == 0


@dataclass(frozen=True)
class BoneDensityResult:
    """Trabecular attenuation of L1 (or T12) and its category.

    ``category`` is "osteoporosis", "osteopenia", "normal" or "not evaluable";
    ``level`` is "L1", "T12" or None and ``level_reason`` says why that level
    (or why none). ``notes`` carries caveats, e.g. a tube voltage other than
    the thresholds' 120 kVp.
    """

    category: str
    level: str | None
    level_reason: str
    mean_hu: float
    high_suspicion: bool
    roi_area_mm2: float
    roi_slice: int | None
    kvp: float | None
    notes: tuple[str, ...] = ()
    roi_mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.category not in BONE_DENSITY_CATEGORIES:
            raise ValueError(f"bone_density.category {self.category!r} is not one of {list(BONE_DENSITY_CATEGORIES)}")
        if self.level is not None and self.level not in BONE_DENSITY_LEVELS:
            raise ValueError(f"bone_density.level {self.level!r} is not one of {list(BONE_DENSITY_LEVELS)} or None")
        if (self.level is None) != (self.category == "not evaluable"):
            raise ValueError(f"bone_density: category {self.category!r} does not go with level {self.level!r}")
        _finite_number(self.mean_hu, "bone_density.mean_hu", allow_nan=self.level is None)
        object.__setattr__(self, "kvp", _optional_number(self.kvp, "bone_density.kvp"))
        object.__setattr__(self, "notes", _texts(self.notes, "bone_density.notes"))

    @property
    def evaluable(self) -> bool:
        """Whether a level could be measured."""
        return self.level is not None


@dataclass(frozen=True)
class SteatosisResult:
    """Hepatic steatosis grade on unenhanced CT.

    ``grade`` is "none", "mild", "moderate-severe" or "not evaluable".
    ``supporting_criteria`` lists the liver-spleen criteria that were met;
    ``reason`` explains the grade (or why there is none).
    """

    grade: str
    liver_mean_hu: float
    spleen_mean_hu: float | None
    liver_minus_spleen_hu: float | None
    liver_spleen_ratio: float | None
    supporting_criteria: tuple[str, ...]
    reason: str

    def __post_init__(self) -> None:
        if self.grade not in STEATOSIS_GRADES_ALL:
            raise ValueError(f"steatosis.grade {self.grade!r} is not one of {list(STEATOSIS_GRADES_ALL)}")
        _finite_number(self.liver_mean_hu, "steatosis.liver_mean_hu", allow_nan=not self.evaluable)
        for name in ("spleen_mean_hu", "liver_minus_spleen_hu", "liver_spleen_ratio"):
            _optional_number(getattr(self, name), f"steatosis.{name}")
        object.__setattr__(self, "supporting_criteria",
                           _texts(self.supporting_criteria, "steatosis.supporting_criteria"))

    @property
    def evaluable(self) -> bool:
        """Whether the liver could be graded."""
        return self.grade != "not evaluable"


@dataclass(frozen=True)
class NoduleMeasurement:
    """Size of one nodule (one 26-connected component of the nodule mask).

    Diameters are measured on ``axial_slice``, the slice where the long axis is
    longest; ``mean_diameter_mm`` is (long + short) / 2 rounded to 0.1 mm as
    Lung-RADS v2022 asks. ``centroid_zyx`` is in voxel indices and
    ``centroid_offset_mm_zyx`` in mm from the centre of voxel (0, 0, 0).
    """

    index: int
    voxel_count: int
    volume_mm3: float
    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    axial_slice: int
    centroid_zyx: tuple[float, float, float]
    centroid_offset_mm_zyx: tuple[float, float, float]
    mean_hu: float
    lung_rads: str
    lung_rads_by_volume: str
    cut_by_field_of_view: bool


@dataclass(frozen=True)
class LungNodule:
    """One lung nodule as reported: the lesion finding it belongs to (by label), its size and Lung-RADS category."""

    label: str
    mean_diameter_mm: float
    lung_rads: str
    volume_mm3: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"lung nodule label must be a non-empty string, got {self.label!r}")
        _finite_number(self.mean_diameter_mm, f"lung nodule {self.label!r}: mean_diameter_mm")
        _optional_number(self.volume_mm3, f"lung nodule {self.label!r}: volume_mm3")
        if self.lung_rads not in LUNG_RADS_CATEGORIES:
            raise ValueError(
                f"lung nodule {self.label!r}: lung_rads {self.lung_rads!r} is not one of {list(LUNG_RADS_CATEGORIES)}")


@dataclass(frozen=True)
class BundleMeasurements:
    """The opportunistic measurements a bundle's manifest asks for; None where it asks for none."""

    bone_density: BoneDensityResult | None = None
    steatosis: SteatosisResult | None = None
    lung_nodules: tuple[LungNodule, ...] | None = None

    def __post_init__(self) -> None:
        if self.bone_density is not None and not isinstance(self.bone_density, BoneDensityResult):
            raise TypeError(f"bone_density must be a BoneDensityResult or None, got {self.bone_density!r}")
        if self.steatosis is not None and not isinstance(self.steatosis, SteatosisResult):
            raise TypeError(f"steatosis must be a SteatosisResult or None, got {self.steatosis!r}")
        if self.lung_nodules is not None:
            nodules = tuple(self.lung_nodules)
            bad = [n for n in nodules if not isinstance(n, LungNodule)]
            if bad:
                raise TypeError(f"lung_nodules must hold LungNodule, got {bad!r}")
            object.__setattr__(self, "lung_nodules", nodules)

    @property
    def any(self) -> bool:
        """Whether anything was measured."""
        return self.bone_density is not None or self.steatosis is not None or self.lung_nodules is not None


#: The measurements of a bundle whose manifest asks for none.
NOTHING_MEASURED = BundleMeasurements()
