"""New series written from the real abdomen slices: new UIDs, optional header changes, optional gaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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


def ct_slice(stored: np.ndarray, *, uids: tuple[str, str, str], number: int, orientation: tuple[float, ...],
             position: np.ndarray, pixel_spacing: tuple[float, float], thickness: float) -> Dataset:
    """One classic CT Image dataset (in memory, Explicit VR Little Endian) holding ``stored``
    (uint16, rescaled to HU by slope 1 and intercept -1024); ``uids`` are (study, series, frame of
    reference). Callers add what their test needs (patient, modality changes, KVP...)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.InstanceNumber = number
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    return ds
