"""Plain data passed from the analysis to the result writers."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class SegmentFinding:
    """One segmented structure on the source grid.

    ``mask`` is boolean with shape (slices, rows, columns) in the order of
    ``CTVolume.datasets`` (sorted along the slice normal).
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
    extra: dict = field(default_factory=dict)
