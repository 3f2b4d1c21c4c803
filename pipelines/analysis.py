"""Volume -> findings -> DICOM result objects, with no knowledge of sockets.

:class:`SeriesAnalyzer` is what both the network node and the offline
``process`` command run on one series: check eligibility, resample to the
model's grid, run the ONNX model, post-process back on the source grid,
measure, and encode a Segmentation and a TID 1500 SR.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from pipelines.errors import ResultEncodingError, SeriesRejected
from pipelines.clinical.findings import KEY_IMAGE_TYPES, CodeSpec, SegmentFinding
from pipelines.model.inference import Box, CascadeRunner, StageOutput, VolumeGrids, flip
from pipelines.clinical.measurements import (
    bone_density_assessment,
    field_of_view_cut,
    nodule_measurements,
    organ_stats,
    steatosis_assessment,
    vertebral_levels_from_ribs,
)
from pipelines.model.bundle import ModelBundle
from pipelines.dicom_out.report import build_measurement_report
from pipelines.clinical.risk import RiskPolicy, summary_lines
from pipelines.dicom_out.segmentation import build_segmentation
from pipelines.dicom_out.uids import derive_uid, result_uids
from pipelines.volume.ct import PLANE_MIN_COSINE, CTVolume, plane_of

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
    #: Risk tiers and referral from site scores (None: the built-in default policy).
    risk: "RiskPolicy | None" = None
    #: "BINARY" or "LABELMAP" (pipelines.segmentation.build_segmentation).
    seg_type: str = "BINARY"
    #: Key images of lesions: "SC", "GSPS" or "NONE" (pipelines.findings.KEY_IMAGE_TYPES).
    key_image_type: str = "SC"

    def __post_init__(self) -> None:
        if self.key_image_type not in KEY_IMAGE_TYPES:
            raise ValueError(f"key_image_type: {self.key_image_type!r} is not one of {', '.join(KEY_IMAGE_TYPES)}")


def check_eligibility(volume: CTVolume) -> None:
    """The floor under the site's eligibility rules; raises :class:`SeriesRejected`.

    Which series run is decided before the volume is built, by the rules file
    (:mod:`pipelines.rules.ruleset`, default ``pipelines/default_rules.toml``), which a
    site may loosen or tighten. Whatever it says, the bundled models need a CT
    volume that is not a localizer, is axial (the same test as the rules'
    ``orientation``, :func:`pipelines.volume.ct.ct.plane_of`) and has at least
    :data:`MIN_SLICES` slices; the geometry itself was checked when the volume
    was built (:func:`pipelines.volume.ct.ct.check_geometry`).
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


