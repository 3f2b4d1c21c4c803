"""Lesion findings -> Secondary Capture key images with the finding drawn and labelled.

Many PACS viewers display neither a SEG nor a TID 1500 SR, so AI vendors also
send a plain picture that every viewer shows (IHE AI Results; REFERENCE.md).
One key image is made per lesion finding (``finding.lesion`` set):

- the source slice with the largest cross-section of the lesion (the axial
  plane its long axis is measured in; ties go to the slice nearest the
  lesion's centroid), windowed for its site (lung W1500/L-600, otherwise soft
  tissue W400/L40), upscaled so that its long side has at least 512 pixels;
- the outline of the lesion on that slice, drawn just outside the mask so the
  lesion's own pixels stay visible;
- a header band with the finding, its size and scores and the source slice,
  and a footer band with "AI result: not verified" and the research notice.
  The text is on bands above and below the picture, never over the anatomy.

Organ-level findings get no key image: their answers (volumes, attenuation,
"not evaluable") are numbers in the SR and point at no single place in the
image, and a series without lesions gets no key image at all (an empty
picture would only add noise to the PACS study).

The object is a plain Secondary Capture Image (PS3.3 A.8.1), single frame,
8-bit RGB, photometric RGB, planar configuration 0: the most widely displayed
colour image IOD, assembled by highdicom's ``SCImage`` like the SEG and SR are
by highdicom's classes. It claims no patient geometry (no Image Position /
Orientation, no Pixel Spacing), since its pixels are a rendered picture with
bands and burned-in text, not a resampled CT; Patient Orientation (a relative
direction, which the rendering keeps) names the row and column directions.

A site may choose a Grayscale Softcopy Presentation State over the original
slices instead (:mod:`pipelines.dicom_out.presentation`, ``[results] key_image_type``);
the lesion selection, key slice, windows, labels and identity rules here are
shared with it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage

from pipelines.clinical.findings import AlgorithmIdentity, SegmentFinding
from pipelines.dicom_out.segmentation import (
    algorithm_equipment,
    check_algorithm,
    check_long_string,
    fit_long_string,
    set_device_uid,
    source_character_set,
)
from pipelines.dicom_out.uids import derive_uid
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume

LOG = logging.getLogger(__name__)

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

#: Modality (0008,0060) of the key images: "OT" (other), as Secondary Captures
#: usually carry. Not "CT": PACS routing rules select CT series (the node's own
#: Orthanc rule sends every stable CT series to the node), and a key image
#: labelled CT would be routed back to the node and refused there. highdicom's
#: ``SCImage`` always writes it; it is set again below so that this stays the rule.
KEY_IMAGE_MODALITY = "OT"

#: Conversion Type (0008,0064), PS3.3 C.8.6.1.1.1: WSD "Workstation", an image
#: rendered by software from other DICOM images.
CONVERSION_TYPE = "WSD"

#: Smallest long side of the picture in pixels: small matrices (e.g. 3 mm
#: research data, 101 x 122) are upscaled so the burned-in text stays legible.
MIN_LONG_SIDE_PX = 512
#: Smallest width of the whole key image, so the research notice fits on one line.
MIN_WIDTH_PX = 512

#: Lesion outline (sRGB): pure yellow never occurs in a windowed grey image
#: and stands out on both lung and soft-tissue windows.
CONTOUR_RGB = (255, 255, 0)
#: Pixels left between the lesion's edge and its outline.
CONTOUR_GAP_PX = 1
#: Background of the text bands: dark blue-grey, so the bands are not mistaken for image air.
BAND_RGB = (18, 24, 36)
TEXT_RGB = (255, 255, 255)
DIM_TEXT_RGB = (180, 186, 196)
WARNING_RGB = (255, 170, 60)

AI_RESULT_LINE = "AI result: not verified"


class DisplayWindow(NamedTuple):
    """A linear VOI window in HU, written width first as radiologists say it ("W400/L40")."""

    width: float
    level: float


SOFT_TISSUE_WINDOW = DisplayWindow(400.0, 40.0)
LUNG_WINDOW = DisplayWindow(1500.0, -600.0)

#: Window per lesion site (``finding.lesion.site``); other sites get :data:`SOFT_TISSUE_WINDOW`.
SITE_WINDOWS: dict[str, DisplayWindow] = {"lung": LUNG_WINDOW}


def _check_window(window: Sequence[float], name: str) -> DisplayWindow:
    try:
        width, level = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be (width, level) in HU, got {window!r}") from exc
    if not (math.isfinite(width) and math.isfinite(level)) or width <= 0:
        raise ValueError(f"{name} must have a finite width > 0 and a finite level, got {window!r}")
    return DisplayWindow(width, level)


def window_for(finding: SegmentFinding, window: Sequence[float] | None = None) -> DisplayWindow:
    """The display window of ``finding``: ``window`` if given, else by site."""
    if window is not None:
        return _check_window(window, "window")
    site = finding.lesion.site if finding.lesion is not None else ""
    return SITE_WINDOWS.get(site.lower(), SOFT_TISSUE_WINDOW)


def apply_window(hu: np.ndarray, window: DisplayWindow) -> np.ndarray:
    """HU -> 0..255 with the linear VOI function of PS3.3 C.11.2.1.2.1."""
    width, level = window
    if width <= 1:
        return np.where(hu <= level - 0.5, 0, 255).astype(np.uint8)
    scaled = ((np.asarray(hu, dtype=np.float64) - (level - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def key_slice(mask: np.ndarray) -> int:
    """Index of the slice with the largest cross-section of ``mask`` (z, y, x).

    Ties go to the slice nearest the mask's centroid, so a sphere gives its
    central slice. Raises ``ValueError`` for an empty mask.
    """
    areas = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        raise ValueError("the mask is empty: no slice shows it")
    centroid = float(np.dot(np.arange(len(areas)), areas) / areas.sum())
    best = np.flatnonzero(areas == areas.max())
    return int(best[np.argmin(np.abs(best - centroid))])


_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def orientation_letters(direction: Sequence[float] | np.ndarray, *, min_component: float = 0.1) -> str:
    """Patient direction of a unit vector in LPS as letters (PS3.3 C.7.6.1.1.1).

    ``[1, 0, 0]`` is ``"L"``; an oblique direction gets one letter per axis
    with a component of at least ``min_component``, largest first.
    """
    d = np.asarray(direction, dtype=float)
    order = np.argsort(-np.abs(d), kind="stable")
    return "".join(_LPS_LETTERS[i][int(d[i] > 0)] for i in order if abs(d[i]) >= min_component)


# --------------------------------------------------------------------------- rendering


#: A font Pillow can draw with: its bundled scalable one, or the bitmap fallback.
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    """Pillow's bundled scalable font: the same pixels on every machine, no system fonts needed.

    It has no em dash or superscripts, so the labels are plain ASCII.
    """
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_height(font: _Font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom)


def _wrap(text: str, font: _Font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass(frozen=True)
class TextLine:
    """One line of burned-in text: what, how big (relative to the base size) and in which colour."""

    text: str
    rgb: tuple[int, int, int] = TEXT_RGB
    scale: float = 1.0


@dataclass
class RenderedKeyImage:
    """The RGB pixels of a key image and where the source slice lies in them.

    Source pixel (r, c) covers rows ``image_top + r * zoom[0]`` ... and
    columns ``image_left + c * zoom[1]`` ... of ``pixels`` (rounded as
    Pillow's resize does); ``zoom`` is output pixels per source pixel.
    """

    pixels: np.ndarray
    image_top: int
    image_left: int
    image_shape: tuple[int, int]
    zoom: tuple[float, float]
    header_height: int
    footer_height: int


def _display_size(shape: tuple[int, int], pixel_spacing: tuple[float, float]) -> tuple[int, int]:
    """(rows, columns) of the picture: square display pixels, long side >= MIN_LONG_SIDE_PX.

    The finer of the two spacings sets the display pixel size (so the
    anatomy keeps its proportions); for square source pixels the zoom is an
    integer, and every source pixel has the same size on screen.
    """
    rows, cols = shape
    dr, dc = pixel_spacing
    fine = min(dr, dc)
    height, width = rows * dr / fine, cols * dc / fine
    zoom = max(1, math.ceil(MIN_LONG_SIDE_PX / max(height, width)))
    return max(1, round(height * zoom)), max(1, round(width * zoom))


def render_key_image(
    hu_slice: np.ndarray,
    mask_slice: np.ndarray,
    window: DisplayWindow,
    header: Sequence[TextLine],
    footer: Sequence[TextLine],
    *,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    row_direction: Sequence[float] | np.ndarray | None = None,
    column_direction: Sequence[float] | np.ndarray | None = None,
) -> RenderedKeyImage:
    """Window ``hu_slice``, outline ``mask_slice`` and add the text bands.

    ``row_direction`` / ``column_direction`` (LPS unit vectors of the source
    rows and columns) add orientation letters at the picture's edges;
    ``pixel_spacing`` (row, column spacing in mm) keeps the aspect ratio and
    sets the scale bar.
    """
    hu_slice = np.asarray(hu_slice)
    mask_slice = np.asarray(mask_slice, dtype=bool)
    if hu_slice.ndim != 2 or mask_slice.shape != hu_slice.shape:
        raise ValueError(f"need a 2-D slice and a mask of the same shape, got {hu_slice.shape} and {mask_slice.shape}")
    out_h, out_w = _display_size(hu_slice.shape, pixel_spacing)
    grey = Image.fromarray(apply_window(hu_slice, window)).resize((out_w, out_h), Image.Resampling.BILINEAR)
    # NEAREST: the outline follows the voxels the model found, not a smoothed guess.
    mask_up = np.asarray(
        Image.fromarray(mask_slice.astype(np.uint8) * 255).resize((out_w, out_h), Image.Resampling.NEAREST)
    ) > 127

    width = max(out_w, MIN_WIDTH_PX)
    width += width % 2  # even sizes: no odd-length pixel data to pad
    base = max(14, round(width / 34))
    margin = max(6, base // 2)
    gap = max(3, base // 4)

    def layout(lines: Sequence[TextLine]) -> tuple[list[tuple[str, tuple[int, int, int], _Font]], int]:
        placed = []
        height = margin
        for line in lines:
            font = _font(round(base * line.scale))
            for part in _wrap(line.text, font, width - 2 * margin):
                placed.append((part, line.rgb, font))
                height += _text_height(font) + gap
        return placed, height - gap + margin if placed else 0

    header_lines, header_h = layout(header)
    footer_lines, footer_h = layout(footer)
    height = header_h + out_h + footer_h
    height += height % 2

    canvas = Image.new("RGB", (width, height), BAND_RGB)
    left = (width - out_w) // 2
    picture = Image.new("RGB", (width, out_h), (0, 0, 0))
    picture.paste(grey.convert("RGB"), (left, 0))
    canvas.paste(picture, (0, header_h))

    # The outline runs 1 px outside the mask, about 2 px wide (more on large images):
    # the lesion's own margin stays visible, which matters for small nodules.
    thickness = max(2, round(width / 300))
    square = np.ones((3, 3), bool)
    ring = ndimage.binary_dilation(mask_up, structure=square, iterations=CONTOUR_GAP_PX + thickness)
    ring &= ~ndimage.binary_dilation(mask_up, structure=square, iterations=CONTOUR_GAP_PX)
    pixels = np.asarray(canvas).copy()
    region = pixels[header_h:header_h + out_h, left:left + out_w]
    region[ring] = CONTOUR_RGB
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    if ring.any():
        _draw_pointer(draw, ring, (header_h, left, out_h, out_w), thickness)

    small = _font(base)
    if row_direction is not None and column_direction is not None:
        _draw_orientation(draw, small, (header_h, left, out_h, out_w), row_direction, column_direction, margin)
    zoom = (out_h / hu_slice.shape[0], out_w / hu_slice.shape[1])
    _draw_scale_bar(draw, small, (header_h, left, out_h, out_w), pixel_spacing[1] / zoom[1], margin)

    y = margin
    for text, rgb, font in header_lines:
        draw.text((margin, y), text, font=font, fill=rgb)
        y += _text_height(font) + gap
    y = header_h + out_h + margin
    for text, rgb, font in footer_lines:
        draw.text((margin, y), text, font=font, fill=rgb)
        y += _text_height(font) + gap

    return RenderedKeyImage(
        pixels=np.asarray(canvas, dtype=np.uint8),
        image_top=header_h,
        image_left=left,
        image_shape=(out_h, out_w),
        zoom=zoom,
        header_height=header_h,
        footer_height=height - header_h - out_h,
    )


#: Outlines smaller than this fraction of the picture's width also get an arrow,
#: so that a 5 mm nodule on a 512 x 512 image is found at a glance.
POINTER_BELOW_FRACTION = 0.12


def _draw_pointer(draw: ImageDraw.ImageDraw, ring: np.ndarray, box: tuple[int, int, int, int], thickness: int) -> None:
    """An arrow pointing at a small outline from a little outside it (never over the lesion).

    It comes from the upper left, or from the side with room for it near an edge.
    """
    top, left, h, w = box
    rows, cols = np.nonzero(ring)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    if max(r1 - r0, c1 - c0) >= POINTER_BELOW_FRACTION * w:
        return
    length = max(30, round(0.08 * w))
    gap = 3 * thickness
    centre_r, centre_c = (r0 + r1) / 2, (c0 + c1) / 2
    radius = max(r1 - r0, c1 - c0) / 2 * math.sqrt(2)
    dr = -1.0 if centre_r - radius - gap - length > 0 else 1.0
    dc = -1.0 if centre_c - radius - gap - length > 0 else 1.0
    unit = (dr / math.sqrt(2), dc / math.sqrt(2))
    tip = (centre_r + unit[0] * (radius + gap), centre_c + unit[1] * (radius + gap))
    tail = (tip[0] + unit[0] * length, tip[1] + unit[1] * length)
    head = max(9.0, length / 3.5)
    # The shaft stops at the head's base so its end does not poke through the point.
    base = (tip[0] + unit[0] * head * 0.8, tip[1] + unit[1] * head * 0.8)
    draw.line((left + tail[1], top + tail[0], left + base[1], top + base[0]), fill=CONTOUR_RGB, width=thickness)
    barbs = []
    for angle in (math.pi / 8, -math.pi / 8):  # the head's back corners, either side of the shaft
        cos, sin = math.cos(angle), math.sin(angle)
        br, bc = unit[0] * cos - unit[1] * sin, unit[0] * sin + unit[1] * cos
        barbs.append((left + tip[1] + bc * head, top + tip[0] + br * head))
    draw.polygon([(left + tip[1], top + tip[0]), *barbs], fill=CONTOUR_RGB)


def _boxed_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: _Font,
                anchor: str) -> None:
    """Text on a small dark box, legible over any anatomy."""
    box = draw.textbbox(xy, text, font=font, anchor=anchor)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text(xy, text, font=font, fill=TEXT_RGB, anchor=anchor)


def _draw_orientation(draw: ImageDraw.ImageDraw, font: _Font, box: tuple[int, int, int, int],
                      row_direction: Sequence[float] | np.ndarray, column_direction: Sequence[float] | np.ndarray,
                      margin: int) -> None:
    """Patient direction letters at the middle of each edge of the picture (e.g. R left, A top)."""
    top, left, h, w = box
    row = np.asarray(row_direction, dtype=float)
    col = np.asarray(column_direction, dtype=float)
    inset = margin // 2 + 3
    for direction, xy, anchor in (
        (-row, (left + inset, top + h / 2), "lm"),
        (row, (left + w - inset, top + h / 2), "rm"),
        (-col, (left + w / 2, top + inset), "mt"),
        (col, (left + w / 2, top + h - inset), "mb"),
    ):
        letters = orientation_letters(direction)
        if letters:
            _boxed_text(draw, xy, letters, font, anchor)


def _draw_scale_bar(draw: ImageDraw.ImageDraw, font: _Font, box: tuple[int, int, int, int],
                    mm_per_px: float, margin: int) -> None:
    """A horizontal scale bar (5 to 100 mm, at most a quarter of the picture) in its bottom-right corner."""
    top, left, h, w = box
    choices = [mm for mm in (5, 10, 20, 50, 100) if mm / mm_per_px <= w / 4]
    if not choices or not math.isfinite(mm_per_px) or mm_per_px <= 0:
        return
    mm = choices[-1]
    length = round(mm / mm_per_px)
    x1 = left + w - margin - 3
    x0 = x1 - length
    y = top + h - margin - 3
    label_box = draw.textbbox(((x0 + x1) / 2, y - 5), f"{mm} mm", font=font, anchor="mb")
    draw.rectangle((x0 - 4, label_box[1] - 3, x1 + 4, y + 5), fill=(0, 0, 0))
    draw.line((x0, y, x1, y), fill=TEXT_RGB, width=2)
    for x in (x0, x1):
        draw.line((x, y - 4, x, y + 3), fill=TEXT_RGB, width=2)
    draw.text(((x0 + x1) / 2, y - 5), f"{mm} mm", font=font, fill=TEXT_RGB, anchor="mb")


# --------------------------------------------------------------------------- labels


def _number(value: float, name: str, finding: SegmentFinding) -> float:
    """``value`` as a finite float; a value that is not one names the lesion and the field."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ResultEncodingError(
            f"lesion {finding.number} ({finding.label!r}): {name} is not a number: {value!r}"
        ) from exc
    if not math.isfinite(number):
        raise ResultEncodingError(f"lesion {finding.number} ({finding.label!r}): {name} is {value!r}")
    return number


