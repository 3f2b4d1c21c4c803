"""Volume -> findings -> DICOM result objects, with no knowledge of sockets.

:class:`SeriesAnalyzer` is what both the network node and the offline
``process`` command run on one series: check eligibility
(:mod:`pipelines.model.eligibility`), run each bundle's cascade and turn its
outputs into masks (:mod:`pipelines.model.run`), findings
(:mod:`pipelines.clinical.extraction`), site answers
(:mod:`pipelines.clinical.sites`) and measurements
(:mod:`pipelines.clinical.bundle_measurements`), then encode a Segmentation,
a TID 1500 SR and key images (:mod:`pipelines.dicom_out.encode`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from pipelines.clinical.bundle_measurements import measure_bundle
from pipelines.clinical.extraction import LESION_CATEGORY, bundle_findings
from pipelines.clinical.findings import SegmentFinding
from pipelines.clinical.results import NOTHING_MEASURED, BundleMeasurements, SiteResult
from pipelines.clinical.risk import RiskPolicy, summary_lines
from pipelines.clinical.sites import site_answers
from pipelines.dicom_out.encode import (
    RESEARCH_NOTICE,
    ResultLabelling,
    encode_key_images,
    encode_seg_and_sr,
    made_by,
)
from pipelines.errors import ResultEncodingError
from pipelines.model.bundle import ModelBundle
from pipelines.model.eligibility import check_eligibility
from pipelines.model.inference import VolumeGrids, flip
from pipelines.model.run import BundleRun, run_bundle
from pipelines.timing import StageTiming
from pipelines.volume.ct import CTVolume

__all__ = [
    "LESION_CATEGORY",
    "RESEARCH_NOTICE",
    "BundleResult",
    "ResultLabelling",
    "SeriesAnalyzer",
    "SeriesResult",
    "SiteResult",
    "check_eligibility",
]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class BundleResult:
    """What one bundle found in one series, and the SEG and SR that encode it."""

    bundle_key: str
    bundle_id: str
    findings: tuple[SegmentFinding, ...]
    segmentation: Dataset
    report: Dataset
    sites: tuple[SiteResult, ...] = ()
    measurements: BundleMeasurements = NOTHING_MEASURED
    #: Each cascade stage's id -> "ran" or why it was skipped.
    stages: dict[str, str] = field(default_factory=dict)
    key_images: tuple[Dataset, ...] = ()
    risk: RiskPolicy | None = None

    def summary(self) -> list[str]:
        """The study-summary lines: one per screened site with its score and risk tier (and the
        referral flag), then bone density, steatosis and lung nodules; organ volumes otherwise."""
        lines = summary_lines(self.sites, self.measurements, self.risk) if (self.sites or self.measurements.any) else []
        if not lines:
            lines = [f"{f.label} {f.volume_mm3 / 1000:.1f} cm3, mean {f.mean_hu:.0f} HU" for f in self.findings]
        return [f"{self.bundle_id}: {line}" for line in lines]


@dataclass(frozen=True, eq=False)
class SeriesResult:
    """What the analysis of one series produced, over every enabled bundle."""

    bundles: tuple[BundleResult, ...]
    timings: tuple[StageTiming, ...] = ()

    @property
    def objects(self) -> list[Dataset]:
        """Every result object, bundle by bundle: SEG, SR, then key images."""
        return [ds for b in self.bundles for ds in (b.segmentation, b.report, *b.key_images)]

    @property
    def findings(self) -> list[SegmentFinding]:
        """Every finding of every bundle."""
        return [f for b in self.bundles for f in b.findings]

    @property
    def model_key(self) -> str:
        """The keys of the bundles that produced results, comma-separated."""
        return ", ".join(b.bundle_key for b in self.bundles)

    @property
    def summary(self) -> list[str]:
        """Every bundle's summary lines."""
        return [line for b in self.bundles for line in b.summary()]


