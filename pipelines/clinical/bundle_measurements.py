"""The opportunistic measurements a bundle's manifest asks for (bone density, steatosis, lung nodules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pipelines.clinical.findings import SegmentFinding
from pipelines.clinical.measurements import (
    bone_density_assessment,
    nodule_measurements,
    organ_stats,
    steatosis_assessment,
    vertebral_levels_from_ribs,
)
from pipelines.clinical.results import (
    BoneDensityResult,
    BundleMeasurements,
    LungNodule,
    SteatosisResult,
)
from pipelines.model.inference import flip
from pipelines.model.run import BundleRun
from pipelines.volume.ct import CTVolume


def tube_voltage(volume: CTVolume) -> float | None:
    """The series' KVP (0018,0060) in kV, or None when absent or not a number."""
    try:
        return float(volume.first.KVP)
    except (AttributeError, TypeError, ValueError):
        return None


def measure_bundle(
    run: BundleRun, findings: Sequence[SegmentFinding]
) -> tuple[list[SegmentFinding], BundleMeasurements]:
    """The manifest's measurements of one run, and ``findings`` with each lung nodule's Lung-RADS
    category added to its lesion facts."""
    conf = run.manifest.measurements
    masks = run.segment_masks()
    hu, spacing = run.grids.hu, run.grids.spacing
    kvp = tube_voltage(run.volume)
    bone: BoneDensityResult | None = None
    fat: SteatosisResult | None = None
    nodules: list[LungNodule] | None = None
    out = list(findings)
    if "bone_density" in conf:
        c = conf["bone_density"]
        levels = vertebral_levels_from_ribs(masks[c["vertebra_segment"]], masks[c["rib_segment"]], spacing)
        bone = bone_density_assessment(levels, hu, spacing, kvp)
    if "steatosis" in conf:
        c = conf["steatosis"]
        liver = organ_stats(hu, masks[c["liver_segment"]], spacing)
        spleen = organ_stats(hu, masks[c["spleen_segment"]], spacing) if c.get("spleen_segment") else None
        fat = steatosis_assessment(liver, spleen)
    if "lung_nodules" in conf:
        site = conf["lung_nodules"]["site"]
        nodules = []
        for i, f in enumerate(out):
            if f.lesion is None or f.lesion.site != site:
                continue
            for n in nodule_measurements(hu, flip(f.mask, run.grids.flips), spacing):
                nodules.append(LungNodule(f.label, n.mean_diameter_mm, n.lung_rads, n.volume_mm3))
                out[i] = replace(f, lesion=replace(f.lesion, lung_rads=n.lung_rads))
    return out, BundleMeasurements(bone, fat, tuple(nodules) if nodules is not None else None)