def _bounded(mask: np.ndarray, operation: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``operation`` to the bounding box of ``mask`` only (labelling a whole 512x512x300
    grid per segment costs seconds; the box is usually a small part of it)."""
    objects = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    if not objects:
        return mask
    box = objects[0]
    out = np.zeros_like(mask)
    out[box] = operation(mask[box])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    def largest(block: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(block)
        if count <= 1:
            return block
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return labels == int(np.argmax(sizes))

    return _bounded(mask, largest)


def _components_at_least(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    def at_least(block: np.ndarray) -> np.ndarray:
        labels, count = ndimage.label(block)
        if count == 0:
            return block
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        return keep[labels]

    return _bounded(mask, at_least)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    def fill(block: np.ndarray) -> np.ndarray:
        out = np.empty_like(block)
        for k in range(block.shape[0]):
            out[k] = ndimage.binary_fill_holes(block[k])
        return out

    return _bounded(mask, fill)


#: How far outside its organ mask a lesion may lie and still be assigned to the organ.
NEAR_ORGAN_MM = 5.0


def _ellipsoid(reach: list[int]) -> np.ndarray:
    """A boolean ellipsoid with the given half-widths in voxels (a structuring element)."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in reach)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, reach)) <= 1.0


def _support_box(prob: np.ndarray, floor: float, box: Box) -> Box | None:
    """The part of ``box`` where ``prob`` reaches ``floor``, one voxel wider (interpolation reach)."""
    where = np.nonzero(prob >= floor)
    if not where[0].size:
        return None
    lo = [max(0, int(w.min()) - 1) for w in where]
    hi = [min(n, int(w.max()) + 2) for w, n in zip(where, prob.shape)]
    return Box(
        tuple(s + a for s, a in zip(box.start, lo)),  # type: ignore[arg-type]
        tuple(b - a for a, b in zip(lo, hi)),  # type: ignore[arg-type]
        box.grid_shape,
        box.extent_mm,
    )


@dataclass
class SiteResult:
    """The per-site screening answer of one bundle: present / absent / not evaluable."""

    site: str
    finding: CodeSpec
    status: str
    score: float
    reason: str = ""
    lesion_labels: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.status == "present":
            return f"{self.site}: lesion present (score {self.score:.2f}; {', '.join(self.lesion_labels)})"
        if self.status == "absent":
            return f"{self.site}: no lesion (best candidate score {self.score:.2f})"
        return f"{self.site}: not evaluable ({self.reason})"


@dataclass
class BundleResult:
    """What one bundle found in one series, and the SEG and SR that encode it."""

    bundle_key: str
    bundle_id: str
    findings: list[SegmentFinding]
    segmentation: Dataset
    report: Dataset
    sites: list[SiteResult] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    key_images: list[Dataset] = field(default_factory=list)
    risk: "RiskPolicy | None" = None

    def summary(self) -> list[str]:
        """The study-summary lines: one per screened site with its score and risk tier (and the
        referral flag), then bone density, steatosis and lung nodules; organ volumes otherwise."""
        lines = summary_lines(self.sites, self.measurements, self.risk) if (self.sites or self.measurements) else []
        if not lines:
            lines = [f"{f.label} {f.volume_mm3 / 1000:.1f} cm3, mean {f.mean_hu:.0f} HU" for f in self.findings]
        return [f"{self.bundle_id}: {line}" for line in lines]


@dataclass
class SeriesResult:
    """What the analysis of one series produced, over every enabled bundle."""

    bundles: list[BundleResult]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def objects(self) -> list[Dataset]:
        return [ds for b in self.bundles for ds in (b.segmentation, b.report, *b.key_images)]

    @property
    def findings(self) -> list[SegmentFinding]:
        return [f for b in self.bundles for f in b.findings]

    @property
    def model_key(self) -> str:
        return ", ".join(b.bundle_key for b in self.bundles)

    @property
    def summary(self) -> list[str]:
        return [line for b in self.bundles for line in b.summary()]


class _BundleRun:
    """The state of one bundle's run on one volume (segments, lesions), computed lazily in stage order."""

    def __init__(self, bundle: ModelBundle, grids: VolumeGrids, volume: CTVolume) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.grids = grids
        self.volume = volume
        self.outputs: dict[str, StageOutput] = {}
        self.masks: dict[str, np.ndarray] | None = None
        self.lesions: list[dict[str, Any]] | None = None

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.grids.spacing))

    def segment_masks(self) -> dict[str, np.ndarray]:
        """One boolean mask per manifest segment on the LPS-flipped source grid."""
        if self.masks is not None:
            return self.masks
        masks: dict[str, np.ndarray] = {}
        for spec in self.manifest.segments:
            out = self.outputs.get(spec.stage)
            mask = np.zeros(self.grids.shape, dtype=bool)
            if out is not None and out.probabilities is not None:
                prob = sum(out.channel(c) for c in spec.channels)
                sub = _support_box(prob, spec.threshold * 0.5, out.box)  # type: ignore[arg-type]
                if sub is not None:
                    block = prob[tuple(slice(s - b, s - b + n) for s, b, n in zip(sub.start, out.box.start, sub.shape))]  # type: ignore[union-attr]
                    values, where = self.grids.to_source(block, sub)
                    mask[where] = values >= spec.threshold
            post = spec.postprocess
            if "within" in post:
                mask &= masks[post["within"]]
            if post.get("largest_component"):
                mask = _largest_component(mask)
            if post.get("fill_holes_per_slice"):
                mask = _fill_holes_per_slice(mask)
            if post.get("min_component_mm3"):
                min_voxels = int(np.ceil(float(post["min_component_mm3"]) / self.voxel_mm3))
                mask = _components_at_least(mask, max(min_voxels, 1))
            masks[spec.label] = mask
        self.masks = masks
        return masks

    def lesion_components(self) -> list[dict[str, Any]]:
        """Lesion candidates (source grid), each assigned to a site, before typing."""
        if self.lesions is not None:
            return self.lesions
        self.lesions = []
        spec = self.manifest.lesions
        if spec is None:
            return self.lesions
        out = self.outputs.get(spec.stage)
        if out is None or out.probabilities is None:
            return self.lesions
        rule = out.stage.rule(spec.channel)
        prob = out.channel(spec.channel)
        sub = _support_box(prob, rule.threshold * 0.5, out.box)  # type: ignore[arg-type]
        if sub is None:
            return self.lesions
        block = prob[tuple(slice(s - b, s - b + n) for s, b, n in zip(sub.start, out.box.start, sub.shape))]  # type: ignore[union-attr]
        values, where = self.grids.to_source(block, sub)
        labels, count = ndimage.label(values >= rule.threshold)
        if count == 0:
            return self.lesions
        masks = self.segment_masks()
        organs = {s.site: masks[s.organ_segment] for s in spec.sites}
        spacing = self.grids.spacing
        offset = [w.start for w in where]
        reach = [max(1, int(round(NEAR_ORGAN_MM / step))) for step in spacing]
        for index, component in enumerate(ndimage.find_objects(labels), start=1):
            local = labels[component] == index
            voxels = int(local.sum())
            full_slices = tuple(slice(o + c.start, o + c.stop) for o, c in zip(offset, component))
            overlap = {site: int((organ[full_slices] & local).sum()) for site, organ in organs.items()}
            site, hits = max(overlap.items(), key=lambda kv: kv[1])
            if hits == 0:
                # Not inside any screened organ: a lesion at the organ's edge may have been left out of the
                # organ mask. Look NEAR_ORGAN_MM around it (on the full grid) before dropping it.
                window = tuple(slice(max(0, s.start - r), min(n, s.stop + r))
                               for s, r, n in zip(full_slices, reach, self.grids.shape))
                grown = np.zeros([w.stop - w.start for w in window], dtype=bool)
                grown[tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(full_slices, window))] = local
                grown = ndimage.binary_dilation(grown, structure=_ellipsoid(reach))
                overlap = {s: int((organ[window] & grown).sum()) for s, organ in organs.items()}
                site, hits = max(overlap.items(), key=lambda kv: kv[1])
                if hits == 0:
                    continue
            full = np.zeros(self.grids.shape, dtype=bool)
            full[full_slices] = local
            centre_idx = np.array([s.start for s in full_slices]) + np.array(ndimage.center_of_mass(local))
            self.lesions.append({
                "site": site,
                "mask": full,
                "score": float(values[component][local].max()),
                "voxels": voxels,
                "volume_mm3": voxels * self.voxel_mm3,
                "centre_mm": (centre_idx + 0.5) * np.asarray(spacing),
            })
        return self.lesions

    def typing_centres(self, stage, outputs: dict[str, StageOutput]) -> list[np.ndarray]:  # noqa: ANN001
        self.outputs = outputs
        spec = self.manifest.lesions
        if spec is None or spec.typing_stage != stage.id:
            return []
        return [lesion["centre_mm"] for lesion in self.lesion_components()]


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
                   timings: dict[str, float]) -> _BundleRun:
        """Every stage of ``bundle``, then the segment masks and lesion candidates (LPS source grid)."""
        run = _BundleRun(bundle, grids, volume)
        run.outputs = CascadeRunner(bundle).run(grids, components=run.typing_centres, timings=timings)
        # The typing stage asked for lesion centres before later stages ran: if a segment comes from a
        # later stage, build the masks again (lesion components come out in the same order, so the
        # typing vectors still line up).
        if run.masks is not None and bundle.manifest.lesions and bundle.manifest.lesions.typing_stage:
            order = [s.id for s in bundle.manifest.stages]
            typing_at = order.index(bundle.manifest.lesions.typing_stage)
            if any(order.index(seg.stage) > typing_at for seg in bundle.manifest.segments):
                run.masks = None
                run.lesions = None
        start = time.perf_counter()
        run.segment_masks()
        run.lesion_components()
        timings[f"postprocess {bundle.manifest.id}"] = time.perf_counter() - start
        return run

    def masks(self, volume: CTVolume, bundle: ModelBundle | None = None) -> dict[str, np.ndarray]:
        """Each segment's mask (volume order) from one bundle, without measuring or encoding."""
        grids = VolumeGrids(volume)
        run = self.run_bundle(bundle or self.bundle, grids, volume, {})
        return {label: flip(mask, grids.flips) for label, mask in run.segment_masks().items()}

    def findings(
        self, volume: CTVolume, bundle: ModelBundle | None = None
    ) -> tuple[list[SegmentFinding], list[SiteResult], dict[str, Any]]:
        """Findings, per-site answers and measurements of one bundle, without encoding."""
        run = self.run_bundle(bundle or self.bundle, VolumeGrids(volume), volume, {})
        return self.findings_of(run)

    def findings_of(self, run: _BundleRun) -> tuple[list[SegmentFinding], list[SiteResult], dict[str, Any]]:
        """Organ and lesion findings (volume order), per-site answers and measurements."""
        m = run.manifest
        key = run.bundle.key
        volume = run.volume
        flips = run.grids.flips
        hu = run.grids.hu
        masks = run.segment_masks()
        findings: list[SegmentFinding] = []
        for spec in m.segments:
            mask = masks[spec.label]
            count = int(mask.sum())
            if count == 0:
                LOG.info("segment %s of %s is empty in series %s", spec.label, m.id, volume.series_instance_uid)
                continue
            stats = organ_stats(hu, mask, run.grids.spacing)
            findings.append(SegmentFinding(
                number=len(findings) + 1,
                label=spec.label,
                category=spec.category,
                type=spec.type,
                finding_site=spec.finding_site,
                mask=np.ascontiguousarray(flip(mask, flips)),
                tracking_id=f"{spec.label} ({m.id})",
                tracking_uid=derive_uid("tracking", volume.series_instance_uid, key, spec.label),
                volume_mm3=count * run.voxel_mm3,
                mean_hu=float(stats.mean_hu),
                voxel_count=count,
                extra={"median_hu": float(stats.median_hu), "cut_by_field_of_view": bool(stats.cut_by_field_of_view),
                       "role": spec.role},
            ))
        sites: list[SiteResult] = []
        measurements: dict[str, Any] = {}
        lesion_spec = m.lesions
        if lesion_spec is not None:
            typing = run.outputs.get(lesion_spec.typing_stage) if lesion_spec.typing_stage else None
            vectors = typing.vectors if typing is not None else []
            kept: dict[str, list[SegmentFinding]] = {s.site: [] for s in lesion_spec.sites}
            raw: dict[str, float] = {s.site: 0.0 for s in lesion_spec.sites}
            for i, lesion in enumerate(run.lesion_components()):
                site = lesion_spec.site(lesion["site"])
                raw[site.site] = max(raw[site.site], lesion["score"])
                size = nodule_measurements(hu, lesion["mask"], run.grids.spacing)
                long_axis = max((n.long_axis_mm for n in size), default=0.0)
                short_axis = max((n.short_axis_mm for n in size), default=0.0)
                if lesion["score"] < site.threshold or long_axis < site.min_diameter_mm \
                        or lesion["volume_mm3"] < site.min_component_mm3:
                    continue
                extra: dict[str, Any] = {
                    "site": site.site, "score": lesion["score"], "long_axis_mm": long_axis,
                    "short_axis_mm": short_axis, "mean_diameter_mm": round((long_axis + short_axis) / 2, 1),
                    "centre_mm": [float(v) for v in lesion["centre_mm"]], "role": "lesion",
                }
                lesion_type = CodeSpec("52988006", "SCT", "Lesion")
                if i < len(vectors):
                    probs = {c: float(p) for c, p in zip(typing.stage.channels, vectors[i])}  # type: ignore[union-attr]
                    best = max(probs, key=probs.get)  # type: ignore[arg-type]
                    lesion_type = lesion_spec.types[best]
                    extra.update(type=best, type_probabilities=probs,
                                 malignancy=sum(probs[c] for c in lesion_spec.malignant_types))
                organ = m.segment(site.organ_segment)
                number = len(kept[site.site]) + 1
                label = f"{site.site} lesion {number}"
                findings.append(SegmentFinding(
                    number=len(findings) + 1,
                    label=label,
                    category=LESION_CATEGORY,
                    type=lesion_type,
                    finding_site=organ.finding_site or organ.type,
                    mask=np.ascontiguousarray(flip(lesion["mask"], flips)),
                    tracking_id=f"{label} ({m.id})",
                    tracking_uid=derive_uid("tracking", volume.series_instance_uid, key, label),
                    volume_mm3=lesion["volume_mm3"],
                    mean_hu=float(hu[lesion["mask"]].mean(dtype=np.float64)),
                    voxel_count=lesion["voxels"],
                    extra=extra,
                ))
                kept[site.site].append(findings[-1])
            for site in lesion_spec.sites:
                organ_mask = masks[site.organ_segment]
                found = kept[site.site]
                score = max((f.extra["score"] for f in found), default=0.0)
                if found:
                    sites.append(SiteResult(site.site, site.finding, "present", score,
                                            lesion_labels=[_lesion_text(f) for f in found]))
                elif not organ_mask.any():
                    sites.append(SiteResult(site.site, site.finding, "not evaluable", raw[site.site],
                                            f"{site.organ_segment.lower()} not found in the field of view"))
                elif field_of_view_cut(organ_mask):
                    sites.append(SiteResult(site.site, site.finding, "not evaluable", raw[site.site],
                                            f"{site.organ_segment.lower()} cut by the field of view"))
                else:
                    # The score of an absent site is its best candidate below the site threshold (or 0).
                    sites.append(SiteResult(site.site, site.finding, "absent", raw[site.site]))
        measurements.update(self.measure(run, findings))
        return findings, sites, measurements

    def measure(self, run: _BundleRun, findings: list[SegmentFinding]) -> dict[str, Any]:
        """The manifest's opportunistic measurements (bone density, steatosis, lung nodules)."""
        conf = run.manifest.measurements
        masks = run.segment_masks()
        hu, spacing = run.grids.hu, run.grids.spacing
        kvp = _kvp(run.volume)
        out: dict[str, Any] = {}
        if "bone_density" in conf:
            c = conf["bone_density"]
            levels = vertebral_levels_from_ribs(masks[c["vertebra_segment"]], masks[c["rib_segment"]], spacing)
            result = bone_density_assessment(levels, hu, spacing, kvp)
            out["bone_density"] = _plain(result)
        if "steatosis" in conf:
            c = conf["steatosis"]
            liver = organ_stats(hu, masks[c["liver_segment"]], spacing)
            spleen = organ_stats(hu, masks[c["spleen_segment"]], spacing) if c.get("spleen_segment") else None
            out["steatosis"] = _plain(steatosis_assessment(liver, spleen))
            out["steatosis"]["kvp"] = kvp
        if "lung_nodules" in conf:
            site = conf["lung_nodules"]["site"]
            nodules = []
            for f in findings:
                if f.extra.get("site") == site:
                    mask = flip(f.mask, run.grids.flips)
                    for n in nodule_measurements(hu, mask, spacing):
                        nodules.append({"label": f.label, "mean_diameter_mm": n.mean_diameter_mm,
                                        "volume_mm3": n.volume_mm3, "lung_rads": n.lung_rads})
                        f.extra["lung_rads"] = n.lung_rads
            out["lung_nodules"] = nodules
        return out

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
        timings: dict[str, float] = {}
        start = time.perf_counter()
        check_eligibility(volume)
        grids = VolumeGrids(volume)
        timings["eligibility"] = time.perf_counter() - start
        results = []
        for index, bundle in enumerate(self.bundles):
            if progress:
                progress("inference")
            run = self.run_bundle(bundle, grids, volume, timings)
            findings, sites, measurements = self.findings_of(run)
            if not findings:
                LOG.warning("model %s found nothing to segment in series %s: no SEG or SR from it",
                            bundle.key, volume.series_instance_uid)
                continue
            if progress:
                progress("encode")
            t0 = time.perf_counter()
            mine = [ds for ds in previous_reports if _made_by(ds, bundle)]
            seg, sr = self.encode(volume, findings, bundle=bundle, index=index, version=version,
                                  previous_reports=mine, sites=sites, measurements=measurements)
            key_images = self.key_images(volume, findings, bundle=bundle, index=index, version=version)
            timings[f"encode {bundle.manifest.id}"] = time.perf_counter() - t0
            results.append(BundleResult(bundle.key, bundle.manifest.id, findings, seg, sr, sites, measurements,
                                        {k: v.skipped or "ran" for k, v in run.outputs.items()}, key_images,
                                        self.labelling.risk))
        if not results:
            raise ResultEncodingError(
                f"no model found anything to segment in this series ({', '.join(b.key for b in self.bundles)})")
        timings["total"] = time.perf_counter() - start
        return SeriesResult(results, timings)

    def encode(
        self,
        volume: CTVolume,
        findings: list[SegmentFinding],
        *,
        bundle: ModelBundle | None = None,
        index: int = 0,
        version: int = 1,
        previous_reports: Sequence[Dataset] = (),
        sites: Sequence[SiteResult] = (),
        measurements: dict[str, Any] | None = None,
    ) -> tuple[Dataset, Dataset]:
        """Build the SEG and the SR with UIDs derived from the source series, the model and the version;
        the SR also carries the per-site answers, risk tiers and measurements as qualitative evaluations."""
        bundle = bundle or self.bundle
        # A label map is another SOP class: it (and the SR that references it) gets UIDs of its own.
        variant = "LABELMAP" if self.labelling.seg_type == "LABELMAP" else ""
        uids = result_uids(volume.series_instance_uid, bundle.key, version, variant)
        suffix = f" v{version}" if version > 1 else ""
        algorithm = bundle.algorithm_identity(self.labelling.software_version)
        notice = self.labelling.research_notice
        seg = build_segmentation(
            volume,
            findings,
            algorithm,
            series_instance_uid=uids.seg_series_instance_uid,
            sop_instance_uid=uids.seg_sop_instance_uid,
            series_number=self.labelling.seg_series_number + 10 * index,
            series_description=_description(f"AI {bundle.manifest.id} SEG{suffix}", notice),
            content_description=notice,
            segmentation_type=self.labelling.seg_type,
        )
        sr = build_measurement_report(
            volume,
            findings,
            seg,
            algorithm,
            series_instance_uid=uids.sr_series_instance_uid,
            sop_instance_uid=uids.sr_sop_instance_uid,
            series_number=self.labelling.sr_series_number + 10 * index,
            series_description=_description(f"AI {bundle.manifest.id} report{suffix}", notice),
            research_notice=notice,
            previous_versions=previous_reports,
            sites=sites,
            measurements=measurements or {},
            risk=self.labelling.risk,
            points="all",
        )
        return seg, sr


    def key_images(self, volume: CTVolume, findings: list[SegmentFinding], *, bundle: ModelBundle,
                   index: int = 0, version: int = 1) -> list[Dataset]:
        """Key images of the lesions, for viewers that show neither SEG nor SR: Secondary Captures
        (contour and label burned in) or a GSPS over the source slices, as ``key_image_type`` says;
        none when the bundle reports no lesion or the site turned them off.

        Both kinds take the same series number (one or the other is made) and UIDs derived from
        the same inputs, each in its own series: a series holds one modality (OT or PR).
        """
        kind = self.labelling.key_image_type
        if kind == "NONE" or not any(f.extra.get("role") == "lesion" for f in findings):
            return []
        parts = (volume.series_instance_uid, bundle.key) + ((f"v{version}",) if version > 1 else ())
        suffix = f" v{version}" if version > 1 else ""
        from pipelines.dicom_out.keyimages import KeyImageSeries, build_key_images
        from pipelines.dicom_out.presentation import build_presentation_states

        build, tag, title = ((build_presentation_states, "PR", "key images GSPS") if kind == "GSPS"
                             else (build_key_images, "KI", "key images"))
        series = KeyImageSeries(
            series_instance_uid=derive_uid(*parts, tag, "series"),
            series_number=self.labelling.sr_series_number + 1 + 10 * index,
            series_description=_description(f"AI {bundle.manifest.id} {title}{suffix}",
                                            self.labelling.research_notice),
            research_notice=self.labelling.research_notice,
            uid_prefix_parts=parts,
        )
        return build(volume, findings, bundle.algorithm_identity(self.labelling.software_version), series)


