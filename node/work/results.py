"""The analysis a node runs, and the result files it writes: one place for both ``serve`` and ``process``."""

from __future__ import annotations

import json
import logging
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset

from node import __version__
from node.config import NodeConfig
from node.store.spool import check_uid, write_durably
from pipelines.analysis import ResultLabelling, SeriesAnalyzer, SeriesResult
from pipelines.model.bundle import ModelBundle

LOG = logging.getLogger(__name__)


def build_analyzer(config: NodeConfig) -> SeriesAnalyzer:
    """Load every enabled model bundle once (hashes checked, sessions warm) and wrap them for analysis."""
    bundles = [
        ModelBundle(folder, require_gpu=config.require_gpu, tensorrt_cache_dir=config.data_dir / "tensorrt-cache")
        for folder in config.model_dirs
    ]
    labelling = ResultLabelling(research_notice=config.research_notice, software_version=__version__,
                                risk=config.risk, seg_type=config.seg_type, key_image_type=config.key_image_type)
    return SeriesAnalyzer(bundles, labelling)


def encode_dataset(ds: Dataset) -> bytes:
    """A dataset as PS3.10 file bytes."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_results(result: SeriesResult, results_dir: Path) -> list[tuple[Dataset, Path]]:
    """Write each result object durably under results/<study>/<series>/; returns (dataset, path)."""
    written = []
    for ds in result.objects:
        path = (
            results_dir
            / check_uid(ds.StudyInstanceUID, "Study Instance UID")
            / check_uid(ds.SeriesInstanceUID, "Series Instance UID")
            / f"{check_uid(ds.SOPInstanceUID, 'SOP Instance UID')}.dcm"
        )
        write_durably(path, encode_dataset(ds))
        written.append((ds, path))
    return written


def previous_reports(results: str | None) -> list[Dataset]:
    """The SR(s) of the last result version of a series (to be superseded), read from the results dir.

    ``results`` is the series' ``results`` column of the state store: JSON, a list of
    ``{"modality", "path"}`` objects (None or "" when the series has no results yet).
    """
    import pydicom

    if not results:
        return []
    out: list[Dataset] = []
    for item in json.loads(results):
        if item.get("modality") == "SR":
            try:
                out.append(pydicom.dcmread(item["path"]))
            except (OSError, ValueError) as exc:
                LOG.warning("previous result %s cannot be read (%s); the new version will not reference it",
                            item["path"], exc)
    return out


__all__ = ["build_analyzer", "encode_dataset", "previous_reports", "write_results"]