def finding_title(finding: SegmentFinding) -> str:
    """``"Pancreas lesion 1: malignant"``: the label, and the lesion type when the typing stage gave one."""
    label = " ".join(finding.label.split())
    title = label[:1].upper() + label[1:]
    if finding.lesion is not None and finding.lesion.type:
        title += f": {finding.lesion.type}"
    return title


def finding_details(finding: SegmentFinding) -> list[str]:
    """Size and score lines of a lesion, e.g. ``["long axis 14 mm, short axis 9 mm", "score 0.93"]``."""
    lesion = finding.lesion
    size = []
    if lesion is not None and lesion.long_axis_mm is not None:
        size.append(f"long axis {_number(lesion.long_axis_mm, 'long_axis_mm', finding):.0f} mm")
    if lesion is not None and lesion.short_axis_mm is not None:
        size.append(f"short axis {_number(lesion.short_axis_mm, 'short_axis_mm', finding):.0f} mm")
    volume_mm3 = _number(finding.volume_mm3, "volume_mm3", finding)
    # mm3 below 1 mL, as nodule volume thresholds are given (Lung-RADS, Fleischner).
    size.append(f"volume {volume_mm3:.0f} mm3" if volume_mm3 < 1000 else f"volume {volume_mm3 / 1000:.1f} mL")
    scores = []
    if lesion is not None:
        scores.append(f"score {_number(lesion.score, 'score', finding):.2f}")
    if lesion is not None and lesion.malignancy is not None:
        scores.append(f"probability of malignancy {_number(lesion.malignancy, 'malignancy', finding):.2f}")
    if lesion is not None and lesion.lung_rads:
        scores.append(f"Lung-RADS {lesion.lung_rads}")
    return [", ".join(size)] + ([", ".join(scores)] if scores else [])


