"""Plain data passed from the analysis to the result writers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

#: What shows lesions to viewers that read neither SEG nor SR (``[results] key_image_type``):
#: Secondary Capture key images (pipelines.keyimages), a Grayscale Softcopy Presentation State
#: over the source slices (pipelines.presentation), or nothing.
KEY_IMAGE_TYPES = ("SC", "GSPS", "NONE")


@dataclass(frozen=True)
class CodeSpec:
    """A coded concept (value, scheme designator, meaning), e.g. SCT 39607008 Lung."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("value", "scheme", "meaning"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"CodeSpec.{name} must be a non-empty string, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who produced a result (PS3.3 C.8.20.2 Segment Algorithm, TID 4019).

    ``device_uid`` changes whenever the model bytes change (IHE AIR).
    """

    name: str
    version: str
    family: CodeSpec
    manufacturer: str
    model_name: str
    software_version: str
    device_uid: str


@dataclass(frozen=True)
class LesionFacts:
    """What the analysis knows about one lesion finding beyond its mask.

    ``site`` is the screened site it was assigned to and ``score`` the detector's
    score within 0..1; the axes are measured on the axial slice where the lesion
    is longest; ``centre_mm`` is its centre of mass in mm on the model's LPS grid.
    ``type``, ``type_probabilities`` and ``malignancy`` come from the typing stage
    (None and empty without one); ``lung_rads`` from the lung nodule measurement.
    """

    site: str
    score: float
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    mean_diameter_mm: float | None = None
    centre_mm: tuple[float, ...] = ()
    type: str | None = None
    type_probabilities: Mapping[str, float] = field(default_factory=dict)
    malignancy: float | None = None
    lung_rads: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"LesionFacts.site must be a non-empty string, got {self.site!r}")
        score = _number(self.score, f"lesion at {self.site!r}: score")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"lesion at {self.site!r}: score must lie within 0..1, got {self.score!r}")
        for name in ("long_axis_mm", "short_axis_mm", "mean_diameter_mm", "malignancy"):
            value = getattr(self, name)
            if value is not None:
                _number(value, f"lesion at {self.site!r}: {name}")
        object.__setattr__(self, "centre_mm", tuple(float(v) for v in self.centre_mm))
        object.__setattr__(self, "type_probabilities", MappingProxyType(
            {str(k): _number(v, f"lesion at {self.site!r}: type_probabilities[{k!r}]")
             for k, v in dict(self.type_probabilities).items()}))
        if self.type is not None and (not isinstance(self.type, str) or not self.type):
            raise ValueError(f"lesion at {self.site!r}: type must be a non-empty string or None, got {self.type!r}")


#: The manifest role of a lesion finding (other roles: "organ", "vertebrae", "ribs", ...).
LESION_ROLE = "lesion"


@dataclass(frozen=True, eq=False)
class SegmentFinding:
    """One segmented structure on the source grid (compared by identity: it holds a mask array).

    ``mask`` is boolean with shape (slices, rows, columns) in the order of
    ``CTVolume.datasets`` (sorted along the slice normal). ``role`` is the
    manifest segment's role, :data:`LESION_ROLE` for a lesion, which (and only
    which) carries ``lesion`` facts. ``median_hu`` and ``cut_by_field_of_view``
    describe an organ (None / False when not measured).
    """

    number: int
    label: str
    category: CodeSpec
    type: CodeSpec
    finding_site: CodeSpec | None
    mask: np.ndarray
    tracking_id: str
    tracking_uid: str
    volume_mm3: float
    mean_hu: float
    voxel_count: int
    role: str = "organ"
    median_hu: float | None = None
    cut_by_field_of_view: bool = False
    lesion: LesionFacts | None = None

    def __post_init__(self) -> None:
        if self.lesion is not None and not isinstance(self.lesion, LesionFacts):
            raise TypeError(f"finding {self.label!r}: lesion must be LesionFacts or None, got {self.lesion!r}")
        if (self.lesion is not None) != (self.role == LESION_ROLE):
            raise ValueError(
                f"finding {self.label!r}: role {self.role!r} with lesion facts {self.lesion!r} "
                f"(a lesion, and only a lesion, has role {LESION_ROLE!r} and lesion facts)")


def _number(value: object, where: str) -> float:
    """``value`` as a finite float; refuses booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return number
