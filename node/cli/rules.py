"""``pacs-ai-node rules check``: which series the eligibility rules would run, and why not.

    pacs-ai-node rules check DIR_OR_FILE... [--rules FILE]

A dry run on headers only (read with ``stop_before_pixels``): files are grouped
into series by Series Instance UID and each series is evaluated with the rules
(:mod:`pipelines.rules.ruleset`); nothing is decoded, analysed or sent. Output, one
block per series, in the order the series were first found::

    series <uid>: would run (112 instances, series 1 "...")
    series <uid>: rejected (20 instances, series 2 "...")
      no_contrast_agent: contrast agent present (Contrast/Bolus Agent = "OMNIPAQUE")
    2 series checked with <rules file> (13 rules): 1 would run, 1 rejected

Exit status: 0 when the check ran, whatever the rules decided (a rejection is
an answer, not an error); 1 when no DICOM series was found; 2 for a path that
does not exist or a rules file that is not valid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.rules.ruleset import RulesError, RuleSet

EXIT_CHECKED = 0
EXIT_NO_SERIES = 1
EXIT_USAGE = 2


@dataclass
class SeriesHeaders:
    """The headers of one series found on disk."""

    uid: str
    headers: list[Dataset] = field(default_factory=list)

    def label(self) -> str:
        first = self.headers[0]
        number = first.get("SeriesNumber")
        description = str(first.get("SeriesDescription") or "").strip()
        parts = [f"{len(self.headers)} instance{'s' if len(self.headers) != 1 else ''}"]
        if number not in (None, ""):
            parts.append(f"series {number}" + (f' "{description}"' if description else ""))
        elif description:
            parts.append(f'"{description}"')
        return ", ".join(parts)


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def add_parser(subparsers: argparse._SubParsersAction[_Parser]) -> argparse.ArgumentParser:
    """Register ``rules check`` on the node's top-level subparsers."""
    rules = subparsers.add_parser("rules", help="eligibility rules: dry-run them on DICOM files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser(
        "check",
        help="say which series the rules would run, and every reason why not for the others",
        description="Dry run of the eligibility rules on DICOM headers (no pixel data is read, nothing is sent). "
        "Exit 0 when the check ran, 1 when no DICOM series was found, 2 for a missing path or invalid rules.",
    )
    check.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="DICOM files, or folders searched recursively")
    check.add_argument("--rules", type=Path, metavar="FILE", help="rules TOML file (default: the packaged rules)")
    check.set_defaults(func=cmd_rules_check)
    return rules


def cmd_rules_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Group the files into series, evaluate the rules on each, print the decisions."""
    out = out or sys.stdout
    try:
        rules = RuleSet.load(args.rules)
    except RulesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    paths = [Path(p) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist", file=sys.stderr)
        return EXIT_USAGE
    series, skipped = read_series_headers(_files(paths))
    for line in skipped:
        print(f"skipped {line}", file=out)
    if not series:
        print(f"no DICOM series found in {', '.join(map(str, paths))}", file=out)
        return EXIT_NO_SERIES
    would_run = 0
    for found in series:
        decision = rules.evaluate(found.headers)
        if decision.eligible:
            would_run += 1
            print(f"series {found.uid}: would run ({found.label()})", file=out)
            continue
        print(f"series {found.uid}: rejected ({found.label()})", file=out)
        for failure in decision.failures:
            print(f"  {failure.rule_id}: {failure.reason}", file=out)
    print(
        f"{len(series)} series checked with {rules.source} ({len(rules.rules)} rules): "
        f"{would_run} would run, {len(series) - would_run} rejected",
        file=out,
    )
    return EXIT_CHECKED


def _files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def read_series_headers(files: Iterable[Path]) -> tuple[list[SeriesHeaders], list[str]]:
    """Headers (no pixel data) grouped by Series Instance UID; plus why other files were skipped."""
    groups: dict[str, SeriesHeaders] = {}
    skipped: list[str] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append(f"{path}: not a DICOM file")
            continue
        except Exception as exc:  # pydicom raises many types for damaged files
            skipped.append(f"{path}: unreadable ({exc})")
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        if not uid:
            skipped.append(f"{path}: no Series Instance UID")
            continue
        groups.setdefault(uid, SeriesHeaders(uid)).headers.append(ds)
    return list(groups.values()), skipped