# --------------------------------------------------------------------------- DICOM

#: Patient and study attributes copied from the source (PS3.3 C.7.1.1, C.7.2.1,
#: C.7.2.2). Type 2 ones are written empty when the source lacks them.
_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
_PATIENT_STUDY_TYPE3 = (
    "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyDescription", "IssuerOfAccessionNumberSequence",
)


def select_lesions(volume: CTVolume, findings: Sequence[SegmentFinding], max_images: int) -> list[SegmentFinding]:
    """The lesion findings (``finding.lesion`` set) that get a key image, in finding-number order.

    With more than ``max_images`` lesions the highest-scoring ones are kept
    (ties: the lower number). Every lesion is checked first: a bool mask on
    the volume grid, not empty, with a tracking UID (the key images' UIDs
    derive from it); a bad one raises :class:`ResultEncodingError`. The
    Secondary Capture and the GSPS key images both use this selection, so
    the two options show the same lesions.
    """
    lesions = [f for f in findings if f.lesion is not None]
    for f in lesions:
        mask = np.asarray(f.mask)
        if mask.dtype != np.bool_ or mask.shape != volume.hu.shape:
            raise ResultEncodingError(
                f"lesion {f.number} ({f.label!r}): mask is {mask.dtype} {mask.shape}, "
                f"expected bool {volume.hu.shape}"
            )
        if not mask.any():
            raise ResultEncodingError(f"lesion {f.number} ({f.label!r}) has an empty mask")
        if not isinstance(f.tracking_uid, str) or not f.tracking_uid:
            raise ResultEncodingError(f"lesion {f.number} ({f.label!r}) has no tracking UID")
    if len(lesions) > max_images:
        LOG.warning("series %s: %d lesions, key images for the %d highest-scoring only",
                    volume.series_instance_uid, len(lesions), max_images)
    chosen = sorted(lesions, key=lambda f: (-(f.lesion.score if f.lesion else 0.0), f.number))[:max_images]
    chosen.sort(key=lambda f: f.number)
    return chosen


