"""Lesion findings -> a Grayscale Softcopy Presentation State (GSPS) over the source CT.

The alternative to the Secondary Capture key images (:mod:`pipelines.dicom_out.keyimages`)
that a site chooses with ``[results] key_image_type = "GSPS"``. Instead of a
rendered copy of each slice, one presentation state (PS3.3 A.33.1) tells the
viewer how to show the original CT slices: the radiologist sees the scanner's
own pixels (and can re-window, zoom and measure them), the annotations are
layers a viewer can hide, and no pixels are duplicated in the PACS. Only
viewers that apply GSPS show any of it, which is why Secondary Capture stays
the default.

The content is the same as the Secondary Capture's, for the same lesions
(:func:`pipelines.dicom_out.keyimages.select_lesions`) on the same slices
(:func:`pipelines.dicom_out.keyimages.key_slice`):

- Presentation State Relationship: the key slice of each lesion (its frame,
  for Enhanced CT);
- one Graphic Layer per lesion (``LESION_1``, ...; a recommended display
  colour each) whose Graphic Annotation references that slice and holds the
  lesion's outline as closed POLYLINEs in PIXEL units, along the pixel edges
  of the mask (the voxels the model found, not a smoothed guess), and the
  label lines (finding, size, scores) as text at the top of the display;
- a ``NOTICE`` layer with "AI result: not verified" and the research notice
  at the bottom of every referenced slice;
- Softcopy VOI LUT: the lesion's window (:func:`pipelines.dicom_out.keyimages.window_for`)
  on each referenced slice; Modality LUT: the slices' rescale to HU, so the
  window is in HU whatever the scanner stored;
- the patient, study and identity rules of the Secondary Capture: same Study
  Instance UID and patient module, its own series (same Series Number as the
  SC series would have), UIDs derived from the same inputs, so a resend
  replaces the same instance; Contributing Equipment names the algorithm.

Text is placed in DISPLAY units (fractions of the displayed area), so it has
the same size on a 101 x 122 and a 512 x 512 matrix; the outline is in PIXEL
units, so it follows zoom and pan.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

from pipelines.clinical.findings import AlgorithmIdentity, SegmentFinding
from pipelines.dicom_out.keyimages import (
    CONTOUR_RGB,
    LUNG_WINDOW,
    SOFT_TISSUE_WINDOW,
    WARNING_RGB,
    DisplayWindow,
    KeyImageSeries,
    copy_body_part,
    copy_patient_and_study,
    key_slice,
    label_lines,
    notice_lines,
    select_lesions,
    source_reference,
)
from pipelines.dicom_out.segmentation import (
    algorithm_equipment,
    check_algorithm,
    fit_long_string,
    set_device_uid,
    source_character_set,
)
from pipelines.dicom_out.uids import derive_uid
from pipelines.errors import ResultEncodingError
from pipelines.volume.ct import CTVolume

LOG = logging.getLogger(__name__)

GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.1")

#: Content Label (0070,0080), CS: what viewers list the presentation state as.
CONTENT_LABEL = "AI_KEY_IMAGES"
#: Graphic Layer (0070,0002) of the notice lines; lesion layers are LESION_1, LESION_2, ...
NOTICE_LAYER = "NOTICE"

#: Recommended display colours (sRGB) of the lesion layers, by position: the
#: first is the Secondary Capture's outline colour; none is the notice's orange.
LESION_RGB = (CONTOUR_RGB, (0, 255, 255), (255, 0, 255), (0, 255, 0), (110, 180, 255), (255, 150, 200))
#: Graphic Layer Recommended Display Grayscale Value (0070,0066) of every layer:
#: white, for monochrome displays.
LAYER_GRAYSCALE = 0xFFFF

#: Text geometry in DISPLAY units (fractions of the displayed area's width / height).
TITLE_HEIGHT = 0.036
LINE_HEIGHT = 0.030
LINE_GAP = 0.006
MARGIN = 0.015
#: Longest text line (as long as an LO value): longer ones are wrapped at spaces, so that a
#: font filling LINE_HEIGHT (about 0.5 of its size per character) fits the width of a square display.
MAX_LINE_CHARS = 64
#: The lesion labels at the top of a slice take at most this part of the display height.
MAX_LABEL_BLOCK = 0.45

#: Window Center & Width Explanation (0028,1055) of the site windows.
_WINDOW_NAMES = {SOFT_TISSUE_WINDOW: "SOFT TISSUE", LUNG_WINDOW: "LUNG"}


# --------------------------------------------------------------------------- geometry


def outline_polylines(mask_slice: np.ndarray) -> list[np.ndarray]:
    """Closed polylines along the pixel edges between ``mask_slice`` and its outside.

    Points are (column, row) in PIXEL units (PS3.3 C.10.5.1.2: (0, 0) is the
    top left corner of the top left pixel, (Columns, Rows) the bottom right
    corner of the last one), the first point repeated last. Every
    4-connected part gets its outer boundary (clockwise on screen) and one
    polyline per hole (anticlockwise); straight runs are one segment.
    """
    mask = np.asarray(mask_slice, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"need a 2-D mask, got shape {mask.shape}")
    padded = np.pad(mask, 1)
    inside = padded[1:-1, 1:-1]
    # Each boundary side of an inside pixel, directed so that the inside is on its right
    # (y points down): top, right, bottom, left side, with the neighbour that must be outside.
    sides = (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),
        (padded[1:-1, 2:], (1, 0), (1, 1)),
        (padded[2:, 1:-1], (1, 1), (0, 1)),
        (padded[1:-1, :-2], (0, 1), (0, 0)),
    )
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    starts: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for neighbour, (x0, y0), (x1, y1) in sides:
        rows, cols = np.nonzero(inside & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = (c + x0, r + y0), (c + x1, r + y1)
            outgoing[a].append(b)
            starts.append((a, b))
    starts.sort()
    used: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    loops = []
    for first in starts:
        if first in used:
            continue
        points = [first[0]]
        edge = first
        while True:
            used.add(edge)
            a, b = edge
            points.append(b)
            heading = (b[0] - a[0], b[1] - a[1])
            choices = outgoing[b]
            if len(choices) == 1:
                nxt = choices[0]
            else:
                # Where two parts touch at a corner, turn right: stay with the same pixel, so
                # diagonal neighbours are separate parts (4-connectivity, as ndimage.label).
                right = (b[0] - heading[1], b[1] + heading[0])
                nxt = right if right in choices else choices[0]
            edge = (b, nxt)
            if edge == first:
                break
        loops.append(_without_collinear(points))
    return loops


def _without_collinear(points: list[tuple[int, int]]) -> np.ndarray:
    """A closed point list (first == last) without the points inside straight runs."""
    ring = points[:-1]
    n = len(ring)
    keep = []
    for i, p in enumerate(ring):
        before, after = ring[i - 1], ring[(i + 1) % n]
        if (p[0] - before[0]) * (after[1] - p[1]) != (p[1] - before[1]) * (after[0] - p[0]):
            keep.append(p)
    keep.append(keep[0])
    return np.asarray(keep, dtype=float)


def _wrap(text: str, max_chars: int = MAX_LINE_CHARS) -> list[str]:
    """``text`` in as few lines of at most ``max_chars`` as needed, of similar lengths."""
    text = " ".join(text.split())
    count = max(1, math.ceil(len(text) / max_chars))
    for width in range(math.ceil(len(text) / count), max_chars + 1):
        lines = textwrap.wrap(text, width)
        if len(lines) <= count:
            return lines
    return textwrap.wrap(text, max_chars, break_long_words=False) or [""]


# --------------------------------------------------------------------------- content


@dataclass
class _KeySlice:
    """One referenced slice: its source instance and frame, window, rescale, and the lesions shown
    on it as (position among the lesions shown, 1-based; finding; slice index)."""

    source: Dataset
    frame_number: int | None
    window: DisplayWindow
    rescale: tuple[float, float]
    lesions: list[tuple[int, SegmentFinding, int]]


def _text(line: str, top: float, height: float) -> hd.pr.TextObject:
    return hd.pr.TextObject(
        text_value=line,
        units=hd.pr.AnnotationUnitsValues.DISPLAY,
        bounding_box=(MARGIN, top, 1.0 - MARGIN, top + height),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


def _annotation(key: _KeySlice, layer: hd.pr.GraphicLayer, graphics: Sequence[hd.pr.GraphicObject],
                texts: Sequence[hd.pr.TextObject]) -> hd.pr.GraphicAnnotation:
    return hd.pr.GraphicAnnotation(
        referenced_images=[key.source],
        graphic_layer=layer,
        referenced_frame_number=key.frame_number,
        graphic_objects=list(graphics) or None,
        text_objects=list(texts) or None,
    )


def _layer(name: str, order: int, description: str, rgb: tuple[int, int, int]) -> hd.pr.GraphicLayer:
    layer = hd.pr.GraphicLayer(name, order, description=fit_long_string(description),
                               display_color=hd.color.CIELabColor.from_rgb(*rgb))
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = LAYER_GRAYSCALE
    return layer


def _lesion_annotations(keys: Sequence[_KeySlice]) -> tuple[list[hd.pr.GraphicLayer], list[hd.pr.GraphicAnnotation]]:
    """A layer per lesion (LESION_n, in the order the lesions are shown); on it the outline on its
    slice and its label lines at the top of the display, below those of earlier lesions there."""
    layers, annotations = [], []
    for key in keys:
        blocks = [[(line, TITLE_HEIGHT if i == 0 and j == 0 else LINE_HEIGHT)
                   for i, text in enumerate(label_lines(finding)) for j, line in enumerate(_wrap(text))]
                  for _, finding, _ in key.lesions]
        total = sum(h + LINE_GAP for block in blocks for _, h in block) + LINE_GAP * (len(blocks) - 1)
        scale = min(1.0, MAX_LABEL_BLOCK / total)
        top = MARGIN
        for (n, finding, k), block in zip(key.lesions, blocks):
            layer = _layer(f"LESION_{n}", n, label_lines(finding)[0], LESION_RGB[(n - 1) % len(LESION_RGB)])
            graphics = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=points,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    tracking_id=finding.tracking_id,
                    tracking_uid=finding.tracking_uid,
                )
                for points in outline_polylines(finding.mask[k])
            ]
            texts = []
            for line, height in block:
                texts.append(_text(line, top, height * scale))
                top += (height + LINE_GAP) * scale
            top += LINE_GAP * scale
            layers.append(layer)
            annotations.append(_annotation(key, layer, graphics, texts))
    order = sorted(range(len(layers)), key=lambda i: int(layers[i].GraphicLayerOrder))
    return [layers[i] for i in order], [annotations[i] for i in order]


def _notice_annotations(keys: Sequence[_KeySlice], lines: Sequence[str], order: int
                        ) -> tuple[list[hd.pr.GraphicLayer], list[hd.pr.GraphicAnnotation]]:
    """The NOTICE layer: "AI result: not verified" and the notice at the bottom of every slice."""
    wrapped = [part for line in lines for part in _wrap(line)]
    first_top = 1.0 - MARGIN - len(wrapped) * LINE_HEIGHT - (len(wrapped) - 1) * LINE_GAP
    texts = [(line, first_top + i * (LINE_HEIGHT + LINE_GAP)) for i, line in enumerate(wrapped)]
    layer = _layer(NOTICE_LAYER, order, "AI result not verified; research notice", WARNING_RGB)
    return [layer], [_annotation(key, layer, [], [_text(line, top, LINE_HEIGHT) for line, top in texts])
                     for key in keys]


def _image_references(keys: Sequence[_KeySlice]) -> list[hd.ReferencedImageSequence]:
    """Referenced Image Sequences covering ``keys``: one for the single-frame instances, one per
    multi-frame instance with its frame numbers (highdicom takes frames of one image at a time)."""
    single = [k.source for k in keys if k.frame_number is None]
    frames: dict[str, list[tuple[Dataset, int]]] = defaultdict(list)  # instance UID -> (instance, frame)
    for k in keys:
        if k.frame_number is not None:
            frames[k.source.SOPInstanceUID].append((k.source, k.frame_number))
    sequences = [hd.ReferencedImageSequence(referenced_images=single)] if single else []
    for group in frames.values():
        sequences.append(hd.ReferencedImageSequence(
            referenced_images=[group[0][0]], referenced_frame_number=[number for _, number in group]))
    return sequences


def _voi_transformations(keys: Sequence[_KeySlice]) -> list[hd.pr.SoftcopyVOILUTTransformation]:
    """One Softcopy VOI LUT item per window and image, naming the slices it applies to (PS3.3 C.11.8)."""
    by_window: dict[DisplayWindow, list[_KeySlice]] = defaultdict(list)
    for key in keys:
        by_window[key.window].append(key)
    items = []
    for window, group in by_window.items():
        for references in _image_references(group):
            # One-value lists: highdicom 0.28 splits a str explanation into characters.
            items.append(hd.pr.SoftcopyVOILUTTransformation(
                window_center=[window.level],
                window_width=[window.width],
                window_explanation=[_WINDOW_NAMES.get(window, f"W{window.width:g} L{window.level:g}")],
                referenced_images=references,
            ))
    return items


def _key_slices(volume: CTVolume, lesions: Sequence[SegmentFinding], series: KeyImageSeries) -> list[_KeySlice]:
    """The distinct slices the lesions are shown on, in lesion order; where two lesions share a
    slice, the first one's window is used (a slice has one window)."""
    keys: dict[tuple[str, int | None], _KeySlice] = {}
    for n, finding in enumerate(lesions, start=1):
        k = key_slice(finding.mask)
        source, reference = source_reference(volume, k)
        frame = int(reference.ReferencedFrameNumber) if "ReferencedFrameNumber" in reference else None
        where = (str(source.SOPInstanceUID), frame)
        window = series.window_of(finding)
        if where not in keys:
            keys[where] = _KeySlice(source, frame, window, volume.rescale(k), [])
        elif keys[where].window != window:
            LOG.info("series %s: %s shares its slice with %s; shown in the latter's window",
                     volume.series_instance_uid, finding.label, keys[where].lesions[0][1].label)
        keys[where].lesions.append((n, finding, k))
    return list(keys.values())