class SeriesAnalyzer:
    """Runs every enabled model bundle on CT volumes and encodes the results."""

    def __init__(self, bundles: ModelBundle | Sequence[ModelBundle], labelling: ResultLabelling | None = None) -> None:
        self.bundles = [bundles] if isinstance(bundles, ModelBundle) else list(bundles)
        if not self.bundles:
            raise ValueError("SeriesAnalyzer needs at least one model bundle")
        ids = [b.manifest.id for b in self.bundles]
        if len(set(ids)) != len(ids):
            raise ValueError(f"two enabled bundles share an id: {ids}")
        self.labelling = labelling or ResultLabelling()

    @property
    def bundle(self) -> ModelBundle:
        """The first bundle (most callers run one)."""
        return self.bundles[0]

    def run_bundle(self, bundle: ModelBundle, grids: VolumeGrids, volume: CTVolume,
                   timings: list[StageTiming] | None = None) -> BundleRun:
        """Every stage of ``bundle``, then the segment masks and lesion candidates (LPS source grid)."""
        return run_bundle(bundle, grids, volume, timings)

    def masks(self, volume: CTVolume, bundle: ModelBundle | None = None) -> dict[str, np.ndarray]:
        """Each segment's mask (volume order) from one bundle, without measuring or encoding."""
        grids = VolumeGrids(volume)
        run = run_bundle(bundle or self.bundle, grids, volume)
        return {label: flip(mask, grids.flips) for label, mask in run.segment_masks().items()}

    def findings(
        self, volume: CTVolume, bundle: ModelBundle | None = None
    ) -> tuple[list[SegmentFinding], list[SiteResult], BundleMeasurements]:
        """Findings, per-site answers and measurements of one bundle, without encoding."""
        return self.findings_of(run_bundle(bundle or self.bundle, VolumeGrids(volume), volume))

    def findings_of(self, run: BundleRun) -> tuple[list[SegmentFinding], list[SiteResult], BundleMeasurements]:
        """Organ and lesion findings (volume order), per-site answers and measurements of a finished run."""
        findings = bundle_findings(run)
        sites = site_answers(run, findings)
        findings, measurements = measure_bundle(run, findings)
        return findings, sites, measurements

    def analyse(
        self,
        volume: CTVolume,
        progress: Callable[[str], None] | None = None,
        *,
        version: int = 1,
        previous_reports: Sequence[Dataset] = (),
    ) -> SeriesResult:
        """Run every bundle on one volume; raises SeriesRejected or a PacsAiError.

        ``version`` > 1 makes results that supersede an earlier run on the same
        series (late instances): new UIDs, "vN" in the series descriptions, and
        each SR lists the earlier SR of its own bundle in ``previous_reports``
        as its predecessor.
        """
        timings: list[StageTiming] = []
        start = time.perf_counter()
        check_eligibility(volume)
        grids = VolumeGrids(volume)
        timings.append(StageTiming("eligibility", time.perf_counter() - start))
        results = []
        for index, bundle in enumerate(self.bundles):
            if progress:
                progress("inference")
            run = run_bundle(bundle, grids, volume, timings)
            findings, sites, measurements = self.findings_of(run)
            if not findings:
                LOG.warning("model %s found nothing to segment in series %s: no SEG or SR from it",
                            bundle.key, volume.series_instance_uid)
                continue
            if progress:
                progress("encode")
            t0 = time.perf_counter()
            mine = [ds for ds in previous_reports if made_by(ds, bundle)]
            seg, sr = self.encode(volume, findings, bundle=bundle, index=index, version=version,
                                  previous_reports=mine, sites=sites, measurements=measurements)
            key_images = self.key_images(volume, findings, bundle=bundle, index=index, version=version)
            timings.append(StageTiming("encode", time.perf_counter() - t0, bundle.manifest.id))
            results.append(BundleResult(
                bundle.key, bundle.manifest.id, tuple(findings), seg, sr, tuple(sites), measurements,
                {k: v.skipped or "ran" for k, v in run.outputs.items()}, tuple(key_images),
                self.labelling.risk))
        if not results:
            raise ResultEncodingError(
                f"no model found anything to segment in this series ({', '.join(b.key for b in self.bundles)})")
        timings.append(StageTiming("total", time.perf_counter() - start))
        return SeriesResult(tuple(results), tuple(timings))

    def encode(
        self,
        volume: CTVolume,
        findings: Sequence[SegmentFinding],
        *,
        bundle: ModelBundle | None = None,
        index: int = 0,
        version: int = 1,
        previous_reports: Sequence[Dataset] = (),
        sites: Sequence[SiteResult] = (),
        measurements: BundleMeasurements | None = None,
    ) -> tuple[Dataset, Dataset]:
        """The SEG and the SR of one bundle's findings (:func:`pipelines.dicom_out.encode.encode_seg_and_sr`)."""
        return encode_seg_and_sr(volume, findings, bundle or self.bundle, self.labelling, index=index,
                                 version=version, previous_reports=previous_reports, sites=sites,
                                 measurements=measurements if measurements is not None else NOTHING_MEASURED)

    def key_images(self, volume: CTVolume, findings: Sequence[SegmentFinding], *, bundle: ModelBundle,
                   index: int = 0, version: int = 1) -> list[Dataset]:
        """Key images of the lesions (:func:`pipelines.dicom_out.encode.encode_key_images`)."""
        return encode_key_images(volume, findings, bundle, self.labelling, index=index, version=version)
