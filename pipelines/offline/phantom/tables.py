"""The phantom's tables: organ and vertebral labels, lesion types and ranges, tissue HU, class thresholds."""

from __future__ import annotations

from pipelines.errors import PacsAiError

# --------------------------------------------------------------------------- tables

#: Organ label map values (``RenderedPhantom.organs``).
ORGAN_LABELS: dict[int, str] = {
    1: "lung", 2: "liver", 3: "spleen", 4: "pancreas", 5: "kidney", 6: "stomach",
    7: "oesophagus", 8: "colon", 9: "aorta", 10: "vertebra", 11: "rib",
}
ORGAN_IDS: dict[str, int] = {name: i for i, name in ORGAN_LABELS.items()}

#: Vertebral levels (``RenderedPhantom.vertebrae`` values): 1 = T1 ... 12 = T12, 13 = L1 ... 17 = L5.
LEVELS: dict[int, str] = {i + 1: name for i, name in enumerate(
    [f"T{n}" for n in range(1, 13)] + [f"L{n}" for n in range(1, 6)])}
LEVEL_INDEX: dict[str, int] = {name: i for i, name in LEVELS.items()}

#: Lesion types per site (see the module docstring for their appearance).
LESION_TYPES: dict[str, tuple[str, ...]] = {
    "pancreas": ("malignant", "cyst", "benign"),
    "liver": ("malignant", "cyst", "benign"),
    "oesophagus": ("malignant",),
    "stomach": ("malignant", "benign"),
    "colon": ("malignant",),
    "lung": ("nodule",),
}
#: Sites of the cancers the node screens for (lung nodules are sampled apart).
CANCER_SITES: tuple[str, ...] = ("pancreas", "liver", "oesophagus", "stomach", "colon")
#: Sampling weights of the types of a site's random lesions.
LESION_TYPE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "pancreas": (0.5, 0.35, 0.15), "liver": (0.4, 0.4, 0.2), "oesophagus": (1.0,),
    "stomach": (0.7, 0.3), "colon": (1.0,), "lung": (1.0,),
}
#: Diameter range (mm) of random lesions per site; forced lesions may be 2-60 mm.
LESION_DIAMETER_MM: dict[str, tuple[float, float]] = {
    "pancreas": (5.0, 35.0), "liver": (4.0, 35.0), "oesophagus": (10.0, 35.0),
    "stomach": (10.0, 35.0), "colon": (10.0, 35.0), "lung": (3.0, 30.0),
}
#: Contrast (HU, against the organ mean or the hollow organ's wall) of random lesions.
LESION_CONTRAST_HU: dict[tuple[str, str], tuple[float, float]] = {
    ("liver", "malignant"): (-25.0, -5.0), ("liver", "benign"): (5.0, 20.0),
    ("pancreas", "malignant"): (-25.0, -5.0), ("pancreas", "benign"): (5.0, 15.0),
    ("stomach", "malignant"): (-15.0, -5.0), ("stomach", "benign"): (5.0, 15.0),
    ("oesophagus", "malignant"): (-15.0, -5.0), ("colon", "malignant"): (-15.0, -5.0),
}
#: Absolute attenuation (HU) of cysts and of lung nodules: their contrast follows from it.
CYST_HU: tuple[float, float] = (0.0, 15.0)
NODULE_HU: tuple[float, float] = (0.0, 40.0)
#: Sites whose organ bulges around a lesion too large for it (tubes in this phantom).
_BULGING_SITES = frozenset({"pancreas", "oesophagus", "stomach", "colon"})
_HOLLOW_SITES = frozenset({"oesophagus", "stomach", "colon"})

#: Noise-free attenuation of each tissue at 120 kVp, (low, high) HU, before blur.
HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0), "fat": (-120.0, -80.0), "muscle": (45.0, 55.0), "skin": (25.0, 35.0),
    "lung": (-900.0, -800.0), "liver": (55.0, 65.0), "liver_steatotic": (15.0, 47.0),
    "spleen": (45.0, 50.0), "pancreas": (35.0, 45.0), "kidney": (30.0, 35.0), "blood": (40.0, 50.0),
    "hollow_wall": (38.0, 45.0), "stomach_fluid": (0.0, 15.0), "stool": (-30.0, 30.0),
    "cortical_bone": (400.0, 900.0), "trabecular_bone": (50.0, 280.0), "disc": (70.0, 90.0),
    "spinal_canal": (20.0, 30.0), "rib": (450.0, 600.0),
}

#: Liver attenuation classes (HU thresholds on the liver mean, Pickhardt 2012, Boyce 2010).
STEATOSIS_CLASSES: tuple[str, ...] = ("none", "mild", "moderate-severe")
#: L1 trabecular attenuation classes at 120 kVp (Pickhardt 2013): > 160, 110-160, < 110 HU.
BONE_DENSITY_CLASSES: tuple[str, ...] = ("normal", "osteopenic", "osteoporotic")
#: Field-of-view presets (``coverage``): which part of the trunk the scan covers.
COVERAGES: tuple[str, ...] = ("chest-abdomen", "chest", "abdomen")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "pacs-ai-node phantom"
#: Gaussian PSF sigma in-plane (mm) and in-plane noise correlation (mm).
PSF_SIGMA_MM = 0.6
NOISE_CORRELATION_MM = 0.7
#: Placement grid spacing (mm) used to put lesions inside their organ.
_PLACEMENT_SPACING_MM = 4.0
_HU_MIN, _HU_MAX = -1024, 3071
_UID_ROOT = "pacs-ai-node-phantom"


class PhantomError(PacsAiError, ValueError):
    """A phantom option, shape or lesion request that cannot be honoured; names the value."""


def steatosis_class(liver_hu: float) -> str:
    """``none`` (>= 48 HU), ``mild`` (40-48 HU) or ``moderate-severe`` (< 40 HU)."""
    if liver_hu >= 48.0:
        return "none"
    return "mild" if liver_hu >= 40.0 else "moderate-severe"


def bone_density_class(l1_trabecular_hu_120kvp: float) -> str:
    """``normal`` (> 160 HU), ``osteopenic`` (110-160 HU) or ``osteoporotic`` (< 110 HU)."""
    if l1_trabecular_hu_120kvp > 160.0:
        return "normal"
    return "osteopenic" if l1_trabecular_hu_120kvp >= 110.0 else "osteoporotic"


def kvp_bone_factor(kvp: float) -> float:
    """Scale of bone attenuation relative to 120 kVp (lower kVp, higher bone HU)."""
    return 1.0 + 0.005 * (120.0 - float(kvp))
