"""One bundle's run on one volume: its cascade of networks, then segment masks and lesion candidates.

:func:`run_bundle` runs every stage of a bundle (:class:`pipelines.model.inference.CascadeRunner`)
and turns the stage outputs into one boolean mask per manifest segment and a list of
:class:`LesionCandidate` on the LPS-flipped source grid (:class:`VolumeGrids`), each
candidate assigned to a screened site. What they mean clinically (findings, site
answers, measurements) is decided in :mod:`pipelines.clinical`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.model.bundle import ModelBundle
from pipelines.model.inference import CascadeRunner, StageOutput, VolumeGrids
from pipelines.model.manifest import Stage
from pipelines.model.masks import (
    components_at_least,
    ellipsoid,
    fill_holes_per_slice,
    largest_component,
    support_box,
)
from pipelines.timing import StageTiming
from pipelines.volume.ct import CTVolume

#: How far outside its organ mask a lesion may lie and still be assigned to the organ.
NEAR_ORGAN_MM = 5.0


@dataclass(frozen=True, eq=False)
class LesionCandidate:
    """One connected component of a bundle's lesion channel, assigned to a screened site.

    ``mask`` is on the LPS-flipped source grid; ``score`` is the highest lesion
    probability in it; ``centre_mm`` its centre of mass in mm on that grid.
    """

    site: str
    mask: np.ndarray
    score: float
    voxels: int
    volume_mm3: float
    centre_mm: np.ndarray

    def __post_init__(self) -> None:
        if not self.site:
            raise ValueError("LesionCandidate.site must not be empty")
        if self.voxels <= 0:
            raise ValueError(f"lesion candidate at {self.site!r}: voxels must be > 0, got {self.voxels!r}")


class BundleRun:
    """The state of one bundle's run on one volume (segments, lesions), computed lazily in stage order."""

    def __init__(self, bundle: ModelBundle, grids: VolumeGrids, volume: CTVolume) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.grids = grids
        self.volume = volume
        self.outputs: dict[str, StageOutput] = {}
        self.masks: dict[str, np.ndarray] | None = None
        self.lesions: list[LesionCandidate] | None = None

    @property
    def voxel_mm3(self) -> float:
        """Volume of one source voxel in mm^3."""
        return float(np.prod(self.grids.spacing))

    def _source_block(
        self, out: StageOutput, prob: np.ndarray, floor: float
    ) -> tuple[np.ndarray, tuple[slice, ...]] | None:
        """``prob`` (on ``out.box``) resampled onto the source grid where it reaches ``floor``."""
        assert out.box is not None  # a segmentation stage that ran has a box
        sub = support_box(prob, floor, out.box)
        if sub is None:
            return None
        block = prob[tuple(slice(s - b, s - b + n) for s, b, n in zip(sub.start, out.box.start, sub.shape))]
        return self.grids.to_source(block, sub)

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
                resampled = self._source_block(out, np.asarray(prob), spec.threshold * 0.5)
                if resampled is not None:
                    values, where = resampled
                    mask[where] = values >= spec.threshold
            post = spec.postprocess
            if "within" in post:
                mask &= masks[post["within"]]
            if post.get("largest_component"):
                mask = largest_component(mask)
            if post.get("fill_holes_per_slice"):
                mask = fill_holes_per_slice(mask)
            if post.get("min_component_mm3"):
                min_voxels = int(np.ceil(float(post["min_component_mm3"]) / self.voxel_mm3))
                mask = components_at_least(mask, max(min_voxels, 1))
            masks[spec.label] = mask
        self.masks = masks
        return masks

    def lesion_components(self) -> list[LesionCandidate]:
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
        resampled = self._source_block(out, out.channel(spec.channel), rule.threshold * 0.5)
        if resampled is None:
            return self.lesions
        values, where = resampled
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
                grown = ndimage.binary_dilation(grown, structure=ellipsoid(reach))
                overlap = {s: int((organ[window] & grown).sum()) for s, organ in organs.items()}
                site, hits = max(overlap.items(), key=lambda kv: kv[1])
                if hits == 0:
                    continue
            full = np.zeros(self.grids.shape, dtype=bool)
            full[full_slices] = local
            centre_idx = np.array([s.start for s in full_slices]) + np.array(ndimage.center_of_mass(local))
            self.lesions.append(LesionCandidate(
                site=site,
                mask=full,
                score=float(values[component][local].max()),
                voxels=voxels,
                volume_mm3=voxels * self.voxel_mm3,
                centre_mm=(centre_idx + 0.5) * np.asarray(spacing),
            ))
        return self.lesions

    def typing_centres(self, stage: Stage, outputs: dict[str, StageOutput]) -> list[np.ndarray]:
        """The centres (mm) of the lesion candidates, for the bundle's typing stage (none for another stage)."""
        self.outputs = outputs
        spec = self.manifest.lesions
        if spec is None or spec.typing_stage != stage.id:
            return []
        return [lesion.centre_mm for lesion in self.lesion_components()]


def run_bundle(bundle: ModelBundle, grids: VolumeGrids, volume: CTVolume,
               timings: list[StageTiming] | None = None) -> BundleRun:
    """Every stage of ``bundle``, then the segment masks and lesion candidates (LPS source grid).

    Each network stage and the post-processing append a :class:`StageTiming` to ``timings``.
    """
    run = BundleRun(bundle, grids, volume)
    run.outputs = CascadeRunner(bundle).run(grids, components=run.typing_centres, timings=timings)
    # The typing stage asked for lesion centres before later stages ran: if a segment comes from a
    # later stage, build the masks again (lesion components come out in the same order, so the
    # typing vectors still line up).
    lesions = bundle.manifest.lesions
    if run.masks is not None and lesions and lesions.typing_stage:
        order = [s.id for s in bundle.manifest.stages]
        typing_at = order.index(lesions.typing_stage)
        if any(order.index(seg.stage) > typing_at for seg in bundle.manifest.segments):
            run.masks = None
            run.lesions = None
    start = time.perf_counter()
    run.segment_masks()
    run.lesion_components()
    if timings is not None:
        timings.append(StageTiming("postprocess", time.perf_counter() - start, bundle.manifest.id))
    return run
