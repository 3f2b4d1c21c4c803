"""Site-configurable risk tiers and the study-summary lines a radiologist reads.

A screened site (pancreas, liver, ...) comes out of the analysis as present,
absent or not evaluable with a lesion detection score in [0, 1]
(:class:`pipelines.clinical.results.SiteResult`). A :class:`RiskPolicy` turns that
score into a tier with three cut points per site::

    score < t1 -> "low"; < t2 -> "intermediate"; < t3 -> "high"; else "very high"

and flags the tiers that should be referred to a radiologist. A site that is
not evaluable (organ cut by the field of view, not found) gets no tier and is
never referred on the score: it is "not evaluable", never "negative".

The policy is data, validated when it is built; a site's ``[results.risk]``
table reads::

    [results.risk]
    default = [0.3, 0.6, 0.9]
    pancreas = [0.2, 0.5, 0.8]
    refer = ["high", "very high"]

The cut points are operating points of an AI score chosen by the site, not a
validated clinical risk scale; the SR encodes them with private codes for that
reason (:mod:`pipelines.dicom_out.report`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.clinical.results import (
    NOT_EVALUABLE,
    PRESENT,
    SITE_STATUSES,
    BoneDensityResult,
    BundleMeasurements,
    LungNodule,
    SiteResult,
    SteatosisResult,
)
from pipelines.errors import PacsAiError

#: Tiers from lowest to highest.
RISK_TIERS: tuple[str, ...] = ("low", "intermediate", "high", "very high")
#: Cut points used for a site that has none of its own.
DEFAULT_THRESHOLDS: tuple[float, float, float] = (0.3, 0.6, 0.9)
#: Tiers referred to a radiologist unless the site says otherwise.
DEFAULT_REFER_TIERS: tuple[str, ...] = ("high", "very high")
#: Key of the site-independent cut points in ``thresholds`` and in the TOML table.
DEFAULT_KEY = "default"
#: Key of the referred tiers in the TOML table.
REFER_KEY = "refer"


class RiskPolicyError(PacsAiError, ValueError):
    """A risk policy (or a site result given to it) that cannot be used; the message names the value."""


@dataclass(frozen=True)
class RiskAssessment:
    """The risk reading of one screened site.

    ``tier`` is one of :data:`RISK_TIERS`, or None when the site is not
    evaluable; ``line`` is the study-summary line shown to the radiologist.
    """

    site: str
    status: str
    score: float
    tier: str | None
    refer: bool
    line: str


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RiskPolicyError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RiskPolicyError(f"{where}: expected a finite number, got {value!r}")
    return number


def _cut_points(site: str, value: Any) -> tuple[float, float, float]:
    """Three ascending cut points within [0, 1] for ``site``."""
    where = f"risk thresholds for {site!r}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise RiskPolicyError(f"{where}: expected three cut points [t1, t2, t3], got {value!r}")
    t1, t2, t3 = (_number(v, where) for v in value)
    if any(not 0.0 <= p <= 1.0 for p in (t1, t2, t3)):
        raise RiskPolicyError(f"{where}: every cut point must lie within 0..1, got {list(value)!r}")
    if not t1 < t2 < t3:
        raise RiskPolicyError(f"{where}: cut points must be strictly ascending, got {list(value)!r}")
    return t1, t2, t3


def _refer_tiers(value: Any) -> tuple[str, ...]:
    """The referred tiers: names from :data:`RISK_TIERS` forming the top of the scale."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise RiskPolicyError(f"refer tiers: expected a list of tier names, got {value!r}")
    tiers = tuple(value)
    unknown = [t for t in tiers if t not in RISK_TIERS]
    if unknown:
        raise RiskPolicyError(f"refer tiers: {unknown!r} not among {list(RISK_TIERS)!r}")
    if len(set(tiers)) != len(tiers):
        raise RiskPolicyError(f"refer tiers: {list(tiers)!r} names a tier twice")
    # Referring "intermediate" but not "high" would be incoherent: the referred
    # tiers must be the top of the scale.
    top = RISK_TIERS[len(RISK_TIERS) - len(tiers):] if tiers else ()
    if set(tiers) != set(top):
        raise RiskPolicyError(
            f"refer tiers: {list(tiers)!r} must be the highest tiers (e.g. {list(RISK_TIERS[-2:])!r}), "
            f"so that every tier above a referred one is referred too"
        )
    return tuple(t for t in RISK_TIERS if t in tiers)


