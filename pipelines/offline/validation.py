"""Validate a model bundle on labelled cases: the harness a site runs before go-live.

A labelled folder holds one sub-folder per case (the layout
:func:`pipelines.offline.phantom.write_case` writes, and the one a site produces from
its own annotated studies)::

    CASE/dicom/*.dcm      the CT series
    CASE/labels.npz       uint8 arrays in the series' slice order (sorted
                          along the slice normal, as the node loads it):
                          ``organs`` (label map), optionally ``lesions``
                          (0 = none, i = lesion i of truth.json)
    CASE/truth.json       {"label_names": {"1": "lung", ...},
                           "lesions": [{"number": 1, "site": "pancreas",
                                        "diameter_mm": 14.0, ...}, ...]}

The bundle runs exactly as in the node (same runtime, same post-processing).
Per segment: Dice against the label of the same name (a segment "Liver"
matches the label "liver"; plural "s" ignored). Per lesion site, with lesions
of at least ``min_diameter_mm``:

- lesion sensitivity: truth lesions overlapped by a lesion the bundle reports
  at that site, over all truth lesions (Wilson 95 % interval);
- case specificity: cases with no truth lesion of any size at the site that
  the bundle calls "absent", over those cases; "not evaluable" cases are
  counted separately and left out of both;
- AUC of the site score (the highest lesion probability, 0 when none) between
  cases with a lesion and cases without (Mann-Whitney).

Smaller lesions are reported on their own (sensitivity per size band).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import PacsAiError, SeriesRejected
from pipelines.model.bundle import ModelBundle

LOG = logging.getLogger(__name__)

SIZE_BANDS = ((0.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, math.inf))


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default)."""
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def auc(positive_scores: Iterable[float], negative_scores: Iterable[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)), ties counted half."""
    pos = np.asarray(list(positive_scores), dtype=float)
    neg = np.asarray(list(negative_scores), dtype=float)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return math.nan
    return 2.0 * int((a & b).sum()) / total


def _normalise(name: str) -> str:
    name = name.strip().lower().replace(" ", "_")
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


@dataclass
class Proportion:
    successes: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, Any]:
        low, high = wilson_interval(self.successes, self.total)
        value = self.successes / self.total if self.total else math.nan
        return {"value": value, "successes": self.successes, "total": self.total, "ci95": [low, high]}


@dataclass
class SiteTally:
    sensitivity: Proportion = field(default_factory=Proportion)
    specificity: Proportion = field(default_factory=Proportion)
    by_size: dict[str, Proportion] = field(default_factory=dict)
    not_evaluable: int = 0
    positive_scores: list[float] = field(default_factory=list)
    negative_scores: list[float] = field(default_factory=list)
    typing: Proportion = field(default_factory=Proportion)


def case_folders(root: Path) -> list[Path]:
    """Case folders (those with truth.json) directly under ``root``, sorted."""
    if not root.is_dir():
        raise PacsAiError(f"{root} is not a folder")
    cases = sorted(p.parent for p in root.glob("*/truth.json"))
    if not cases:
        raise PacsAiError(f"{root}: no case folders (CASE/truth.json + CASE/labels.npz + CASE/dicom/)")
    return cases


def evaluate_case(analyzer: Any, case: Path, min_diameter_mm: float) -> dict[str, Any]:
    """Run the analyzer's (first) bundle on one case; plain data for :func:`validate_bundle` to add up."""
    from pipelines.volume.ct import load_series

    bundle = analyzer.bundle
    truth = json.loads((case / "truth.json").read_text())
    labels = np.load(case / "labels.npz")
    try:
        volume = load_series(sorted((case / "dicom").glob("*.dcm")))
        start = time.perf_counter()
        findings, site_results, _ = analyzer.findings(volume)
        seconds = time.perf_counter() - start
    except (SeriesRejected, PacsAiError) as exc:
        return {"case": case.name, "failure": str(exc)}
    organs = labels["organs"]
    if organs.shape != volume.shape:
        return {"case": case.name,
                "failure": f"labels.npz organs {organs.shape} is not the series shape {volume.shape}"}
    names = {_normalise(v): int(k) for k, v in truth.get("label_names", {}).items()}
    masks = {f.label: f.mask for f in findings}
    dice_scores = {}
    for segment in bundle.manifest.segments:
        value = names.get(_normalise(segment.label))
        if value is not None:
            score = dice(masks.get(segment.label, np.zeros(organs.shape, bool)), organs == value)
            if not math.isnan(score):
                dice_scores[segment.label] = score
    sites: dict[str, Any] = {}
    spec = bundle.manifest.lesions
    if spec is not None:
        lesion_map = labels["lesions"] if "lesions" in labels.files else np.zeros(organs.shape, np.uint8)
        by_site = {r.site: r for r in site_results}
        for site in spec.sites:
            result = by_site[site.site]
            truth_lesions = [t for t in truth.get("lesions", []) if t["site"] == site.site]
            reported = [f for f in findings if f.lesion is not None and f.lesion.site == site.site]
            records = []
            for t in truth_lesions:
                hits = [f for f in reported if (f.mask & (lesion_map == t["number"])).any()]
                typed = None
                facts = hits[0].lesion if hits else None
                if facts is not None and "type" in t and facts.type is not None:
                    typed = facts.type == t["type"]
                records.append({"diameter_mm": float(t["diameter_mm"]), "hit": bool(hits), "typed": typed})
            sites[site.site] = {"status": result.status, "score": float(result.score), "lesions": records}
    return {"case": case.name, "seconds": seconds, "dice": dice_scores, "sites": sites}


