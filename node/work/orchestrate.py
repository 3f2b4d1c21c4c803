"""The one orchestration of a series' processing: screen, load, analyse, write.

The node's worker (:mod:`node.work.worker`) and ``pacs-ai-node process`` both
call :func:`process_instances`; they differ only in where the result files go
(the ``writer``) and in what they do with the outcome (state store and outbox,
or lines on the terminal).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pipelines.analysis import SeriesAnalyzer, SeriesResult
from pipelines.errors import SeriesRejected
from pipelines.rules.ruleset import RuleSet, screen_series
from pipelines.timing import StageTiming
from pipelines.volume.ct import load_series

#: The rule id counted for a rejection by the volume checks (gaps, mixed orientation...) rather than
#: by a rule of the rules file (the ``rule`` label of ``pacs_ai_node_series_rejected``).
GEOMETRY_RULE = "geometry"

#: Where the result objects of a series went: ``(dataset, file)`` each, in the order written.
Written = Sequence[tuple[Dataset, Path]]
#: Writes a series' result objects; returns where each went.
Writer = Callable[[SeriesResult], Written]
#: Told the name of each stage as it starts: ``"rules"``, ``"load"``, then the analyser's stages.
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SeriesDone:
    """A series analysed and its result objects written.

    ``timings`` are the analyser's own (``result.timings``) between the orchestrator's
    ``"screen and load"`` and ``"write results"`` stages.
    """

    result: SeriesResult
    written: tuple[tuple[Dataset, Path], ...]
    timings: tuple[StageTiming, ...]


@dataclass(frozen=True)
class SeriesRefused:
    """A series rejected, never repaired: the reason shown to the admin and the ids of the failed rules
    (the rules file's rule ids, or :data:`GEOMETRY_RULE` for the volume checks)."""

    reason: str
    rule_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.rule_ids:
            raise ValueError(f"SeriesRefused.rule_ids: a rejection names at least one rule, got {self.rule_ids!r}")


Outcome = SeriesDone | SeriesRefused


def process_instances(
    paths: Sequence[Path | str],
    rules: RuleSet,
    analyzer: SeriesAnalyzer,
    writer: Writer,
    *,
    version: int = 1,
    previous_reports: Sequence[Dataset] = (),
    progress: Progress | None = None,
) -> Outcome:
    """Screen ``paths`` (one series) with ``rules``, load the volume, analyse it and write the results.

    Returns :class:`SeriesDone`, or :class:`SeriesRefused` when a rule or a volume check rejects
    the series. Any other :class:`~pipelines.errors.PacsAiError` (a model that cannot run, a
    result that cannot be written) and any unexpected error are raised to the caller.
    ``version`` > 1 makes results that supersede ``previous_reports`` (late instances).
    """
    started = time.perf_counter()
    try:
        if progress is not None:
            progress("rules")
        decision = screen_series([Path(p) for p in paths], rules)
        if not decision.eligible:
            return SeriesRefused("; ".join(decision.reasons), tuple(f.rule_id for f in decision.failures))
        if progress is not None:
            progress("load")
        volume = load_series(paths)
        loaded = time.perf_counter()
        result = analyzer.analyse(volume, progress, version=version, previous_reports=previous_reports)
    except SeriesRejected as exc:
        return SeriesRefused(exc.reason, (GEOMETRY_RULE,))
    analysed = time.perf_counter()
    written = tuple(writer(result))
    timings = (StageTiming("screen and load", loaded - started), *result.timings,
               StageTiming("write results", time.perf_counter() - analysed))
    return SeriesDone(result, written, timings)


__all__ = ["GEOMETRY_RULE", "Outcome", "Progress", "SeriesDone", "SeriesRefused", "Writer", "Written",
           "process_instances"]
