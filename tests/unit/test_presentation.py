"""GSPS key images ([results] key_image_type = "GSPS") on real CT, checked by dciodvfy and highdicom.

The abdomen series gets the key-image tests' two lesions painted in, into its
stored pixels as well, since a presentation state shows the original slices.
A small renderer here draws each referenced slice from the GSPS content alone
(modality and VOI LUT applied by highdicom, outline and text from the graphic
annotations) to tests/output/gsps-*.png, for a person to look at. Orthanc, ``pacs-ai-node process``
and the node delivering a GSPS: tests/integration/test_results_in_pacs.py.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.multival import MultiValue
from scipy import ndimage

from node.config import RESULT_TYPES, ConfigError, Destination, NodeConfig, load_config, result_type
from pipelines.analysis import ResultLabelling, SeriesAnalyzer
from pipelines.clinical.findings import CodeSpec, LesionFacts, SegmentFinding
from pipelines.dicom_out.keyimages import KeyImageSeries, apply_window, key_slice, label_lines
from pipelines.dicom_out.presentation import (
    CONTENT_LABEL,
    GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    LESION_RGB,
    NOTICE_LAYER,
    build_presentation_states,
    outline_polylines,
)
from pipelines.dicom_out.uids import derive_uid
from pipelines.errors import ResultEncodingError
from pipelines.model.bundle import ModelBundle
from pipelines.volume.ct import CTVolume, load_series
from support.data import OUTPUT, REPO, abdomen_files
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

SERIES_UID = derive_uid(*PREFIX, "PR", "series")
#: Long side of the rendered display, in pixels: a small viewer viewport.
DISPLAY_PX = 768
#: Smallest text height the renderer may need to fit a line in its box: legible on that viewport.
MIN_FONT_PX = 12


@pytest.fixture(scope="module")
def volume() -> CTVolume:
    """The abdomen series with a 0 HU liver lesion and a 25 HU lung nodule, in HU and in the stored pixels."""
    vol = paint_lesions(load_series(abdomen_files()))
    for k in (LIVER_CENTRE[0], LUNG_CENTRE[0]):
        ds = vol.datasets[vol.frames[k].dataset_index]
        slope, intercept = vol.rescale(k)
        ds.PixelData = np.rint((vol.hu[k] - intercept) / slope).astype(ds.pixel_array.dtype).tobytes()
    return vol


@pytest.fixture(scope="module")
def findings(volume: CTVolume) -> list[SegmentFinding]:
    """The key-image tests' liver, liver lesion and lung nodule, on this module's volume."""
    return key_image_findings(volume)


def _build(volume: CTVolume, findings: list[SegmentFinding], **kwargs: object) -> list[pydicom.Dataset]:
    args = key_image_arguments(**{"series_instance_uid": SERIES_UID,
                              "series_description": "AI key images GSPS - research use only", **kwargs})
    return build_presentation_states(volume, findings, ALGORITHM, KeyImageSeries(**args))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def written(volume: CTVolume, findings: list[SegmentFinding], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[pydicom.Dataset, Path]:
    """The GSPS written as a file and read back; its slices rendered to tests/output/gsps-*.png."""
    (gsps,) = _build(volume, findings)
    path = tmp_path_factory.mktemp("gsps") / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    OUTPUT.mkdir(exist_ok=True)
    for (uid, _frame), name in zip(_referenced(ds), ("liver", "lung")):
        render(ds, _source(volume, uid)).save(OUTPUT / f"gsps-{name}.png")
    return ds, path


# --------------------------------------------------------------------------- a renderer from the GSPS alone


def _frames(reference: pydicom.Dataset) -> list[int] | None:
    """Referenced Frame Number(s) of a reference item; None: the whole (single-frame) image."""
    value = reference.get("ReferencedFrameNumber")
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, MultiValue) else [int(value)]


def _referenced(gsps: pydicom.Dataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame) of every slice a graphic annotation is drawn on, in annotation order."""
    seen: list[tuple[str, int | None]] = []
    for annotation in gsps.GraphicAnnotationSequence:
        for item in annotation.ReferencedImageSequence:
            for frame in _frames(item) or [None]:
                if (item.ReferencedSOPInstanceUID, frame) not in seen:
                    seen.append((item.ReferencedSOPInstanceUID, frame))
    return seen


def _source(volume: CTVolume, sop_instance_uid: str) -> pydicom.Dataset:
    return next(ds for ds in volume.datasets if ds.SOPInstanceUID == sop_instance_uid)


