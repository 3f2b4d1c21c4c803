"""Network outputs -> findings: one :class:`SegmentFinding` per non-empty segment and per kept lesion.

Reads a finished :class:`pipelines.model.run.BundleRun` (masks and lesion
candidates on the LPS source grid) and gives findings in volume order, each
with its tracking identity, size and attenuation; lesions carry typed
:class:`LesionFacts` (site, score, axes, typing).
"""

from __future__ import annotations

import logging

import numpy as np

from pipelines.clinical.findings import (
    LESION_ROLE,
    CodeSpec,
    LesionFacts,
    SegmentFinding,
)
from pipelines.clinical.measurements import nodule_measurements, organ_stats
from pipelines.dicom_out.uids import derive_uid
from pipelines.model.inference import flip
from pipelines.model.run import BundleRun

LOG = logging.getLogger(__name__)

#: SEG category of lesions (SCT 49755003, PS3.16 CID 7150).
LESION_CATEGORY = CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")
#: Finding type of a lesion the typing stage did not type.
UNTYPED_LESION = CodeSpec("52988006", "SCT", "Lesion")


def organ_findings(run: BundleRun) -> list[SegmentFinding]:
    """One finding per non-empty manifest segment, numbered from 1 in manifest order."""
    m = run.manifest
    volume = run.volume
    masks = run.segment_masks()
    findings: list[SegmentFinding] = []
    for spec in m.segments:
        mask = masks[spec.label]
        count = int(mask.sum())
        if count == 0:
            LOG.info("segment %s of %s is empty in series %s", spec.label, m.id, volume.series_instance_uid)
            continue
        stats = organ_stats(run.grids.hu, mask, run.grids.spacing)
        findings.append(SegmentFinding(
            number=len(findings) + 1,
            label=spec.label,
            category=spec.category,
            type=spec.type,
            finding_site=spec.finding_site,
            mask=np.ascontiguousarray(flip(mask, run.grids.flips)),
            tracking_id=f"{spec.label} ({m.id})",
            tracking_uid=derive_uid("tracking", volume.series_instance_uid, run.bundle.key, spec.label),
            volume_mm3=count * run.voxel_mm3,
            mean_hu=float(stats.mean_hu),
            voxel_count=count,
            role=spec.role,
            median_hu=float(stats.median_hu),
            cut_by_field_of_view=bool(stats.cut_by_field_of_view),
        ))
    return findings


def lesion_findings(run: BundleRun, first_number: int) -> list[SegmentFinding]:
    """The lesion candidates that pass their site's score, diameter and volume floors, as findings
    numbered from ``first_number``; typed by the typing stage's vector when there is one."""
    m = run.manifest
    spec = m.lesions
    if spec is None:
        return []
    volume = run.volume
    hu = run.grids.hu
    typing = run.outputs.get(spec.typing_stage) if spec.typing_stage else None
    vectors = typing.vectors if typing is not None else []
    per_site: dict[str, int] = {s.site: 0 for s in spec.sites}
    findings: list[SegmentFinding] = []
    for i, lesion in enumerate(run.lesion_components()):
        site = spec.site(lesion.site)
        size = nodule_measurements(hu, lesion.mask, run.grids.spacing)
        long_axis = max((n.long_axis_mm for n in size), default=0.0)
        short_axis = max((n.short_axis_mm for n in size), default=0.0)
        if lesion.score < site.threshold or long_axis < site.min_diameter_mm \
                or lesion.volume_mm3 < site.min_component_mm3:
            continue
        lesion_type = UNTYPED_LESION
        type_name: str | None = None
        probs: dict[str, float] = {}
        malignancy: float | None = None
        if typing is not None and i < len(vectors):
            probs = {c: float(p) for c, p in zip(typing.stage.channels, vectors[i])}
            type_name = max(probs, key=lambda c: probs[c])
            lesion_type = spec.types[type_name]
            malignancy = sum(probs[c] for c in spec.malignant_types)
        organ = m.segment(site.organ_segment)
        per_site[site.site] += 1
        label = f"{site.site} lesion {per_site[site.site]}"
        findings.append(SegmentFinding(
            number=first_number + len(findings),
            label=label,
            category=LESION_CATEGORY,
            type=lesion_type,
            finding_site=organ.finding_site or organ.type,
            mask=np.ascontiguousarray(flip(lesion.mask, run.grids.flips)),
            tracking_id=f"{label} ({m.id})",
            tracking_uid=derive_uid("tracking", volume.series_instance_uid, run.bundle.key, label),
            volume_mm3=lesion.volume_mm3,
            mean_hu=float(hu[lesion.mask].mean(dtype=np.float64)),
            voxel_count=lesion.voxels,
            role=LESION_ROLE,
            lesion=LesionFacts(
                site=site.site,
                score=lesion.score,
                long_axis_mm=long_axis,
                short_axis_mm=short_axis,
                mean_diameter_mm=round((long_axis + short_axis) / 2, 1),
                centre_mm=tuple(float(v) for v in lesion.centre_mm),
                type=type_name,
                type_probabilities=probs,
                malignancy=malignancy,
            ),
        ))
    return findings


def bundle_findings(run: BundleRun) -> list[SegmentFinding]:
    """Organ findings, then lesion findings, numbered from 1 (volume order masks)."""
    organs = organ_findings(run)
    return organs + lesion_findings(run, len(organs) + 1)
