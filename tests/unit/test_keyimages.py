"""Secondary Capture key images of lesions on real CT, checked by dciodvfy, pydicom and Orthanc.

The abdomen test series gets two synthetic lesions painted in (a hypodense
liver lesion and a solid nodule in the right lung base) with matching lesion
findings. The PNGs of the key images are written to tests/output/keyimage-*.png
for a person to look at.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from conftest import abdomen_files, storescu
from pipelines.errors import ResultEncodingError
from pipelines.clinical.findings import AlgorithmIdentity, CodeSpec, SegmentFinding
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
from pipelines.volume.ct import CTVolume, load_series
from validators import dciodvfy

OUTPUT = Path(__file__).parent.parent / "output"
NOTICE = "For research use only. Not for use in diagnostic procedures."
MODEL_KEY = "reference-cascade@1.0.0+3fa2c1d0"
PREFIX = ("1.2.826.0.1.3680043.8.498.20618380718132701474776061857022813903", MODEL_KEY)
WHEN = datetime(2024, 5, 6, 7, 8, 9)
LESION_CATEGORY = CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")
ALGORITHM = AlgorithmIdentity(
    name="reference-cascade",
    version="1.0.0",
    family=CodeSpec("123110", "DCM", "Artificial Intelligence"),
    manufacturer="PACS-AI open-source project",
    model_name="reference-cascade",
    software_version="1.0.0+3fa2c1d0",
    device_uid=derive_uid("device", MODEL_KEY),
)
#: (slice, row, column) centres and radii (mm): inside the liver, and in the
#: posterior right lung base (checked on the images).
LIVER_CENTRE, LIVER_RADIUS_MM = (100, 46, 30), 9.5
LUNG_CENTRE, LUNG_RADIUS_MM = (109, 76, 33), 5.0
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


def _sphere(volume: CTVolume, centre: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    z, y, x = np.indices(volume.shape)
    sz, sy, sx = volume.spacing_zyx
    return ((z - centre[0]) * sz) ** 2 + ((y - centre[1]) * sy) ** 2 + ((x - centre[2]) * sx) ** 2 <= radius_mm**2


def _lesion(volume: CTVolume, number: int, label: str, type_: CodeSpec, finding_site: CodeSpec, mask: np.ndarray,
            **extra: object) -> SegmentFinding:
    count = int(mask.sum())
    return SegmentFinding(
        number=number,
        label=label,
        category=LESION_CATEGORY,
        type=type_,
        finding_site=finding_site,
        mask=mask,
        tracking_id=f"{label} (reference-cascade)",
        tracking_uid=derive_uid("tracking", volume.series_instance_uid, MODEL_KEY, label),
        volume_mm3=count * volume.voxel_volume_mm3,
        mean_hu=float(volume.hu[mask].mean()),
        voxel_count=count,
        extra={"role": "lesion", **extra},
    )


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    """The abdomen series with a 0 HU liver lesion and a 25 HU lung nodule painted in."""
    vol = load_series(abdomen_files())
    vol.hu[_sphere(vol, LIVER_CENTRE, LIVER_RADIUS_MM)] = 0.0
    vol.hu[_sphere(vol, LUNG_CENTRE, LUNG_RADIUS_MM)] = 25.0
    return vol


@pytest.fixture(scope="module")
def findings(volume: CTVolume) -> list[SegmentFinding]:
    liver_mask = _sphere(volume, LIVER_CENTRE, LIVER_RADIUS_MM)
    lung_mask = _sphere(volume, LUNG_CENTRE, LUNG_RADIUS_MM)
    # An organ finding: it must get no key image.
    organ = replace(
        _lesion(volume, 1, "Liver", CodeSpec("10200004", "SCT", "Liver"), CodeSpec("10200004", "SCT", "Liver"),
                ndimage.binary_dilation(liver_mask, iterations=3)),
        extra={"role": "liver", "median_hu": 45.0},
    )
    return [
        organ,
        _lesion(volume, 2, "liver lesion 1", CodeSpec("108369006", "SCT", "Neoplasm"),
                CodeSpec("10200004", "SCT", "Liver"), liver_mask,
                site="liver", score=0.93, long_axis_mm=18.4, short_axis_mm=17.1, type="malignant", malignancy=0.81),
        _lesion(volume, 3, "lung lesion 1", CodeSpec("27925004", "SCT", "Nodule"),
                CodeSpec("39607008", "SCT", "Lung"), lung_mask,
                site="lung", score=0.71, long_axis_mm=9.2, short_axis_mm=8.8, type="nodule", lung_rads="4A"),
    ]


def build_arguments(**kwargs: object) -> dict[str, object]:
    """The KeyImageSeries fields of these tests, with ``kwargs`` overriding them."""
    args: dict[str, object] = dict(
        series_instance_uid=derive_uid(*PREFIX, "KI", "series"),
        series_number=903,
        series_description="AI key images - research use only",
        research_notice=NOTICE,
        uid_prefix_parts=PREFIX,
        content_datetime=WHEN,
    )
    args.update(kwargs)
    return args


def _build(volume: CTVolume, findings: list[SegmentFinding], **kwargs: object) -> list[pydicom.Dataset]:
    return build_key_images(volume, findings, ALGORITHM, KeyImageSeries(**build_arguments(**kwargs)))  # type: ignore


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
    for ds, path in written:
        errors, warnings = dciodvfy(path)
        assert errors == [], errors
        assert warnings == [], warnings


def test_secondary_capture_attributes(written: list) -> None:
    for ds, path in written:
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
    mask[1] = _sphere(vol, (1, 200, 300), 3.0)[1]  # a 6 mm lesion on slice 1 only
    (ds,) = _build(vol, [_lesion(vol, 1, "brain lesion 1", CodeSpec("52988006", "SCT", "Lesion"),
                                 CodeSpec("12738006", "SCT", "Brain"), mask, site="brain", score=0.6,
                                 long_axis_mm=6.0, short_axis_mm=6.0)])
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


def test_orthanc_stores_the_key_images_in_the_source_study(written: list, orthanc, volume: CTVolume) -> None:
    result = storescu(orthanc.dicom_port, [path for _, path in written], called=orthanc.aet)
    assert result.returncode == 0, result.stderr
    stored = orthanc.get("/instances?expand")
    stored_uids = sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored)
    assert stored_uids == sorted(ds.SOPInstanceUID for ds, _ in written)
    (series,) = orthanc.series_in_study(volume.study_instance_uid)
    assert series["0020000E"]["Value"] == [written[0][0].SeriesInstanceUID]