def _applies(item: pydicom.Dataset, uid: str, frame: int | None) -> bool:
    """Whether a Referenced Image Sequence (absent: every referenced image) covers (uid, frame)."""
    if "ReferencedImageSequence" not in item:
        return True
    for ref in item.ReferencedImageSequence:
        frames = _frames(ref)
        if ref.ReferencedSOPInstanceUID == uid and (frames is None or frame in frames):
            return True
    return False


def _fitted_font(draw: ImageDraw.ImageDraw, text: str, width: float, height: float) -> ImageFont.FreeTypeFont:
    size = max(1, int(height * 0.85))
    while size > 1:
        font = ImageFont.load_default(size=size)
        if draw.textlength(text, font=font) <= width:
            return font
        size -= 1
    return ImageFont.load_default(size=1)


def displayed_grey(gsps: pydicom.Dataset, source: pydicom.Dataset, frame: int | None) -> np.ndarray:
    """The 0..255 grey values a viewer shows: stored pixels -> the GSPS's Modality LUT and VOI LUT
    (both applied by highdicom) -> identity Presentation LUT."""
    stored = source.pixel_array if frame is None else source.pixel_array[frame - 1]
    modality = hd.ModalityLUTTransformation(
        rescale_intercept=float(gsps.RescaleIntercept), rescale_slope=float(gsps.RescaleSlope),
        rescale_type=gsps.RescaleType)
    (voi,) = [v for v in gsps.SoftcopyVOILUTSequence if _applies(v, source.SOPInstanceUID, frame)]
    window = hd.VOILUTTransformation(window_center=float(voi.WindowCenter), window_width=float(voi.WindowWidth))
    assert gsps.PresentationLUTShape == "IDENTITY"
    return np.rint(window.apply(modality.apply(stored), output_range=(0.0, 255.0))).astype(np.uint8)


def render(gsps: pydicom.Dataset, source: pydicom.Dataset, frame: int | None = None,
           fonts: list[float] | None = None) -> Image.Image:
    """One referenced slice as a viewer shows it with ``gsps`` applied, from the GSPS content only.

    ``fonts`` collects the text heights used (pixels), to check legibility.
    """
    (area,) = gsps.DisplayedAreaSelectionSequence
    assert area.PresentationSizeMode == "SCALE TO FIT"
    left, top = (int(v) for v in area.DisplayedAreaTopLeftHandCorner)
    right, bottom = (int(v) for v in area.DisplayedAreaBottomRightHandCorner)
    columns, rows = right - left + 1, bottom - top + 1
    row_mm, col_mm = (float(v) for v in area.PresentationPixelSpacing)
    scale = DISPLAY_PX / max(columns * col_mm, rows * row_mm)
    sx, sy = col_mm * scale, row_mm * scale  # display pixels per image pixel
    width, height = round(columns * sx), round(rows * sy)
    grey = Image.fromarray(displayed_grey(gsps, source, frame)).resize((width, height), Image.Resampling.BILINEAR)
    canvas = grey.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    layers = {layer.GraphicLayer: layer for layer in gsps.GraphicLayerSequence}
    annotations = sorted(
        (a for a in gsps.GraphicAnnotationSequence if _applies(a, source.SOPInstanceUID, frame)),
        key=lambda a: int(layers[a.GraphicLayer].GraphicLayerOrder),
    )
    for annotation in annotations:
        rgb = hd.color.CIELabColor.from_dicom_value(
            layers[annotation.GraphicLayer].GraphicLayerRecommendedDisplayCIELabValue).to_rgb(clip=True)
        for obj in annotation.get("GraphicObjectSequence", []):
            assert obj.GraphicAnnotationUnits == "PIXEL" and obj.GraphicType == "POLYLINE"
            points = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
            draw.line([(x * sx, y * sy) for x, y in points], fill=rgb, width=2)
        for text in annotation.get("TextObjectSequence", []):
            assert text.BoundingBoxAnnotationUnits == "DISPLAY"
            x0, y0 = (float(v) for v in text.BoundingBoxTopLeftHandCorner)
            x1, y1 = (float(v) for v in text.BoundingBoxBottomRightHandCorner)
            box_w, box_h = (x1 - x0) * width, (y1 - y0) * height
            font = _fitted_font(draw, text.UnformattedTextValue, box_w, box_h)
            if fonts is not None:
                fonts.append(font.size)
            draw.text((x0 * width, y0 * height), text.UnformattedTextValue, font=font, fill=rgb,
                      stroke_width=2, stroke_fill=(0, 0, 0))
    return canvas