# --------------------------------------------------------------------------- DICOM


def build_presentation_states(
    volume: CTVolume,
    findings: Sequence[SegmentFinding],
    algorithm: AlgorithmIdentity,
    series: KeyImageSeries,
) -> list[Dataset]:
    """A GSPS over the key slices of the lesions in ``findings`` (an empty list if there is none).

    ``series`` means what it means to :func:`pipelines.dicom_out.keyimages.build_key_images`
    (lesion selection, windows, notice, date). There is one presentation
    state, unless the referenced slices have different rescale slopes or
    intercepts: a presentation state has one Modality LUT, so each rescale
    then gets its own (Instance Numbers 1, 2, ...). The SOP Instance UID is
    ``derive_uid(*series.uid_prefix_parts, "PR", *tracking_uids)`` of the
    lesions it shows, so a re-run replaces the same instance.

    Returns datasets with Explicit VR Little Endian file meta, ready for
    ``save_as(..., enforce_file_format=True)``.
    """
    check_algorithm(algorithm)
    when = series.when
    lesions = select_lesions(volume, findings, series.max_images)
    by_rescale: dict[tuple[float, float], list[_KeySlice]] = defaultdict(list)
    for key in _key_slices(volume, lesions, series):
        by_rescale[key.rescale].append(key)
    if len(by_rescale) > 1:
        LOG.info("series %s: key slices with %d different rescales, one presentation state each",
                 volume.series_instance_uid, len(by_rescale))
    return [
        _presentation_state(
            volume, keys, algorithm, series,
            sop_instance_uid=derive_uid(*series.uid_prefix_parts, "PR",
                                        *(str(f.tracking_uid) for key in keys for _, f, _ in key.lesions)),
            instance_number=instance_number,
            when=when,
        )
        for instance_number, keys in enumerate(by_rescale.values(), start=1)
    ]


