"""Volume -> findings -> DICOM result objects, with no knowledge of sockets.

:class:`SeriesAnalyzer` is what both the network node and the offline
``process`` command run on one series: check eligibility, resample to the
model's grid, run the ONNX model, post-process back on the source grid,
measure, and encode a Segmentation and a TID 1500 SR.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.errors import ResultEncodingError, SeriesRejected
from pipelines.findings import SegmentFinding
from pipelines.model import ModelBundle, SegmentSpec
from pipelines.report import build_measurement_report
from pipelines.segmentation import build_segmentation
from pipelines.uids import derive_uid, result_uids
from pipelines.volume import PLANE_MIN_COSINE, CTVolume, plane_of

LOG = logging.getLogger(__name__)

RESEARCH_NOTICE = "For research use only. Not for use in diagnostic procedures."
#: A series this short cannot hold a meaningful 3-D segmentation (the default
#: rules' ``min_slices`` asks for the same).
MIN_SLICES = 10
#: |cos| between the slice normal and the patient's head-foot axis for "axial".
AXIAL_MIN_COSINE = PLANE_MIN_COSINE


@dataclass(frozen=True)
class ResultLabelling:
    """Site-configurable labels put on every result object."""

    research_notice: str = RESEARCH_NOTICE
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    software_version: str = "0"


@dataclass
class SeriesResult:
    """What the analysis of one series produced."""

    findings: list[SegmentFinding]
    segmentation: Dataset
    report: Dataset
    model_key: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def objects(self) -> list[Dataset]:
        return [self.segmentation, self.report]


def check_eligibility(volume: CTVolume) -> None:
    """The floor under the site's eligibility rules; raises :class:`SeriesRejected`.

    Which series run is decided before the volume is built, by the rules file
    (:mod:`pipelines.rules`, default ``pipelines/default_rules.toml``), which a
    site may loosen or tighten. Whatever it says, the bundled models need a CT
    volume that is not a localizer, is axial (the same test as the rules'
    ``orientation``, :func:`pipelines.volume.plane_of`) and has at least
    :data:`MIN_SLICES` slices; the geometry itself was checked when the volume
    was built (:func:`pipelines.volume.check_geometry`).
    """
    first = volume.first
    modality = str(getattr(first, "Modality", ""))
    if modality != "CT":
        raise SeriesRejected(f"modality {modality or 'missing'} is not CT")
    image_type = [str(v).upper() for v in (getattr(first, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        raise SeriesRejected("localizer (scout) series")
    if plane_of(volume.slice_direction) != "AXIAL":
        raise SeriesRejected(
            f"not an axial series (slice normal is not along the head-foot axis: "
            f"{plane_of(volume.slice_direction).lower()})"
        )
    if volume.shape[0] < MIN_SLICES:
        raise SeriesRejected(f"only {volume.shape[0]} slices; at least {MIN_SLICES} needed")


def _resize(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample ``array`` (last 3 axes) to ``shape`` with pixel edges aligned."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    factors = [1.0] * (array.ndim - 3) + [t / s for t, s in zip(shape, array.shape[-3:])]
    return ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def _components_at_least(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


class SeriesAnalyzer:
    """Runs one model bundle on CT volumes and encodes the results."""

    def __init__(self, bundle: ModelBundle, labelling: ResultLabelling | None = None) -> None:
        self.bundle = bundle
        self.labelling = labelling or ResultLabelling()

    def segment(self, volume: CTVolume) -> np.ndarray:
        """Per-voxel channel index (arg-max of the model output) on the source grid."""
        m = self.bundle.manifest
        spacing = np.asarray(volume.spacing_zyx)
        target = np.asarray(m.target_spacing_mm)
        model_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, spacing, target))
        # Interpolating HU is fine before the intensity transform: both are linear.
        hu = _resize(volume.hu, model_shape, order=1)
        model_input = m.intensity.apply(hu)[np.newaxis, np.newaxis]
        probabilities = self.bundle.predict(model_input)[0]
        if model_shape == volume.shape:
            return np.argmax(probabilities, axis=0).astype(np.uint8)
        # Back to the source grid channel by channel, keeping a running arg-max
        # so that only two full-size float arrays live at once.
        best = np.full(volume.shape, -np.inf, dtype=np.float32)
        labels = np.zeros(volume.shape, dtype=np.uint8)
        for channel in range(probabilities.shape[0]):
            resized = _resize(probabilities[channel], volume.shape, order=1)
            better = resized > best
            best[better] = resized[better]
            labels[better] = channel
        return labels

    def postprocess(self, volume: CTVolume, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Turn channel labels into one boolean mask per manifest segment."""
        m = self.bundle.manifest
        masks: dict[str, np.ndarray] = {}
        for spec in m.segments:
            ids = [m.channels.index(c) for c in spec.channels]
            mask = np.isin(labels, ids)
            post = spec.postprocess
            if "within" in post:
                mask &= masks[post["within"]]
            if post.get("largest_component"):
                mask = _largest_component(mask)
            if post.get("fill_holes_per_slice"):
                mask = _fill_holes_per_slice(mask)
            if "min_component_mm3" in post:
                min_voxels = int(np.ceil(float(post["min_component_mm3"]) / volume.voxel_volume_mm3))
                mask = _components_at_least(mask, max(min_voxels, 1))
            masks[spec.label] = mask
        return masks

    def measure(self, volume: CTVolume, masks: dict[str, np.ndarray]) -> list[SegmentFinding]:
        """Findings (volume, mean HU) for every non-empty segment, renumbered 1..n."""
        findings = []
        key = self.bundle.key
        for spec in self.bundle.manifest.segments:
            mask = masks[spec.label]
            count = int(mask.sum())
            if count == 0:
                LOG.info("segment %s is empty in series %s", spec.label, volume.series_instance_uid)
                continue
            findings.append(self._finding(volume, spec, mask, count, len(findings) + 1, key))
        return findings

    def _finding(
        self, volume: CTVolume, spec: SegmentSpec, mask: np.ndarray, count: int, number: int, key: str
    ) -> SegmentFinding:
        return SegmentFinding(
            number=number,
            label=spec.label,
            category=spec.category,
            type=spec.type,
            finding_site=spec.finding_site,
            mask=mask,
            tracking_id=f"{spec.label} ({self.bundle.manifest.id})",
            tracking_uid=derive_uid("tracking", volume.series_instance_uid, key, spec.label),
            volume_mm3=count * volume.voxel_volume_mm3,
            mean_hu=float(volume.hu[mask].mean(dtype=np.float64)),
            voxel_count=count,
        )

    def analyse(
        self,
        volume: CTVolume,
        progress: Callable[[str], None] | None = None,
        *,
        version: int = 1,
        previous_reports: Sequence[Dataset] = (),
    ) -> SeriesResult:
        """Run every stage on one volume; raises SeriesRejected or a PacsAiError.

        ``version`` > 1 makes results that supersede an earlier run on the same
        series (late instances): new UIDs, "vN" in the series descriptions, and
        the SR lists ``previous_reports`` as its predecessors.
        """
        timings: dict[str, float] = {}

        def stage(name: str) -> None:
            timings[name] = time.perf_counter()
            if progress:
                progress(name)

        start = time.perf_counter()
        check_eligibility(volume)
        stage("inference")
        labels = self.segment(volume)
        stage("postprocess")
        masks = self.postprocess(volume, labels)
        findings = self.measure(volume, masks)
        if not findings:
            raise ResultEncodingError(f"model {self.bundle.key} found nothing to segment in this series")
        stage("encode")
        segmentation, report = self.encode(volume, findings, version=version, previous_reports=previous_reports)
        timings["end"] = time.perf_counter()
        names = list(timings)
        durations = {"eligibility": timings[names[0]] - start}
        for a, b in zip(names, names[1:]):
            durations[a] = timings[b] - timings[a]
        return SeriesResult(findings, segmentation, report, self.bundle.key, durations)

    def encode(
        self,
        volume: CTVolume,
        findings: list[SegmentFinding],
        *,
        version: int = 1,
        previous_reports: Sequence[Dataset] = (),
    ) -> tuple[Dataset, Dataset]:
        """Build the SEG and the SR with UIDs derived from the source series, the model and the version."""
        uids = result_uids(volume.series_instance_uid, self.bundle.key, version)
        suffix = f" v{version}" if version > 1 else ""
        algorithm = self.bundle.algorithm_identity(self.labelling.software_version)
        notice = self.labelling.research_notice
        seg = build_segmentation(
            volume,
            findings,
            algorithm,
            series_instance_uid=uids.seg_series_instance_uid,
            sop_instance_uid=uids.seg_sop_instance_uid,
            series_number=self.labelling.seg_series_number,
            series_description=_description(f"AI {self.bundle.manifest.id} SEG{suffix}", notice),
            content_description=notice,
        )
        sr = build_measurement_report(
            volume,
            findings,
            seg,
            algorithm,
            series_instance_uid=uids.sr_series_instance_uid,
            sop_instance_uid=uids.sr_sop_instance_uid,
            series_number=self.labelling.sr_series_number,
            series_description=_description(f"AI {self.bundle.manifest.id} report{suffix}", notice),
            research_notice=notice,
            previous_versions=previous_reports,
        )
        return seg, sr


def _description(title: str, notice: str) -> str:
    """SeriesDescription (LO, 64 chars): the title and as much of the notice as fits."""
    text = f"{title} - {notice}" if notice else title
    return text if len(text) <= 64 else text[:61].rstrip() + "..."
