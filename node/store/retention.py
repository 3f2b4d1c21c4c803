"""Retention: received instances and delivered results are deleted after the configured number of days."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from node.config import NodeConfig
from node.store.state import StateStore

LOG = logging.getLogger(__name__)

#: How often retention looks for expired data, in seconds.
RETENTION_INTERVAL_S = 600.0
DAY_S = 86400.0


def apply_retention(config: NodeConfig, state: StateStore, now: float | None = None) -> tuple[int, int]:
    """Delete received instances of series finished ``retain_input_days`` ago, and result files
    delivered to every destination ``retain_results_days`` ago; returns (instances, results) deleted.

    Results with any pending or dead delivery are never deleted. A setting of 0 keeps that data forever.
    """
    now = time.time() if now is None else now
    instances = results = 0
    if config.retain_input_days > 0:
        for series_uid, paths in state.expired_inputs(now - config.retain_input_days * DAY_S):
            for path in paths:
                instances += _unlink(Path(path), stop_at=config.spool_dir)
            state.mark_input_purged(series_uid, now)
            LOG.info("retention: deleted %d received instances of series %s", len(paths), series_uid,
                     extra={"series_uid": series_uid})
    if config.retain_results_days > 0:
        for path in state.delivered_results(now - config.retain_results_days * DAY_S):
            results += _unlink(Path(path), stop_at=config.results_dir)
            state.forget_delivered(path)
    if results:
        LOG.info("retention: deleted %d delivered result files", results)
    return instances, results


def _unlink(path: Path, stop_at: Path) -> int:
    """Delete one file and the folders it leaves empty, up to ``stop_at``; 1 if the file existed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    parent = path.parent
    while parent != stop_at and stop_at in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone)
            break
        parent = parent.parent
    return 1


__all__ = ["DAY_S", "RETENTION_INTERVAL_S", "apply_retention"]