def _presentation_state(
    volume: CTVolume,
    keys: Sequence[_KeySlice],
    algorithm: AlgorithmIdentity,
    series: KeyImageSeries,
    *,
    sop_instance_uid: str,
    instance_number: int,
    when: datetime,
) -> Dataset:
    """The GSPS IOD (PS3.3 A.33.1) over ``keys``, which share one rescale."""
    lesion_layers, lesion_annotations = _lesion_annotations(keys)
    notice_layers, notice_annotations = _notice_annotations(
        keys, notice_lines(algorithm, series.research_notice), int(lesion_layers[-1].GraphicLayerOrder) + 1)
    slope, intercept = keys[0].rescale
    sources = list({str(k.source.SOPInstanceUID): k.source for k in keys}.values())
    try:
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=sources,
            series_instance_uid=series.series_instance_uid,
            series_number=series.series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.software_version,
            # As in the SEG: software has no serial number; the model build's Device UID names it.
            device_serial_number=algorithm.device_uid,
            content_label=CONTENT_LABEL,
            # Type 2: the research notice, as in the SEG; empty when the site turned it off.
            content_description=fit_long_string(series.research_notice) or None,
            # A person name by VR; the "person" that drew the annotations is the algorithm.
            content_creator_name=f"{fit_long_string(algorithm.name)}^",
            graphic_layers=lesion_layers + notice_layers,
            graphic_annotations=lesion_annotations + notice_annotations,
            # Explicit, in HU: the window below is in HU whatever the source stored, and highdicom
            # cannot copy a rescale that an Enhanced CT keeps per frame.
            modality_lut_transformation=hd.ModalityLUTTransformation(
                rescale_intercept=intercept, rescale_slope=slope, rescale_type=hd.RescaleTypeValues.HU),
            voi_lut_transformations=_voi_transformations(keys),
            contributing_equipment=[algorithm_equipment(algorithm)],
            specific_character_set=source_character_set(volume.first),
            series_description=series.series_description,
            series_date=when.date(), series_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(
            f"highdicom refused the presentation state of series {volume.series_instance_uid}: {exc}"
        ) from exc
    date, time = DA(when.strftime("%Y%m%d")), TM(when.strftime("%H%M%S"))
    gsps.InstanceCreationDate, gsps.InstanceCreationTime = date, time
    gsps.PresentationCreationDate, gsps.PresentationCreationTime = date, time
    # Same patient and study attributes, by the same rules, as the Secondary Capture key images.
    copy_patient_and_study(keys[0].source, gsps)
    copy_body_part(keys[0].source, gsps)
    set_device_uid(gsps, algorithm)
    # highdicom writes a 1:1 aspect ratio; CT pixels need not be square (PS3.3 C.10.4).
    (area,) = gsps.DisplayedAreaSelectionSequence
    del area.PresentationPixelAspectRatio
    area.PresentationPixelSpacing = [f"{v:.6g}" for v in volume.pixel_spacing]
    return gsps