@dataclass(frozen=True)
class KeyImageSeries:
    """Where key images go and what they show, for either builder (Secondary Capture or GSPS).

    ``window`` is (width, level) in HU for every image (default: by lesion
    site, :func:`window_for`); with more than ``max_images`` lesions the
    highest-scoring ones are shown. Instance UIDs derive from
    ``uid_prefix_parts`` and the lesions' tracking UIDs, so a re-run replaces
    the same instances. An empty ``research_notice`` leaves the notice out.
    ``content_datetime`` (default: when built) dates the objects. The
    constructor checks every field and raises naming the bad one.
    """

    series_instance_uid: str
    series_number: int
    series_description: str
    research_notice: str
    uid_prefix_parts: tuple[str, ...]
    window: tuple[float, float] | None = None
    max_images: int = 12
    content_datetime: datetime | None = None

    def __post_init__(self) -> None:
        check_long_string(self.series_description, "series_description")
        notice = self.research_notice
        if not isinstance(notice, str):
            raise TypeError(f"research_notice must be a string, got {type(notice).__name__}: {notice!r}")
        number = self.series_number
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**31:
            raise ValueError(f"series_number must be an integer from 0 to 2**31-1, got {number!r}")
        if not isinstance(self.max_images, int) or isinstance(self.max_images, bool) or self.max_images < 0:
            raise ValueError(f"max_images must be an integer >= 0, got {self.max_images!r}")
        if not isinstance(self.uid_prefix_parts, tuple) or not self.uid_prefix_parts:
            raise ValueError(f"uid_prefix_parts must be a non-empty tuple of strings, got {self.uid_prefix_parts!r}")
        derive_uid(*self.uid_prefix_parts)  # raises on an empty or non-string part
        if not isinstance(self.series_instance_uid, str) or not UID(self.series_instance_uid).is_valid:
            raise ValueError(f"series_instance_uid is not a valid UID: {self.series_instance_uid!r}")
        if self.window is not None:
            object.__setattr__(self, "window", _check_window(self.window, "window"))

    def window_of(self, finding: SegmentFinding) -> DisplayWindow:
        """The window ``finding`` is shown in: the fixed one, else by its site."""
        return window_for(finding, self.window)

    @property
    def when(self) -> datetime:
        return self.content_datetime or datetime.now()