#: SEG category of lesions (SCT 49755003, PS3.16 CID 7150).
LESION_CATEGORY = CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")


def _lesion_text(f: SegmentFinding) -> str:
    text = f"{f.label} {f.extra['long_axis_mm']:.0f} mm"
    if "type" in f.extra:
        text += f" {f.extra['type']}"
    return text


def _kvp(volume: CTVolume) -> float | None:
    try:
        return float(volume.first.KVP)
    except (AttributeError, TypeError, ValueError):
        return None


def _plain(result: Any) -> dict[str, Any]:
    """A measurement result dataclass as a JSON-friendly dict."""
    if result is None:
        return {"evaluable": False, "reason": "not measured"}
    data = asdict(result) if is_dataclass(result) else dict(result)
    clean: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, np.ndarray):
            continue
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        clean[k] = list(v) if isinstance(v, tuple) else v
    if hasattr(result, "evaluable"):
        clean["evaluable"] = bool(result.evaluable)
    return clean


def _made_by(ds: Dataset, bundle: ModelBundle) -> bool:
    """Whether an earlier SR came from this bundle (its series description names the bundle id)."""
    return str(getattr(ds, "SeriesDescription", "")).startswith(f"AI {bundle.manifest.id} ")


def _description(title: str, notice: str) -> str:
    """SeriesDescription (LO, 64 chars): the title and as much of the notice as fits."""
    text = f"{title} - {notice}" if notice else title
    return text if len(text) <= 64 else text[:61].rstrip() + "..."