class RiskPolicy:
    """Maps a site's score to a risk tier and decides whether it is referred.

    ``thresholds`` maps site names (and ``"default"``) to three ascending cut
    points within 0..1; a site without an entry uses ``"default"``, which
    falls back to :data:`DEFAULT_THRESHOLDS`. ``refer_tiers`` are the tiers
    flagged for referral; they must be the highest tiers of the scale (none
    at all is allowed: nothing is flagged). The constructor raises
    :class:`RiskPolicyError` (a ``ValueError``) naming the offending site or value.
    """

    def __init__(
        self,
        thresholds: Mapping[str, Sequence[float]] | None = None,
        refer_tiers: Iterable[str] = DEFAULT_REFER_TIERS,
    ) -> None:
        if thresholds is None:
            thresholds = {}
        if not isinstance(thresholds, Mapping):
            raise RiskPolicyError(f"risk thresholds: expected a mapping of site -> [t1, t2, t3], got {thresholds!r}")
        cut: dict[str, tuple[float, float, float]] = {}
        for site, value in thresholds.items():
            if not isinstance(site, str) or not site.strip():
                raise RiskPolicyError(f"risk thresholds: site names must be non-empty strings, got {site!r}")
            cut[site] = _cut_points(site, value)
        cut.setdefault(DEFAULT_KEY, DEFAULT_THRESHOLDS)
        self._thresholds = cut
        self.refer_tiers: tuple[str, ...] = _refer_tiers(refer_tiers)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> RiskPolicy:
        """A policy from a TOML table such as ``[results.risk]``.

        ``default`` and site keys hold ``[t1, t2, t3]``; ``refer`` holds the
        referred tier names. A missing or empty table gives the default policy.
        """
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise RiskPolicyError(f"risk policy: expected a table, got {table!r}")
        thresholds = {k: v for k, v in table.items() if k != REFER_KEY}
        return cls(thresholds, table.get(REFER_KEY, DEFAULT_REFER_TIERS))

    @property
    def thresholds(self) -> dict[str, tuple[float, float, float]]:
        """Cut points per site, ``"default"`` included (a copy)."""
        return dict(self._thresholds)

    def cut_points(self, site: str) -> tuple[float, float, float]:
        """The cut points that apply to ``site``."""
        return self._thresholds.get(site, self._thresholds[DEFAULT_KEY])

    def tier(self, site: str, score: float) -> str:
        """The tier of ``score`` (within 0..1) at ``site``."""
        value = _number(score, f"score of {site!r}")
        if not 0.0 <= value <= 1.0:
            raise RiskPolicyError(f"score of {site!r}: must lie within 0..1, got {score!r}")
        for name, upper in zip(RISK_TIERS, self.cut_points(site)):
            if value < upper:
                return name
        return RISK_TIERS[-1]

    def assess(self, site_result: SiteResult) -> RiskAssessment:
        """Tier, referral and summary line of one site result."""
        site, status = site_result.site, site_result.status
        if status not in SITE_STATUSES:
            raise RiskPolicyError(f"site {site!r}: status {status!r} is not one of {list(SITE_STATUSES)!r}")
        score = _number(site_result.score, f"score of {site!r}")
        if status == NOT_EVALUABLE:
            reason = (site_result.reason or "").strip() or "reason not recorded"
            return RiskAssessment(site, status, score, None, False, f"{site}: not evaluable ({reason})")
        tier = self.tier(site, score)
        refer = tier in self.refer_tiers
        finding = "lesion present" if status == PRESENT else "no lesion"
        line = f"{site}: {finding}, score {score:.2f}, risk {tier}"
        if refer:
            # An absent site can still reach a referred tier: its score is the best candidate below the
            # model's detection threshold, which a site may want a radiologist to look at.
            line += " \u2014 abnormal: refer" if status == PRESENT else " \u2014 refer for review"
        return RiskAssessment(site, status, score, tier, refer, line)

    def __repr__(self) -> str:
        return f"RiskPolicy(thresholds={self._thresholds!r}, refer_tiers={self.refer_tiers!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RiskPolicy):
            return NotImplemented
        return self._thresholds == other._thresholds and self.refer_tiers == other.refer_tiers

    # Mutable-looking (a dict inside) and compared by value: not hashable, as before.
    __hash__ = None  # type: ignore[assignment]  # Python's way to say unhashable; typeshed types it a method


# --------------------------------------------------------------------------- summary lines


def bone_density_line(bone: BoneDensityResult) -> str:
    """E.g. ``bone density: osteopenia (L1 trabecular 131 HU at 120 kVp)``."""
    if not bone.evaluable:
        return f"bone density: not evaluable ({bone.level_reason or 'reason not recorded'})"
    at = f"at {bone.kvp:g} kVp" if bone.kvp is not None else "kVp not recorded"
    line = f"bone density: {bone.category} ({bone.level} trabecular {bone.mean_hu:.0f} HU {at})"
    if bone.high_suspicion:
        line += ", high suspicion"
    return line


def steatosis_line(fat: SteatosisResult) -> str:
    """E.g. ``hepatic steatosis: mild (liver mean 44 HU, liver - spleen -12 HU)``."""
    if not fat.evaluable:
        return f"hepatic steatosis: not evaluable ({fat.reason or 'reason not recorded'})"
    details = [f"liver mean {fat.liver_mean_hu:.0f} HU"]
    if fat.liver_minus_spleen_hu is not None:
        details.append(f"liver - spleen {fat.liver_minus_spleen_hu:.0f} HU")
    return f"hepatic steatosis: {fat.grade} ({', '.join(details)})"


def lung_nodule_lines(nodules: Sequence[LungNodule]) -> list[str]:
    """One line per nodule, e.g. ``lung nodule: 7.2 mm, Lung-RADS 3``; largest first."""
    if not nodules:
        return ["lung nodules: none found"]
    ordered = sorted(nodules, key=lambda n: -n.mean_diameter_mm)
    return [f"lung nodule: {n.mean_diameter_mm:.1f} mm, Lung-RADS {n.lung_rads}" for n in ordered]


def summary_lines(
    sites: Sequence[SiteResult], measurements: BundleMeasurements, policy: RiskPolicy | None = None
) -> list[str]:
    """Every study-summary line: one per site, then bone density, steatosis and lung nodules."""
    policy = policy or RiskPolicy()
    lines = [policy.assess(site).line for site in sites]
    if measurements.bone_density is not None:
        lines.append(bone_density_line(measurements.bone_density))
    if measurements.steatosis is not None:
        lines.append(steatosis_line(measurements.steatosis))
    if measurements.lung_nodules is not None:
        lines.extend(lung_nodule_lines(measurements.lung_nodules))
    return lines