def label_lines(finding: SegmentFinding) -> list[str]:
    """What a key image says about one lesion: its title, then its size and score lines."""
    return [finding_title(finding), *finding_details(finding)]


def notice_lines(algorithm: AlgorithmIdentity, research_notice: str) -> list[str]:
    """"AI result: not verified" naming the algorithm, then the research notice (none when empty)."""
    lines = [f"{AI_RESULT_LINE} - {algorithm.name} {algorithm.version}"]
    if research_notice.strip():
        lines.append(" ".join(research_notice.split()))
    return lines


def copy_patient_and_study(source: Dataset, ds: Dataset) -> None:
    """Study Instance UID and the patient and study attributes of ``source`` (Type 2 ones empty when absent)."""
    ds.StudyInstanceUID = source.StudyInstanceUID
    for keyword in _PATIENT_STUDY_TYPE2:
        element = source.data_element(keyword) if keyword in source else None
        setattr(ds, keyword, element.value if element is not None else "")
    for keyword in _PATIENT_STUDY_TYPE3:
        if keyword in source and source[keyword].value not in (None, ""):
            ds[keyword] = copy.deepcopy(source[keyword])


def copy_body_part(source: Dataset, ds: Dataset) -> None:
    """Body Part Examined of ``source``, or an empty Laterality (General Series, PS3.3 C.7.3.1).

    Laterality is Type 2C, needed for paired body parts: with the source's Body Part
    Examined copied it can be left out (dciodvfy checks it that way); without one,
    whether the part is paired is unknown, which an empty Laterality says.
    """
    body_part = str(source.get("BodyPartExamined", "") or "").strip()
    if body_part:
        ds.BodyPartExamined = body_part
    else:
        ds.Laterality = ""


