"""The worker: turns quiet series into jobs, processes each one, and fills the outbox.

One loop around the state store (mercure's shape): it queues series that
have been quiet long enough, claims the next queued one, runs it through the
one orchestrator (:func:`node.work.orchestrate.process_instances`), records the
outcome and queues the result objects for every destination that wants them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from node.config import NodeConfig
from node.store.state import DONE, FAILED, REJECTED, StateStore
from node.work.orchestrate import SeriesRefused, process_instances
from node.work.results import previous_reports, write_results
from pipelines.analysis import SeriesAnalyzer
from pipelines.errors import PacsAiError
from pipelines.rules.ruleset import RuleSet

if TYPE_CHECKING:
    from node.observe.metrics import NodeMetrics

LOG = logging.getLogger(__name__)

#: How often the loop looks for work when nothing woke it.
POLL_SECONDS = 0.5


class Worker:
    """Processes the node's series, one at a time; :meth:`run` loops until ``stop`` is set.

    ``config`` and ``rules`` may be replaced while it runs (a reload): the next series uses them.
    ``on_results`` is called after a series' result objects were queued (wakes the sender).
    """

    def __init__(self, config: NodeConfig, state: StateStore, analyzer: SeriesAnalyzer, rules: RuleSet, *,
                 metrics: NodeMetrics | None = None, on_results: Callable[[], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.analyzer = analyzer
        self.rules = rules
        self.metrics = metrics
        self.on_results = on_results

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Queue quiet series and process claimed ones until ``stop``; ``wake`` cuts a wait short."""
        while not stop.is_set():
            try:
                for uid in self.state.queue_quiet_series(self.config.series_quiet_seconds):
                    LOG.info("series %s complete (quiet for %.1f s), queued", uid, self.config.series_quiet_seconds,
                             extra={"series_uid": uid})
                row = self.state.claim_next_series()
            except Exception:  # the state store must not kill the loop (e.g. locked database)
                LOG.exception("worker could not read the state store")
                stop.wait(POLL_SECONDS)
                continue
            if row is None:
                wake.wait(POLL_SECONDS)
                wake.clear()
                continue
            try:
                self.process_series(row.series_uid, row.updated_at)
            except Exception as exc:  # e.g. the state store failed: the series must not stay claimed
                LOG.exception("worker error on series %s", row.series_uid, extra={"series_uid": row.series_uid})
                try:
                    self.state.finish_series(row.series_uid, FAILED, f"internal error: {type(exc).__name__}: {exc}",
                                             row.updated_at)
                except Exception:  # requeue_interrupted picks it up at the next start
                    LOG.exception("series %s stays in processing until the next start", row.series_uid,
                                  extra={"series_uid": row.series_uid})
                stop.wait(POLL_SECONDS)

    def process_series(self, series_uid: str, claimed_at: float) -> str:
        """Analyse one claimed series, store and queue its results; returns the final state."""
        extra = {"series_uid": series_uid}
        paths = self.state.series_instances(series_uid)
        started = time.perf_counter()
        row = self.state.get_series(series_uid)
        version = (row.version if row else 0) + 1
        try:
            previous = previous_reports(row.results if row else None)
            outcome = process_instances(
                paths, self.rules, self.analyzer, lambda result: write_results(result, self.config.results_dir),
                version=version, previous_reports=previous)
        except PacsAiError as exc:
            final = self.state.finish_series(series_uid, FAILED, str(exc), claimed_at)
            LOG.error("series %s%s failed: %s", series_uid, self._patient(paths), exc, extra=extra)
            self._count_finished(final)
            return final
        except Exception as exc:  # a bug must fail one series, not the node
            LOG.exception("series %s failed with an internal error", series_uid, extra=extra)
            final = self.state.finish_series(series_uid, FAILED, f"internal error: {type(exc).__name__}: {exc}",
                                             claimed_at)
            self._count_finished(final)
            return final
        if isinstance(outcome, SeriesRefused):
            final = self.state.finish_series(series_uid, REJECTED, outcome.reason, claimed_at)
            LOG.info("series %s%s rejected: %s", series_uid, self._patient(paths), outcome.reason, extra=extra)
            self._count_finished(final, outcome.rule_ids)
            return final
        result, written = outcome.result, outcome.written
        self.state.record_results(
            series_uid,
            version,
            json.dumps([{"modality": str(ds.Modality), "path": str(path)} for ds, path in written]),
            [(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(path),
              [str(d) for d in self.config.destinations if d.wants(str(ds.Modality), str(ds.SOPClassUID))])
             for ds, path in written],
        )
        summary = "; ".join(result.summary)
        if version > 1:
            summary = f"version {version} (supersedes {version - 1}): {summary}"
        stages = {t.label: round(t.seconds, 3) for t in outcome.timings}
        final = self.state.finish_series(series_uid, DONE, summary, claimed_at, timings=json.dumps(stages))
        self._count_finished(final)
        if self.metrics is not None:
            self.metrics.stage_timings(result.timings)
        duration = time.perf_counter() - started
        LOG.info(
            "series %s processed in %.2f s (%s): %s; %d objects queued for %d destinations",
            series_uid,
            duration,
            ", ".join(f"{t.label} {t.seconds:.2f} s" for t in result.timings),
            summary,
            len(written),
            len(self.config.destinations),
            extra={**extra, "duration_s": round(duration, 3)},
        )
        if self.on_results is not None:
            self.on_results()
        return final

    def _patient(self, paths: Sequence[str]) -> str:
        """`` (patient NAME (ID))`` for a log line when the site enabled log_patient_identity, else ""."""
        if not self.config.log_patient_identity or not paths:
            return ""
        import pydicom

        from node.observe.logs import patient_text

        try:
            ds: Dataset = pydicom.dcmread(paths[0], stop_before_pixels=True,
                                          specific_tags=["PatientName", "PatientID"])
        except (OSError, ValueError):
            return ""
        text = patient_text(ds, True)
        return f" ({text})" if text else ""

    def _count_finished(self, final: str, rule_ids: Sequence[str] = ()) -> None:
        if self.metrics is not None and final in (DONE, REJECTED, FAILED):
            # not when new instances sent the series back to receiving
            self.metrics.series_finished(final, rules=rule_ids)


__all__ = ["POLL_SECONDS", "Worker"]
