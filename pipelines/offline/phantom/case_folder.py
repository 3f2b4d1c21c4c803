"""Writing a rendered phantom as a DICOM CT series and as a labelled case folder (:func:`write_case`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from pipelines.dicom_out.uids import derive_uid
from pipelines.offline.phantom.anatomy import Phantom
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.rendering import RenderedPhantom, render
from pipelines.offline.phantom.tables import (
    _HU_MIN,
    _UID_ROOT,
    CT_IMAGE_STORAGE,
    LESION_TYPES,
    LEVELS,
    MANUFACTURER,
    ORGAN_LABELS,
    PhantomError,
)

# --------------------------------------------------------------------------- DICOM and case folders


def _series_key(rendered: RenderedPhantom, grid: Grid) -> str:
    """What the pixel data depend on: every phantom parameter and the grid."""
    import hashlib

    text = rendered.phantom.to_json(sort_keys=True) + json.dumps(grid.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_dicom_series(
    rendered: RenderedPhantom,
    grid: Grid,
    out_dir: Path | str,
    *,
    seed: int | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write ``rendered`` as one CT Image Storage file per slice (Explicit VR Little Endian).

    UIDs are derived from ``seed`` (default: the phantom's) with
    :func:`pipelines.dicom_out.uids.derive_uid`: the study and Frame of Reference from the
    seed alone, the series from the phantom's parameters and the grid, so a
    rewrite is identical and a different rendering is a different series.
    Pixels are unsigned with Rescale Intercept -1024 (PS3.3 C.8.2.1). Files are
    named by Instance Number, 1 at the top (head) slice; returns them in that order.
    """
    # imported here, not at import time: training scripts never write DICOM
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    if not isinstance(rendered, RenderedPhantom):
        raise TypeError(f"rendered must be a RenderedPhantom, got {type(rendered).__name__}")
    if grid.shape != rendered.hu.shape:
        raise PhantomError(f"grid shape {grid.shape} does not match the rendered volume {rendered.hu.shape}")
    if grid.spacing_mm[0] <= 0 or grid.shape[0] < 1:
        raise PhantomError(f"grid {grid} has no slices")
    seed = rendered.phantom.seed if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(series_number, int) or not 0 <= series_number <= 2 ** 31 - 1:
        raise PhantomError(f"series_number must be a non-negative integer, got {series_number!r}")
    phantom = rendered.phantom
    study_uid = study_uid or derive_uid(_UID_ROOT, str(seed), "study")
    series_uid = series_uid or derive_uid(_UID_ROOT, str(seed), "series", _series_key(rendered, grid))
    frame_uid = derive_uid(_UID_ROOT, str(seed), "frame-of-reference")
    patient_name = patient_name if patient_name is not None else f"PHANTOM^{seed}"
    patient_id = patient_id if patient_id is not None else f"PHANTOM-{seed}"
    study_date = date(2024, 1, 1) + timedelta(days=seed % 366)
    birth = date(study_date.year - phantom.age, 1 + seed % 12, 1 + seed % 28)
    thickness = rendered.truth.get("slice_thickness_mm") or grid.spacing_mm[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, rows, cols = grid.shape
    sz, sy, sx = grid.spacing_mm
    ox, oy, oz = grid.origin_mm
    stored = (rendered.hu.astype(np.int32) - _HU_MIN).astype(np.uint16)
    paths: list[Path] = []
    for instance in range(1, nz + 1):
        k = nz - instance                       # instance 1 is the top slice
        sop_uid = derive_uid(series_uid, "instance", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "100000"
        ds.AccessionNumber = f"PH{seed}"[-16:]
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "synthetic phantom"
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST WO CONTRAST"
        ds.SeriesDescription = f"synthetic phantom {sz:g} mm"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = phantom.sex
        ds.PatientAge = f"{phantom.age:03d}Y"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:g}"
        ds.KVP = str(phantom.kvp)
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"PH{seed}"[-16:]
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagesInAcquisition = nz
        z = oz + k * sz
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _HU_MIN, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out_dir / f"{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:          # a handle: numpy would add ".npz" to a temporary name
            # allow_pickle=False: only numeric arrays are written (and the keyword cannot catch an array)
            np.savez_compressed(handle, allow_pickle=False, **arrays)
    _write_atomic(path, write)


def write_case(phantom: Phantom, grid: Grid, case_dir: Path | str, *, dicom: bool = True) -> Path:
    """Render ``phantom`` on ``grid`` and write a labelled case folder (module docstring):
    ``dicom/`` (or ``image.npz`` when ``dicom`` is False), ``labels.npz`` and ``truth.json``."""
    rendered = render(phantom, grid)
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    if dicom:
        written = set(write_dicom_series(rendered, grid, case_dir / "dicom"))
        for stale in (case_dir / "dicom").glob("[0-9][0-9][0-9][0-9].dcm"):
            if stale not in written:                      # a slice of an earlier, longer rendering
                stale.unlink()
    else:
        _write_npz(case_dir / "image.npz", hu=rendered.hu, spacing_mm=np.asarray(grid.spacing_mm),
                   origin_mm=np.asarray(grid.origin_mm))
    _write_npz(case_dir / "labels.npz", organs=rendered.organs, lesions=rendered.lesions, vertebrae=rendered.vertebrae)
    truth = {
        "format": "pacs-ai-node labelled case", "format_version": 1,
        **rendered.truth,
        "label_names": {str(k): v for k, v in ORGAN_LABELS.items()},
        "level_names": {str(k): v for k, v in LEVELS.items()},
        "lesion_types": {site: list(types) for site, types in LESION_TYPES.items()},
        "grid": grid.to_dict(),
        "phantom": phantom.to_dict(),
    }
    def write_truth(tmp: Path) -> None:
        tmp.write_text(json.dumps(truth, indent=1) + "\n")

    _write_atomic(case_dir / "truth.json", write_truth)
    return case_dir