def source_reference(volume: CTVolume, k: int) -> tuple[Dataset, Dataset]:
    """(source instance, Source Image Sequence item) of slice ``k`` (PS3.3 C.7.6.1, Image SOP Instance Reference)."""
    frame = volume.frames[k]
    source = volume.datasets[frame.dataset_index]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if volume.is_multiframe:
        item.ReferencedFrameNumber = frame.frame_number
    return source, item


def _source_text(volume: CTVolume, source: Dataset, k: int, window: DisplayWindow) -> str:
    where = f"CT series {source.get('SeriesNumber', '?')}, image {source.get('InstanceNumber', '?')}"
    if volume.is_multiframe:
        where += f" frame {volume.frames[k].frame_number}"
    return f"{where} (largest cross-section), window W{window.width:g} L{window.level:g}"


def build_key_images(
    volume: CTVolume,
    findings: Sequence[SegmentFinding],
    algorithm: AlgorithmIdentity,
    series: KeyImageSeries,
) -> list[Dataset]:
    """One Secondary Capture key image per lesion in ``findings`` (none if there is no lesion).

    By default lung lesions get W1500/L-600 and others W400/L40. Images come
    in the order of the finding numbers, Instance Numbers 1, 2, ...; the SOP
    Instance UID of each is ``derive_uid(*series.uid_prefix_parts, "KI",
    tracking_uid)``. ``series.content_datetime`` is the Content / Secondary
    Capture date and time.

    Returns datasets with Explicit VR Little Endian file meta, ready for
    ``save_as(..., enforce_file_format=True)``.
    """
    check_algorithm(algorithm)
    when = series.when
    research_notice = series.research_notice
    chosen = select_lesions(volume, findings, series.max_images)
    notices = notice_lines(algorithm, research_notice)
    footer = [TextLine(notices[0], WARNING_RGB), *(TextLine(line) for line in notices[1:])]

    images = []
    for instance_number, finding in enumerate(chosen, start=1):
        k = key_slice(finding.mask)
        win = series.window_of(finding)
        source, reference = source_reference(volume, k)
        title, *details = label_lines(finding)
        header = [
            TextLine(title, CONTOUR_RGB, scale=1.2),
            *(TextLine(line) for line in details),
            TextLine(_source_text(volume, source, k, win), DIM_TEXT_RGB, scale=0.9),
        ]
        rendered = render_key_image(
            volume.hu[k], finding.mask[k], win, header, footer,
            pixel_spacing=volume.pixel_spacing,
            row_direction=volume.row_direction,
            column_direction=volume.column_direction,
        )
        sop_instance_uid = derive_uid(*series.uid_prefix_parts, "KI", str(finding.tracking_uid))
        images.append(_key_image_dataset(
            volume, source, reference, rendered.pixels, algorithm,
            sop_instance_uid=sop_instance_uid,
            series=series,
            instance_number=instance_number,
            when=when,
            derivation=(
                f"CT slice windowed W{win.width:g} L{win.level:g} and rendered as 8-bit RGB with the outline "
                f"and measurements of AI finding {finding.label!r} (tracking UID {finding.tracking_uid}) "
                f"burned in by {algorithm.name} {algorithm.version}. {research_notice.strip()}"
            ).strip(),
            comments="; ".join([line.text for line in header] + [line.text for line in footer]),
        ))
    return images


