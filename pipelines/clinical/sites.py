"""Per-site screening answers of one bundle: present, absent or not evaluable, with a score."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.clinical.findings import SegmentFinding
from pipelines.clinical.measurements import field_of_view_cut
from pipelines.clinical.results import ABSENT, NOT_EVALUABLE, PRESENT, SiteResult
from pipelines.model.run import BundleRun


def lesion_text(finding: SegmentFinding) -> str:
    """``"pancreas lesion 1 21 mm malignant"``: label, long axis and type of a lesion finding."""
    lesion = finding.lesion
    if lesion is None:
        raise ValueError(f"finding {finding.label!r} is not a lesion")
    text = f"{finding.label} {lesion.long_axis_mm:.0f} mm"
    if lesion.type is not None:
        text += f" {lesion.type}"
    return text


def site_answers(run: BundleRun, findings: Sequence[SegmentFinding]) -> list[SiteResult]:
    """One :class:`SiteResult` per screened site of the bundle, in manifest order.

    A site is present when a lesion finding was kept there (score: its best lesion);
    not evaluable when its organ is missing or cut by the field of view; absent
    otherwise, scored by its best candidate below the site's floors (or 0).
    """
    spec = run.manifest.lesions
    if spec is None:
        return []
    masks = run.segment_masks()
    raw: dict[str, float] = {s.site: 0.0 for s in spec.sites}
    for candidate in run.lesion_components():
        raw[candidate.site] = max(raw[candidate.site], candidate.score)
    sites: list[SiteResult] = []
    for site in spec.sites:
        organ_mask = masks[site.organ_segment]
        found = [f for f in findings if f.lesion is not None and f.lesion.site == site.site]
        score = max((f.lesion.score for f in found if f.lesion is not None), default=0.0)
        if found:
            sites.append(SiteResult(site.site, site.finding, PRESENT, score,
                                    lesion_labels=tuple(lesion_text(f) for f in found)))
        elif not organ_mask.any():
            sites.append(SiteResult(site.site, site.finding, NOT_EVALUABLE, raw[site.site],
                                    f"{site.organ_segment.lower()} not found in the field of view"))
        elif field_of_view_cut(organ_mask):
            sites.append(SiteResult(site.site, site.finding, NOT_EVALUABLE, raw[site.site],
                                    f"{site.organ_segment.lower()} cut by the field of view"))
        else:
            sites.append(SiteResult(site.site, site.finding, ABSENT, raw[site.site]))
    return sites