def _fill(polylines: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside ``polylines`` by the even-odd rule (holes are polylines too)."""
    rows, cols = np.indices(shape)
    py, px = rows + 0.5, cols + 0.5
    inside = np.zeros(shape, dtype=bool)
    for points in polylines:
        for (x1, y1), (x2, y2) in zip(points[:-1], points[1:]):
            if y1 == y2:
                continue
            crosses = ((y1 > py) != (y2 > py)) & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
            inside ^= crosses
    return inside


def _annotation(gsps: pydicom.Dataset, layer: str) -> pydicom.Dataset:
    (annotation,) = [a for a in gsps.GraphicAnnotationSequence if a.GraphicLayer == layer]
    return annotation


# --------------------------------------------------------------------------- tests


def test_one_presentation_state_for_the_lesions_and_none_without(written: tuple, volume: CTVolume,
                                                                 findings: list[SegmentFinding]) -> None:
    gsps, _ = written
    assert gsps.SOPInstanceUID == derive_uid(*PREFIX, "PR", *(f.tracking_uid for f in findings[1:]))
    assert int(gsps.InstanceNumber) == 1
    assert _build(volume, findings[:1]) == []  # organs only: no presentation state


def test_gsps_passes_dciodvfy(written: tuple) -> None:
    _, path = written
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert warnings == [], warnings


def test_presentation_state_attributes(written: tuple, volume: CTVolume) -> None:
    gsps, _ = written
    assert gsps.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert gsps.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE == "1.2.840.10008.5.1.4.1.1.11.1"
    assert gsps.Modality == "PR"
    assert gsps.ContentLabel == CONTENT_LABEL and gsps.ContentDescription == NOTICE
    assert str(gsps.ContentCreatorName) == f"{ALGORITHM.name}^"
    assert (gsps.PresentationCreationDate, gsps.PresentationCreationTime) == ("20240506", "070809")
    assert (gsps.InstanceCreationDate, gsps.SeriesDate) == ("20240506", "20240506")
    assert gsps.SeriesInstanceUID == SERIES_UID and gsps.SeriesNumber == 903
    assert gsps.SeriesDescription == "AI key images GSPS - research use only"
    assert gsps.Manufacturer == ALGORITHM.manufacturer and gsps.ManufacturerModelName == ALGORITHM.model_name
    assert gsps.DeviceUID == gsps.DeviceSerialNumber == ALGORITHM.device_uid
    equipment = gsps.ContributingEquipmentSequence[0]
    assert equipment.ManufacturerModelName == ALGORITHM.model_name
    assert equipment.DeviceSerialNumber == ALGORITHM.device_uid
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    # Same patient and study as the CT, by the Secondary Capture's rules.
    source = volume.first
    for keyword in PATIENT_STUDY:
        assert gsps[keyword].value == source[keyword].value, keyword
    assert gsps.SpecificCharacterSet == source.SpecificCharacterSet
    assert gsps.BodyPartExamined == source.BodyPartExamined
    # The whole slice, scaled to fit, with the CT's pixel spacing.
    (area,) = gsps.DisplayedAreaSelectionSequence
    assert [int(v) for v in area.DisplayedAreaBottomRightHandCorner] == [source.Columns, source.Rows]
    assert [float(v) for v in area.PresentationPixelSpacing] == [float(v) for v in source.PixelSpacing]
    assert "PresentationPixelAspectRatio" not in area


def test_references_are_the_key_slices_of_the_lesions(written: tuple, volume: CTVolume,
                                                      findings: list[SegmentFinding]) -> None:
    gsps, _ = written
    slices = [volume.datasets[volume.frames[key_slice(f.mask)].dataset_index] for f in findings[1:]]
    assert [key_slice(f.mask) for f in findings[1:]] == [LIVER_CENTRE[0], LUNG_CENTRE[0]]
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [s.SOPInstanceUID for s in slices]
    assert {i.ReferencedSOPClassUID for i in series.ReferencedImageSequence} == {pydicom.uid.CTImageStorage}
    layers = [(layer.GraphicLayer, int(layer.GraphicLayerOrder)) for layer in gsps.GraphicLayerSequence]
    assert layers == [("LESION_1", 1), ("LESION_2", 2), (NOTICE_LAYER, 3)]
    for n, (finding, source) in enumerate(zip(findings[1:], slices), start=1):
        annotation = _annotation(gsps, f"LESION_{n}")
        (ref,) = annotation.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID and "ReferencedFrameNumber" not in ref
        for obj in annotation.GraphicObjectSequence:
            assert (obj.TrackingID, obj.TrackingUID) == (finding.tracking_id, finding.tracking_uid)
    notices = [a.ReferencedImageSequence[0] for a in gsps.GraphicAnnotationSequence if a.GraphicLayer == NOTICE_LAYER]
    assert [ref.ReferencedSOPInstanceUID for ref in notices] == [s.SOPInstanceUID for s in slices]
    for layer, rgb in zip(gsps.GraphicLayerSequence[:2], LESION_RGB):
        colour = hd.color.CIELabColor.from_dicom_value(layer.GraphicLayerRecommendedDisplayCIELabValue)
        assert np.abs(np.subtract(colour.to_rgb(clip=True), rgb)).max() <= 2


def test_polylines_follow_the_lesion_outline(written: tuple, findings: list[SegmentFinding]) -> None:
    gsps, _ = written
    for n, finding in enumerate(findings[1:], start=1):
        mask = finding.mask[key_slice(finding.mask)]
        polylines = []
        for obj in _annotation(gsps, f"LESION_{n}").GraphicObjectSequence:
            assert (obj.GraphicType, obj.GraphicAnnotationUnits, obj.GraphicFilled) == ("POLYLINE", "PIXEL", "N")
            points = np.asarray(obj.GraphicData, dtype=float).reshape(-1, 2)
            assert int(obj.NumberOfGraphicPoints) == len(points) >= 5
            assert np.array_equal(points[0], points[-1]), "not closed"
            polylines.append(points)
        # Every point of the outline lies on the lesion's edge, within a pixel of both sides.
        edge = mask ^ ndimage.binary_erosion(mask)
        outside = ndimage.binary_dilation(mask) & ~mask
        inner = np.argwhere(edge) + 0.5  # pixel centres (row, column)
        outer = np.argwhere(outside) + 0.5
        for points in polylines:
            for (x1, y1), (x2, y2) in zip(points[:-1], points[1:]):
                for t in np.linspace(0, 1, 9):
                    p = np.array([y1 + t * (y2 - y1), x1 + t * (x2 - x1)])
                    assert np.hypot(*(inner - p).T).min() <= 1.0 and np.hypot(*(outer - p).T).min() <= 1.0
        # ... and it encloses exactly the lesion's pixels on that slice.
        assert np.array_equal(_fill(polylines, mask.shape), mask)


@pytest.mark.parametrize("seed", range(6))
def test_outline_polylines_enclose_any_mask_exactly(seed: int) -> None:
    """Random masks with holes, diagonal touches and pixels on the image border."""
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((23, 31)) < 0.55) if seed % 2 else rng.random((23, 31)) < 0.4
    polylines = outline_polylines(mask)
    for points in polylines:
        assert np.array_equal(points[0], points[-1])
        assert points.min() >= 0 and points[:, 0].max() <= 31 and points[:, 1].max() <= 23
        steps = np.diff(points, axis=0)
        assert ((steps[:, 0] == 0) | (steps[:, 1] == 0)).all(), "edges run along pixel sides"
    assert np.array_equal(_fill(polylines, mask.shape), mask)
    single = np.zeros((3, 3), dtype=bool)
    single[1, 1] = True
    (square,) = outline_polylines(single)
    assert square.tolist() == [[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]]  # clockwise on screen
    assert outline_polylines(np.zeros((4, 4), dtype=bool)) == []


def test_window_and_rescale_are_the_expected_ones(written: tuple, volume: CTVolume) -> None:
    gsps, _ = written
    # The Modality LUT is the source's rescale, in HU.
    slope, intercept = volume.rescale(LIVER_CENTRE[0])
    assert (float(gsps.RescaleSlope), float(gsps.RescaleIntercept), gsps.RescaleType) == (slope, intercept, "HU")
    expected = {LIVER_CENTRE[0]: (40.0, 400.0, "SOFT TISSUE"), LUNG_CENTRE[0]: (-600.0, 1500.0, "LUNG")}
    assert len(gsps.SoftcopyVOILUTSequence) == 2
    for k, (centre, width, name) in expected.items():
        source = volume.datasets[volume.frames[k].dataset_index]
        (voi,) = [v for v in gsps.SoftcopyVOILUTSequence if _applies(v, source.SOPInstanceUID, None)]
        assert (float(voi.WindowCenter), float(voi.WindowWidth), voi.WindowCenterWidthExplanation) == (
            centre, width, name)
        # highdicom, applying the GSPS's LUTs to the stored pixels, shows what the SC path would (W/L in HU).
        shown = displayed_grey(gsps, source, None).astype(int)
        assert np.abs(shown - apply_window(volume.hu[k], (width, centre))).max() <= 1


def test_text_has_the_labels_and_the_notices(written: tuple, findings: list[SegmentFinding]) -> None:
    gsps, _ = written
    for n, finding in enumerate(findings[1:], start=1):
        texts = [t.UnformattedTextValue for t in _annotation(gsps, f"LESION_{n}").TextObjectSequence]
        assert texts == label_lines(finding)
    liver = [t.UnformattedTextValue for t in _annotation(gsps, "LESION_1").TextObjectSequence]
    assert liver == ["Liver lesion 1: malignant", "long axis 18 mm, short axis 17 mm, volume 4.0 mL",
                     "score 0.93, probability of malignancy 0.81"]
    for annotation in gsps.GraphicAnnotationSequence:
        if annotation.GraphicLayer != NOTICE_LAYER:
            continue
        lines = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
        assert lines[0] == f"AI result: not verified - {ALGORITHM.name} {ALGORITHM.version}"
        assert " ".join(lines[1:]) == NOTICE
    # Every box is on the display; the labels (top) and the notices (bottom) do not overlap.
    for annotation in gsps.GraphicAnnotationSequence:
        for t in annotation.TextObjectSequence:
            (x0, y0), (x1, y1) = t.BoundingBoxTopLeftHandCorner, t.BoundingBoxBottomRightHandCorner
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    label_bottom = max(t.BoundingBoxBottomRightHandCorner[1] for n in (1, 2)
                       for t in _annotation(gsps, f"LESION_{n}").TextObjectSequence)
    notice_top = min(t.BoundingBoxTopLeftHandCorner[1] for a in gsps.GraphicAnnotationSequence
                     if a.GraphicLayer == NOTICE_LAYER for t in a.TextObjectSequence)
    assert label_bottom < 0.3 and notice_top > 0.8


def test_rendered_slices_show_window_outline_and_legible_text(written: tuple, volume: CTVolume) -> None:
    gsps, _ = written
    for n, ((uid, frame), name) in enumerate(zip(_referenced(gsps), ("liver", "lung")), start=1):
        fonts: list[float] = []
        pixels = np.asarray(render(gsps, _source(volume, uid), frame, fonts))
        assert (OUTPUT / f"gsps-{name}.png").is_file()
        assert max(pixels.shape[:2]) == DISPLAY_PX
        assert min(fonts) >= MIN_FONT_PX, f"text squeezed to {min(fonts)} px on a {DISPLAY_PX} px display"
        # The lesion's outline and label, in its layer's colour; the other lesion's are not on this slice.
        colours = [hd.color.CIELabColor.from_dicom_value(layer.GraphicLayerRecommendedDisplayCIELabValue
                                                         ).to_rgb(clip=True) for layer in gsps.GraphicLayerSequence]
        drawn = [(pixels == c).all(axis=-1).sum() for c in colours]
        assert drawn[n - 1] > 200 and drawn[2 - n] == 0 and drawn[2] > 200, drawn


def test_uids_are_deterministic(written: tuple, volume: CTVolume, findings: list[SegmentFinding]) -> None:
    gsps, _ = written
    (again,) = _build(volume, findings)
    assert again.SOPInstanceUID == gsps.SOPInstanceUID and again.SeriesInstanceUID == gsps.SeriesInstanceUID
    (third,) = _build(volume, findings)
    for keyword in ("GraphicAnnotationSequence", "GraphicLayerSequence", "SoftcopyVOILUTSequence"):
        assert again[keyword] == third[keyword], keyword
    (other,) = _build(volume, findings, uid_prefix_parts=(PREFIX[0], "reference-cascade@1.0.1+0000"))
    assert other.SOPInstanceUID != gsps.SOPInstanceUID
    (one,) = _build(volume, findings[2:])
    assert one.SOPInstanceUID not in (gsps.SOPInstanceUID, other.SOPInstanceUID)


def test_window_notice_and_count_options(volume: CTVolume, findings: list[SegmentFinding]) -> None:
    (best,) = _build(volume, findings, max_images=1)
    assert [a.GraphicLayer for a in best.GraphicAnnotationSequence] == ["LESION_1", NOTICE_LAYER]
    assert best.SOPInstanceUID == derive_uid(*PREFIX, "PR", findings[1].tracking_uid)  # the higher score
    (fixed,) = _build(volume, findings, window=(400, 40))
    assert {(float(v.WindowWidth), float(v.WindowCenter)) for v in fixed.SoftcopyVOILUTSequence} == {(400.0, 40.0)}
    (quiet,) = _build(volume, findings, research_notice="")
    assert quiet.ContentDescription in ("", None)
    (notice,) = [a for a in quiet.GraphicAnnotationSequence if a.GraphicLayer == NOTICE_LAYER][:1]
    assert [t.UnformattedTextValue for t in notice.TextObjectSequence] == [
        f"AI result: not verified - {ALGORITHM.name} {ALGORITHM.version}"]
    with pytest.raises(ValueError, match="window"):
        _build(volume, findings, window=(0, 40))
    with pytest.raises(ValueError, match="series_description"):
        _build(volume, findings, series_description="x" * 65)
    with pytest.raises(ResultEncodingError, match="mask"):
        _build(volume, [replace(findings[1], mask=findings[1].mask[1:])])
    with pytest.raises(ResultEncodingError, match="empty"):
        _build(volume, [replace(findings[1], mask=np.zeros_like(findings[1].mask))])


def test_two_lesions_on_one_slice_share_the_reference_and_the_window(volume: CTVolume,
                                                                      findings: list[SegmentFinding]) -> None:
    """A second (lung-windowed) lesion on the liver lesion's slice: one image, one window (the first's)."""
    k, row, col = LIVER_CENTRE
    near = np.zeros(volume.shape, dtype=bool)
    near[k, row - 2:row + 3, col + 30:col + 35] = True
    second = lesion_finding(volume, 3, "lung lesion 1", CodeSpec("27925004", "SCT", "Nodule"),
                            CodeSpec("39607008", "SCT", "Lung"), near,
                            LesionFacts(site="lung", score=0.5, long_axis_mm=15.0))
    (gsps,) = _build(volume, [findings[1], second])
    (series,) = gsps.ReferencedSeriesSequence
    assert len(series.ReferencedImageSequence) == 1
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)
    first, other = (_annotation(gsps, f"LESION_{n}") for n in (1, 2))
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        other.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    # The second label block starts below the first.
    assert other.TextObjectSequence[0].BoundingBoxTopLeftHandCorner[1] > \
        first.TextObjectSequence[-1].BoundingBoxBottomRightHandCorner[1]
    np.testing.assert_array_equal(_fill([np.asarray(o.GraphicData).reshape(-1, 2) for o in other.GraphicObjectSequence],
                                        near[k].shape), near[k])


def test_slices_with_different_rescales_get_one_presentation_state_each(volume: CTVolume,
                                                                         findings: list[SegmentFinding]) -> None:
    """A presentation state has one Modality LUT: a slice stored with another intercept gets its own."""
    datasets = list(volume.datasets)
    index = volume.frames[LUNG_CENTRE[0]].dataset_index
    datasets[index] = lung = copy.deepcopy(datasets[index])  # the module's volume stays as it is
    lung.RescaleIntercept = float(lung.get("RescaleIntercept", 0)) - 1024
    shifted = replace(volume, datasets=datasets)
    liver_state, lung_state = _build(shifted, findings)
    assert (int(liver_state.InstanceNumber), int(lung_state.InstanceNumber)) == (1, 2)
    assert float(lung_state.RescaleIntercept) == float(liver_state.RescaleIntercept) - 1024
    assert lung_state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        lung.SOPInstanceUID
    assert lung_state.SOPInstanceUID == derive_uid(*PREFIX, "PR", findings[2].tracking_uid)
    assert [(layer.GraphicLayer, int(layer.GraphicLayerOrder)) for layer in lung_state.GraphicLayerSequence] == [
        ("LESION_2", 2), (NOTICE_LAYER, 3)]  # the lesion keeps its number and colour
    assert liver_state.SeriesInstanceUID == lung_state.SeriesInstanceUID


def test_enhanced_ct_frame_is_referenced(tmp_path: Path) -> None:
    """One Enhanced CT instance (2 frames, rescale in the shared functional groups, no Body Part)."""
    vol = load_series([Path(__file__).parent.parent / "data" / "single-slices" / "eCT_Supplemental.dcm"])
    mask = np.zeros(vol.shape, dtype=bool)
    mask[1] = sphere(vol, (1, 200, 300), 6.0)[1]
    finding = lesion_finding(vol, 1, "brain lesion 1", CodeSpec("52988006", "SCT", "Lesion"),
                             CodeSpec("12738006", "SCT", "Brain"), mask,
                             LesionFacts(site="brain", score=0.6, long_axis_mm=12.0, short_axis_mm=12.0))
    (gsps,) = _build(vol, [finding])
    frame = vol.frames[1].frame_number
    (ref,) = _annotation(gsps, "LESION_1").ReferencedImageSequence
    assert ref.ReferencedSOPInstanceUID == vol.first.SOPInstanceUID and ref.ReferencedFrameNumber == frame
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert voi.ReferencedImageSequence[0].ReferencedFrameNumber == frame
    assert (float(gsps.RescaleSlope), float(gsps.RescaleIntercept)) == vol.rescale(1) == (1.0, -1024.0)
    assert gsps.Laterality == "" and "BodyPartExamined" not in gsps
    path = tmp_path / "enhanced.dcm"
    gsps.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    # As for the SC: dciodvfy asks for an absent Laterality on unpaired parts; with no Body Part, pairing is unknown.
    assert all("<Laterality>" in w for w in warnings), warnings
    read = pydicom.dcmread(path)
    OUTPUT.mkdir(exist_ok=True)
    render(read, vol.first, frame).save(OUTPUT / "gsps-enhanced.png")
    shown = displayed_grey(read, vol.first, frame).astype(int)
    assert np.abs(shown - apply_window(vol.hu[1], (400.0, 40.0))).max() <= 1


# --------------------------------------------------------------------------- configuration and delivery


def test_key_image_type_option(tmp_path: Path) -> None:
    assert NodeConfig().key_image_type == "SC"
    config = tmp_path / "node.toml"
    for written_value, read in (("GSPS", "GSPS"), ("gsps", "GSPS"), ("none", "NONE"), ("SC", "SC")):
        config.write_text(f'[results]\nkey_image_type = "{written_value}"\n')
        assert load_config(config).key_image_type == read
    for bad in ('"PR"', "true"):
        config.write_text(f"[results]\nkey_image_type = {bad}\n")
        with pytest.raises(ConfigError, match="key_image_type"):
            load_config(config)
    with pytest.raises(ValueError, match="key_image_type"):
        ResultLabelling(key_image_type="KO")
    from node.service import Node

    assert "key_image_type" in Node.RELOADABLE  # SIGHUP applies it, as seg_type


def test_pr_is_a_result_type_destinations_take_by_default() -> None:
    assert "PR" in RESULT_TYPES
    assert result_type("PR", GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE) == "PR"
    default = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    assert default.wants("PR", GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE)
    narrow = Destination(ae_title="PACS", host="127.0.0.1", port=104, results=("SEG", "SR"))
    assert not narrow.wants("PR", GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE)


def test_analyzer_makes_the_configured_key_images(volume: CTVolume, findings: list[SegmentFinding]) -> None:
    bundle = ModelBundle(REPO / "onnx_models" / "reference-cascade")
    made = {}
    for kind in ("SC", "GSPS", "NONE"):
        analyzer = SeriesAnalyzer([bundle], ResultLabelling(key_image_type=kind))
        made[kind] = analyzer.key_images(volume, findings, bundle=bundle, version=2)
    assert made["NONE"] == []
    assert [ds.Modality for ds in made["SC"]] == ["OT", "OT"]
    (gsps,) = made["GSPS"]
    assert gsps.Modality == "PR"
    # The same series number and description pattern; the series UIDs differ (one modality per series).
    assert {int(ds.SeriesNumber) for ds in made["SC"]} == {int(gsps.SeriesNumber)} == {9903}
    assert gsps.SeriesDescription.startswith("AI reference-cascade key images GSPS v2 - For research")
    parts = (volume.series_instance_uid, bundle.key, "v2")
    assert gsps.SeriesInstanceUID == derive_uid(*parts, "PR", "series")
    assert made["SC"][0].SeriesInstanceUID == derive_uid(*parts, "KI", "series")