def _key_image_dataset(
    volume: CTVolume,
    source: Dataset,
    reference: Dataset,
    pixels: np.ndarray,
    algorithm: AlgorithmIdentity,
    *,
    sop_instance_uid: str,
    series: KeyImageSeries,
    instance_number: int,
    when: datetime,
    derivation: str,
    comments: str,
) -> Dataset:
    """The SC Image IOD (PS3.3 A.8.1) around one rendered RGB picture, built by highdicom's ``SCImage``.

    ``SCImage`` writes the SOP Common, General Series, General Equipment, SC
    Equipment, General Image, SC Image and Image Pixel modules (interleaved
    8-bit RGB, Explicit VR Little Endian file meta); what it leaves out, and
    the few values the node chooses otherwise, are set afterwards.
    """
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ResultEncodingError(f"key image pixels must be uint8 RGB, got {pixels.dtype} {pixels.shape}")
    row_letters = orientation_letters(volume.row_direction)
    column_letters = orientation_letters(volume.column_direction)
    ds = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        # highdicom's Patient Orientation values are single letters; the full
        # (possibly oblique) letters are set below.
        patient_orientation=(row_letters[0], column_letters[0]),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(algorithm)],
        series_description=series.series_description,
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        device_serial_number=algorithm.device_uid,
        content_date=date,
        content_time=time,
        series_date=date,
        series_time=time,
        specific_character_set=source_character_set(volume.first),
    )
    # Patient and study as the source has them, like the GSPS key images: highdicom
    # refuses person names without "^" and Patient's Sex outside M/F/O, which real
    # sources carry, and a key image must not fail on them.
    copy_patient_and_study(source, ds)
    copy_body_part(source, ds)
    # Values the node chooses otherwise than SCImage: one date and time
    # (series.when) for every object of a run, not the clock at construction;
    # Conversion Type WSD (a workstation rendering, not DI "digital interface");
    # Image Type DERIVED\SECONDARY as the node has always written it (SCImage adds
    # OTHER); oblique orientation letters (C.7.6.1.1.1).
    ds.InstanceCreationDate, ds.InstanceCreationTime = DA(date), TM(time)
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = DA(date), TM(time)
    ds.Modality = KEY_IMAGE_MODALITY
    ds.ConversionType = CONVERSION_TYPE
    ds.ImageType = ["DERIVED", "SECONDARY"]
    # Type 2C without Image Orientation (Patient): the rendering keeps the source's
    # row and column directions, so they are named; no position or spacing is claimed.
    ds.PatientOrientation = [row_letters, column_letters]
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1): what SCImage does not set.
    set_device_uid(ds, algorithm)
    ds.SecondaryCaptureDeviceID = fit_long_string(f"{algorithm.name} {algorithm.version}")
    ds.SecondaryCaptureDeviceManufacturer = algorithm.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = algorithm.model_name
    ds.SecondaryCaptureDeviceSoftwareVersions = algorithm.software_version
    # General Image (C.7.6.1)
    ds.DerivationDescription = derivation[:1024]  # ST
    ds.SourceImageSequence = [reference]
    ds.ImageComments = comments[:10240]  # LT
    ds.BurnedInAnnotation = "YES"
    return ds


def key_image_pixels(ds: Dataset) -> np.ndarray:
    """The (rows, columns, 3) uint8 pixels of a key image built here (uncompressed RGB)."""
    if ds.get("PhotometricInterpretation") != "RGB" or int(ds.get("BitsAllocated", 0)) != 8 \
            or int(ds.get("SamplesPerPixel", 0)) != 3 or int(ds.get("PlanarConfiguration", -1)) != 0:
        raise ValueError("not an interleaved 8-bit RGB image")
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = np.frombuffer(ds.PixelData, dtype=np.uint8)[: rows * columns * 3]
    return data.reshape(rows, columns, 3)


def save_png(ds: Dataset | str | Path, path: str | Path) -> Path:
    """Write the pixels of a key image (dataset or DICOM file) as a PNG, for tests and docs."""
    if not isinstance(ds, Dataset):
        ds = pydicom.dcmread(str(ds))
    path = Path(path)
    Image.fromarray(key_image_pixels(ds)).save(path, format="PNG")
    return path
