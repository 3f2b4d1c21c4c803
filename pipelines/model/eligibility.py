"""The floor under a site's eligibility rules: what the bundled models need of a volume.

Which series run is decided before the volume is built, by the site's rules
file (:mod:`pipelines.rules.ruleset`), which may loosen or tighten the
packaged default (``pipelines/rules/default_rules.toml``). Whatever it says,
the bundled models need a CT series that is not a localizer, is axial and
has enough slices. Those are rules of the packaged default already: the floor
is those rules (:data:`FLOOR_RULE_IDS`), read from that one file and checked
by the same engine, so the numbers and the tests live in one place.
"""

from __future__ import annotations

from functools import cache

from pipelines.errors import SeriesRejected
from pipelines.rules.ruleset import DEFAULT_RULES_PATH, RuleSet
from pipelines.volume.ct import CTVolume

#: Rules of the packaged default rules file that no site may turn off.
FLOOR_RULE_IDS: tuple[str, ...] = ("modality_ct", "not_localizer", "axial", "min_slices")


@cache
def floor_rules() -> RuleSet:
    """The :data:`FLOOR_RULE_IDS` rules of the packaged default rules file (read once, on first use)."""
    default = RuleSet.load(DEFAULT_RULES_PATH)
    missing = [i for i in FLOOR_RULE_IDS if i not in default.ids]
    if missing:
        raise RuntimeError(f"{DEFAULT_RULES_PATH} lacks the floor rules {missing}")
    return RuleSet(tuple(r for r in default.rules if r.id in FLOOR_RULE_IDS), f"{DEFAULT_RULES_PATH} (floor)")


def check_eligibility(volume: CTVolume) -> None:
    """Raise :class:`SeriesRejected` when ``volume`` fails a floor rule, with every failed rule's reason.

    The geometry itself was checked when the volume was built
    (:func:`pipelines.volume.geometry.check_geometry`).
    """
    decision = floor_rules().evaluate(volume.datasets)
    if not decision.eligible:
        raise SeriesRejected("; ".join(decision.reasons))