_WORKER: dict[str, Any] = {}


def _init_worker(folder: str, providers: list[str] | None) -> None:
    from pipelines.analysis import SeriesAnalyzer

    _WORKER["analyzer"] = SeriesAnalyzer(ModelBundle(folder, providers=providers, intra_op_threads=1))


def _run_worker(args: tuple[str, float]) -> dict[str, Any]:
    return evaluate_case(_WORKER["analyzer"], Path(args[0]), args[1])


def validate_bundle(
    bundle: ModelBundle,
    labelled_dir: Path,
    *,
    min_diameter_mm: float = 10.0,
    limit: int | None = None,
    progress: Any = None,
    keep_scores: bool = False,
    workers: int = 1,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Run ``bundle`` on every case and return the metrics as a JSON-friendly dict.

    ``workers`` > 1 evaluates cases in that many processes, each loading the
    bundle once (with ``providers``). ``keep_scores`` adds each site's case
    scores (``positive_scores``, ``negative_scores``) to the report, e.g. to
    choose thresholds on tuning cases.
    """
    from pipelines.analysis import SeriesAnalyzer

    cases = case_folders(Path(labelled_dir))[:limit]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(bundle.folder), providers)
        ) as pool:
            results = []
            for result in pool.imap(_run_worker, [(str(c), min_diameter_mm) for c in cases]):
                results.append(result)
                if progress:
                    progress(result["case"])
    else:
        analyzer = SeriesAnalyzer(bundle)
        results = []
        for case in cases:
            results.append(evaluate_case(analyzer, case, min_diameter_mm))
            if progress:
                progress(case.name)
    return aggregate(bundle, results, min_diameter_mm, keep_scores)


def aggregate(bundle: ModelBundle, results: list[dict[str, Any]], min_diameter_mm: float,
              keep_scores: bool = False) -> dict[str, Any]:
    """Add up :func:`evaluate_case` results into the metrics report."""
    dice_scores: dict[str, list[float]] = {}
    sites: dict[str, SiteTally] = {}
    spec = bundle.manifest.lesions
    if spec is not None:
        sites = {s.site: SiteTally(by_size={_band(lo, hi): Proportion() for lo, hi in SIZE_BANDS}) for s in spec.sites}
    failures = [f"{r['case']}: {r['failure']}" for r in results if "failure" in r]
    done = [r for r in results if "failure" not in r]
    seconds = [r["seconds"] for r in done]
    for r in done:
        for label, score in r["dice"].items():
            dice_scores.setdefault(label, []).append(score)
        for site_name, record in r["sites"].items():
            tally = sites[site_name]
            big = [t for t in record["lesions"] if t["diameter_mm"] >= min_diameter_mm]
            for t in record["lesions"]:
                band = next(_band(lo, hi) for lo, hi in SIZE_BANDS if lo <= t["diameter_mm"] < hi)
                tally.by_size[band].successes += t["hit"]
                tally.by_size[band].total += 1
            for t in big:
                tally.sensitivity.successes += t["hit"]
                tally.sensitivity.total += 1
                if t["typed"] is not None:
                    tally.typing.total += 1
                    tally.typing.successes += t["typed"]
            if record["status"] == "not evaluable":
                tally.not_evaluable += 1
                continue
            if big:
                tally.positive_scores.append(record["score"])
            elif not record["lesions"]:
                tally.negative_scores.append(record["score"])
                tally.specificity.total += 1
                tally.specificity.successes += record["status"] == "absent"
    report: dict[str, Any] = {
        "bundle": bundle.key,
        "cases": len(results),
        "failed_cases": failures,
        "min_diameter_mm": min_diameter_mm,
        "seconds_per_case": {"median": float(np.median(seconds)) if seconds else math.nan,
                             "max": float(np.max(seconds)) if seconds else math.nan},
        "dice": {label: {"mean": float(np.mean(v)), "min": float(np.min(v)), "n": len(v)}
                 for label, v in dice_scores.items()},
        "sites": {},
    }
    for name, tally in sites.items():
        report["sites"][name] = {
            "lesion_sensitivity": tally.sensitivity.as_dict(),
            "case_specificity": tally.specificity.as_dict(),
            "auc": auc(tally.positive_scores, tally.negative_scores),
            "not_evaluable_cases": tally.not_evaluable,
            "sensitivity_by_diameter_mm": {k: v.as_dict() for k, v in tally.by_size.items()},
            "typing_accuracy": tally.typing.as_dict(),
        }
        if keep_scores:
            report["sites"][name].update(positive_scores=tally.positive_scores,
                                         negative_scores=tally.negative_scores)
    return report


def _band(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">={lo:g}"


def format_report(report: dict[str, Any]) -> str:
    """The metrics as plain-text tables."""
    lines = [f"bundle {report['bundle']}: {report['cases']} cases, {len(report['failed_cases'])} failed, "
             f"median {report['seconds_per_case']['median']:.1f} s per case"]
    for failure in report["failed_cases"]:
        lines.append(f"  failed: {failure}")
    if report["dice"]:
        lines.append("")
        lines.append(f"{'segment':<14} {'Dice mean':>9} {'min':>6} {'n':>4}")
        for label, d in report["dice"].items():
            lines.append(f"{label:<14} {d['mean']:>9.3f} {d['min']:>6.3f} {d['n']:>4}")
    if report["sites"]:
        lines.append("")
        lines.append(f"lesions >= {report['min_diameter_mm']:g} mm")
        lines.append(f"{'site':<12} {'sensitivity (95% CI)':>28} {'specificity (95% CI)':>28} {'AUC':>6} {'n.e.':>5}")
        for name, s in report["sites"].items():
            lines.append(f"{name:<12} {_prop(s['lesion_sensitivity']):>28} {_prop(s['case_specificity']):>28} "
                         f"{s['auc']:>6.3f} {s['not_evaluable_cases']:>5}")
        lines.append("")
        lines.append("sensitivity by truth diameter (mm): " + ", ".join(
            next(iter(report["sites"].values()))["sensitivity_by_diameter_mm"]))
        for name, s in report["sites"].items():
            lines.append(f"{name:<12} " + "  ".join(
                _prop(v, short=True) for v in s["sensitivity_by_diameter_mm"].values()))
    return "\n".join(lines)


def _prop(p: dict[str, Any], short: bool = False) -> str:
    if not p["total"]:
        return "-"
    if short:
        return f"{p['successes']}/{p['total']}"
    low, high = p["ci95"]
    return f"{p['value']:.3f} ({low:.3f}-{high:.3f}) {p['successes']}/{p['total']}"
