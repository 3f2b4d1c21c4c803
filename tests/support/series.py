"""New series written from the real abdomen slices: new UIDs, optional header changes, optional gaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from support.data import abdomen_files


@dataclass(frozen=True)
class SourceSeries:
    """A series written by :func:`copy_series`: its study and series UIDs and its files, in slice order."""

    study_uid: str
    series_uid: str
    files: list[Path]


def copy_series(folder: Path, count: int | None = None, skip: tuple[int, ...] = (), new_study: bool = False,
                **changes: object) -> SourceSeries:
    """The abdomen series (or its first ``count`` slices, less the indices in ``skip``) as a new series.

    Every instance gets a new SOP Instance UID and all share a new Series Instance UID (and a
    new Study Instance UID when ``new_study``); ``changes`` sets header attributes by keyword
    (e.g. ``ContrastBolusAgent="IOMEPROL 350"``, ``SOPClassUID=...``). The file meta's SOP class
    follows the dataset's. Files are ``folder/NNNN.dcm``, numbered by the original slice index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    study_uid = generate_uid() if new_study else None
    files = []
    for i, src in enumerate(abdomen_files()[:count]):
        if i in skip:
            continue
        ds = pydicom.dcmread(src)
        if study_uid is not None:
            ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    first = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
    return SourceSeries(str(first.StudyInstanceUID) if first else "", series_uid, files)
