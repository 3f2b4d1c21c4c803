"""Secondary Capture key images of lesions on real CT, checked by dciodvfy and pydicom.

The abdomen test series gets two synthetic lesions painted in (a hypodense
liver lesion and a solid nodule in the right lung base) with matching lesion
findings. The PNGs of the key images are written to tests/output/keyimage-*.png
for a person to look at. That Orthanc stores them: tests/integration/test_results_in_pacs.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.clinical.findings import CodeSpec, LesionFacts, SegmentFinding
from pipelines.dicom_out.keyimages import (
    BAND_RGB,
    CONTOUR_GAP_PX,
    CONTOUR_RGB,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    WARNING_RGB,
    KeyImageSeries,
    apply_window,
    build_key_images,
    key_image_pixels,
    key_slice,
    orientation_letters,
    save_png,
)
from pipelines.dicom_out.uids import derive_uid
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume, load_series
from support.data import OUTPUT, abdomen_files
from support.findings import (
    KEY_IMAGE_ALGORITHM as ALGORITHM,
)
from support.findings import (
    LIVER_CENTRE,
    LUNG_CENTRE,
    NOTICE,
    PATIENT_STUDY,
    PREFIX,
    key_image_arguments,
    key_image_findings,
    lesion_finding,
    paint_lesions,
    sphere,
)
from support.validators import dciodvfy


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    """The abdomen series with a 0 HU liver lesion and a 25 HU lung nodule painted in."""
    return paint_lesions(load_series(abdomen_files()))


@pytest.fixture(scope="module")
def findings(volume: CTVolume) -> list[SegmentFinding]:
    """The liver (an organ finding: it must get no key image), the liver lesion and the lung nodule."""
    return key_image_findings(volume)


def _build(volume: CTVolume, findings: list[SegmentFinding], **kwargs: object) -> list[pydicom.Dataset]:
    return build_key_images(volume, findings, ALGORITHM, KeyImageSeries(**key_image_arguments(**kwargs)))  # type: ignore


@pytest.fixture(scope="module")
def written(volume: CTVolume, findings: list[SegmentFinding], tmp_path_factory: pytest.TempPathFactory
            ) -> list[tuple[pydicom.Dataset, Path]]:
    """The key images, written as files (read back) and as PNGs under tests/output/."""
    folder = tmp_path_factory.mktemp("keyimages")
    OUTPUT.mkdir(exist_ok=True)
    out = []
    for ds in _build(volume, findings):
        path = folder / f"keyimage-{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        site = "liver" if ds.InstanceNumber == 1 else "lung"
        save_png(ds, OUTPUT / f"keyimage-{ds.InstanceNumber}-{site}.png")
        out.append((pydicom.dcmread(path), path))
    return out


def _picture(pixels: np.ndarray) -> tuple[slice, np.ndarray]:
    """Rows of the CT picture and its pixels: the rows without any band-coloured pixel.

    Band colour never occurs in the picture (grey, outline, black label boxes).
    """
    rows = np.flatnonzero(~(pixels == BAND_RGB).all(axis=-1).any(axis=1))
    assert len(rows) and (np.diff(rows) == 1).all(), "the picture is not one block of rows"
    band = slice(int(rows[0]), int(rows[-1]) + 1)
    return band, pixels[band]


# --------------------------------------------------------------------------- tests


def test_one_key_image_per_lesion_and_none_for_organs(written: list, findings: list[SegmentFinding],
                                                       volume: CTVolume) -> None:
    assert [int(ds.InstanceNumber) for ds, _ in written] == [1, 2]
    assert [ds.SOPInstanceUID for ds, _ in written] == [
        derive_uid(*PREFIX, "KI", f.tracking_uid) for f in findings[1:]
    ]
    assert _build(volume, findings[:1]) == []  # organs only: no key image


def test_key_images_pass_dciodvfy(written: list) -> None:
    for _ds, path in written:
        errors, warnings = dciodvfy(path)
        assert errors == [], errors
        assert warnings == [], warnings


def test_secondary_capture_attributes(written: list) -> None:
    for ds, _path in written:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
        assert ds.Modality == "OT" and ds.ConversionType == "WSD"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration) == (3, "RGB", 0)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
        assert max(ds.Rows, ds.Columns) >= 512
        # A picture, not a CT: no geometry is claimed.
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
            assert keyword not in ds
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert ds.Manufacturer == ALGORITHM.manufacturer and ds.ManufacturerModelName == ALGORITHM.model_name
        assert ds.SecondaryCaptureDeviceSoftwareVersions == ALGORITHM.software_version
        assert ds.DeviceUID == ALGORITHM.device_uid
        assert ds.ContributingEquipmentSequence[0].ManufacturerModelName == ALGORITHM.model_name
        assert ds.SeriesNumber == 903 and ds.SeriesDescription == "AI key images - research use only"
        assert (ds.ContentDate, ds.ContentTime) == ("20240506", "070809")
        assert NOTICE in ds.DerivationDescription and NOTICE in ds.ImageComments
        # pydicom's own decoder reads the same pixels.
        assert np.array_equal(ds.pixel_array, key_image_pixels(ds))


def test_patient_and_study_are_the_source_ones(written: list, volume: CTVolume) -> None:
    source = volume.first
    for ds, _ in written:
        for keyword in PATIENT_STUDY:
            assert keyword in ds, keyword
            assert ds[keyword].value == source[keyword].value, keyword
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.BodyPartExamined == source.BodyPartExamined


def test_source_image_is_the_slice_through_the_lesion_centre(written: list, volume: CTVolume,
                                                            findings: list[SegmentFinding]) -> None:
    for (ds, _), finding, centre in zip(written, findings[1:], (LIVER_CENTRE, LUNG_CENTRE)):
        assert key_slice(finding.mask) == centre[0]
        source = volume.datasets[volume.frames[centre[0]].dataset_index]
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPClassUID == source.SOPClassUID
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert f"image {source.InstanceNumber} " in ds.ImageComments


def test_outline_is_drawn_just_outside_the_lesion_on_that_slice(written: list, volume: CTVolume,
                                                              findings: list[SegmentFinding]) -> None:
    for (ds, _), finding, centre in zip(written, findings[1:], (LIVER_CENTRE, LUNG_CENTRE)):
        _, picture = _picture(key_image_pixels(ds))
        rows, cols = volume.hu.shape[1:]
        zoom = picture.shape[0] // rows
        assert picture.shape[:2] == (rows * zoom, cols * zoom) and zoom >= 4  # 101 x 122 upscaled
        mask = np.kron(finding.mask[centre[0]], np.ones((zoom, zoom), dtype=bool))
        yellow = (picture == CONTOUR_RGB).all(axis=-1)
        square = np.ones((3, 3), bool)
        near = ndimage.binary_dilation(mask, square, iterations=CONTOUR_GAP_PX)
        ring = ndimage.binary_dilation(mask, square, iterations=CONTOUR_GAP_PX + 2) & ~near
        assert yellow[ring].all(), "the outline has holes"
        assert not yellow[near].any(), "the outline covers the lesion or its edge"
        # The lesion's own pixels are the windowed CT, untouched.
        window_grey = apply_window(volume.hu[centre[0]], (1500.0, -600.0) if centre == LUNG_CENTRE else (400.0, 40.0))
        inner = ndimage.binary_erosion(mask, square, iterations=zoom)  # away from bilinear edge blending
        expected = np.kron(window_grey, np.ones((zoom, zoom), dtype=np.uint8))
        assert np.array_equal(picture[inner][:, 0], expected[inner])
        # Every other yellow pixel is the arrow pointing at the lesion, close by.
        r, c = np.nonzero(yellow & ~ring)
        cr, cc = (np.array(np.nonzero(mask)).mean(axis=1))
        assert (np.hypot(r - cr, c - cc) < 0.2 * picture.shape[1]).all()


def test_label_bands_hold_the_text(written: list) -> None:
    for ds, _ in written:
        pixels = key_image_pixels(ds)
        picture_rows, _ = _picture(pixels)
        header, footer = pixels[: picture_rows.start], pixels[picture_rows.stop:]
        assert header.shape[0] >= 60 and footer.shape[0] >= 30
        ink = lambda band: ~(band == BAND_RGB).all(axis=-1)  # noqa: E731
        assert 0.02 < ink(header).mean() < 0.5 and 0.02 < ink(footer).mean() < 0.5
        assert (header == CONTOUR_RGB).all(axis=-1).sum() > 50  # the title, in the outline's colour
        assert (footer == WARNING_RGB).all(axis=-1).sum() > 50  # "AI result: not verified"
        assert (footer == (255, 255, 255)).all(axis=-1).sum() > 50  # the research notice
    liver, lung = (ds.ImageComments for ds, _ in written)
    assert liver.startswith("Liver lesion 1: malignant; long axis 18 mm, short axis 17 mm")
    assert "score 0.93, probability of malignancy 0.81" in liver and "window W400 L40" in liver
    assert "Lung-RADS 4A" in lung and "window W1500 L-600" in lung
    assert "AI result: not verified" in liver


def test_uids_and_pixels_are_deterministic(written: list, volume: CTVolume, findings: list[SegmentFinding]) -> None:
    again = _build(volume, findings)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds, _ in written]
    assert [ds.PixelData for ds in again] == [ds.PixelData for ds, _ in written]
    other = _build(volume, findings, uid_prefix_parts=(PREFIX[0], "reference-cascade@1.0.1+0000"))
    assert not {ds.SOPInstanceUID for ds in other} & {ds.SOPInstanceUID for ds, _ in written}


def test_window_and_image_count_options(volume: CTVolume, findings: list[SegmentFinding]) -> None:
    (best,) = _build(volume, findings, max_images=1)
    assert best.SOPInstanceUID == derive_uid(*PREFIX, "KI", findings[1].tracking_uid)  # the higher score
    (lung,) = _build(volume, findings[2:], window=(400, 40))
    assert "window W400 L40" in lung.ImageComments
    (quiet,) = _build(volume, findings[2:], research_notice="")
    assert NOTICE not in quiet.ImageComments
    with pytest.raises(ValueError, match="window"):
        _build(volume, findings, window=(0, 40))
    with pytest.raises(ResultEncodingError, match="mask"):
        _build(volume, [replace(findings[1], mask=findings[1].mask[1:])])
    with pytest.raises(ResultEncodingError, match="empty"):
        _build(volume, [replace(findings[1], mask=np.zeros_like(findings[1].mask))])


def test_enhanced_ct_frame_is_referenced_and_full_size_images_are_not_upscaled(tmp_path: Path) -> None:
    """One Enhanced CT instance (2 frames, 512 x 512, rows running toward patient right, no Body Part)."""
    vol = load_series([Path(__file__).parent.parent / "data" / "single-slices" / "eCT_Supplemental.dcm"])
    mask = np.zeros(vol.shape, dtype=bool)
    mask[1] = sphere(vol, (1, 200, 300), 3.0)[1]  # a 6 mm lesion on slice 1 only
    (ds,) = _build(vol, [lesion_finding(vol, 1, "brain lesion 1", CodeSpec("52988006", "SCT", "Lesion"),
                                        CodeSpec("12738006", "SCT", "Brain"), mask,
                                        LesionFacts(site="brain", score=0.6, long_axis_mm=6.0, short_axis_mm=6.0))])
    (item,) = ds.SourceImageSequence
    assert item.ReferencedSOPInstanceUID == vol.first.SOPInstanceUID
    assert item.ReferencedFrameNumber == vol.frames[1].frame_number
    assert f"frame {vol.frames[1].frame_number} " in ds.ImageComments
    assert ds.Columns == 512 and list(ds.PatientOrientation) == ["R", "P"]
    assert ds.Laterality == "" and "BodyPartExamined" not in ds  # paired or not: unknown
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    OUTPUT.mkdir(exist_ok=True)
    save_png(path, OUTPUT / "keyimage-3-enhanced-512.png")
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    # dciodvfy asks for an absent Laterality on unpaired parts; with no Body Part, pairing is unknown.
    assert all("<Laterality>" in w for w in warnings), warnings


def test_orientation_letters() -> None:
    assert orientation_letters([1, 0, 0]) == "L" and orientation_letters([0, -1, 0]) == "A"
    assert orientation_letters([0, 0, 1]) == "H"
    assert orientation_letters([0.8, 0.0, -0.6]) == "LF"


def test_highdicom_builds_the_image_and_the_node_keeps_its_own_values(volume: CTVolume,
                                                                     findings: list[SegmentFinding]) -> None:
    """SCImage assembles the object; the node's dates, Conversion Type, oblique letters and the
    source's patient attributes, which highdicom's own checks would refuse, are kept."""
    angle = np.deg2rad(20)
    sources = [pydicom.Dataset(ds) for ds in volume.datasets]  # new element dicts: the fixture stays as it is
    for ds in sources:
        ds.PatientName, ds.PatientSex = "Anonymous", "U"  # no "^"; not M, F or O
    tilted = replace(volume, datasets=sources,
                     row_direction=np.array([np.cos(angle), np.sin(angle), 0.0]),
                     column_direction=np.array([-np.sin(angle), np.cos(angle), 0.0]))
    (ds,) = _build(tilted, findings[2:])
    assert ds.file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.9.7433.1.1"  # highdicom's
    assert ds.ContributingEquipmentSequence[0].ManufacturerModelName == ALGORITHM.model_name
    assert ds.ContributingEquipmentSequence[-1].ManufacturerModelName == "highdicom"
    assert (ds.PatientName, ds.PatientSex) == ("Anonymous", "U")
    assert list(ds.PatientOrientation) == ["LP", "PR"]
    assert ds.ConversionType == "WSD" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    for date, time in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                       ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"), ("SeriesDate", "SeriesTime")):
        assert (str(ds[date].value), str(ds[time].value)) == ("20240506", "070809"), date  # WHEN
