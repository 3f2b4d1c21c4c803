"""Synthetic non-contrast chest/abdomen CT phantoms with exact ground truth.

What it is for: training and held-out evaluation of the small 3-D networks
(organ segmentation, lesion detection and typing), DICOM series for the
end-to-end tests and benchmarks, and ground truth for the deterministic
measurements (L1 trabecular HU, liver attenuation, lung nodule size).

Anatomy is analytic, in patient millimetres (DICOM LPS, PS3.3 C.7.6.2.1.1:
+x patient Left, +y Posterior, +z Superior), so one :class:`Phantom` renders
on any :class:`Grid`. ``z = 0`` is the middle of the T12/L1 disc; the body
axis is z. A grid is axial: row direction (1, 0, 0), column direction
(0, 1, 0), and slice ``k`` lies at ``origin_z + k * spacing_z``, i.e. slices
ascend toward the head, the order :func:`pipelines.volume.ct.ct.load_series`
returns (slices sorted along the normal (0, 0, 1)).

Use::

    phantom = sample_phantom(7, steatosis="mild", lesions=[{"site": "liver", "diameter_mm": 20}])
    rendered = render(phantom, Grid.coarse(3.0, phantom))      # ~0.2 s, for training
    rendered = render(phantom, Grid.chest_ct(phantom=phantom))  # 512 x 512, 1 mm slices, ~8 s
    write_case(phantom, Grid.chest_ct(phantom=phantom), "cases/case_0007")

or ``python -m pipelines.offline.phantom OUT_DIR --cases N --seed S [--grid coarse|chest]
[--spacing MM] [--no-dicom]`` (case ``i`` uses seed ``S + i``).

Label maps (computed on the grid without blur: a voxel belongs to a shape
when its centre does)
-------------------------------------------------------------------------

``organs`` (:data:`ORGAN_LABELS`): 1 lung, 2 liver, 3 spleen, 4 pancreas,
5 kidney, 6 stomach, 7 oesophagus, 8 colon, 9 aorta, 10 vertebra (vertebral
bodies with their cortical shell; each body is separated from the next by a
6-10 mm disc of soft tissue, label 0), 11 rib. Hollow organs are labelled
with their contents (wall + lumen). Everything else is 0: outside air, skin,
fat, muscle, heart, other vessels, trachea and bronchi, small bowel,
gallbladder, discs, spinal canal, posterior vertebral elements, sternum.
A lesion keeps its organ's label; lung nodules are labelled lung.

``lesions``: 0 none, ``i`` = lesion number ``i`` (``truth["lesions"]``).
``vertebrae``: 0 none, else the level index of :data:`LEVELS` (1 = T1 ...
12 = T12, 13 = L1 ... 17 = L5), on the voxels labelled 10.

Ribs (cortical tubes) leave each thoracic vertebra T1-T12 at its mid-height,
touching its body, and curve laterally and anteriorly in the chest wall;
lumbar vertebrae have none. So on the masks, T12 is the lowest vertebral
body with a rib within 5 mm, and L1 the next body below.

Tissue attenuation at 120 kVp (noise-free, before blur; :data:`HU_RANGES`)
--------------------------------------------------------------------------

outside air -1000; subcutaneous/visceral fat -120..-80; muscle 45-55; skin
~30; lung -900..-800 (denser posteriorly) with small vessels ~45; liver
55-65 normal, 15-47 steatotic; spleen 45-50; pancreas 35-45; kidney 30-35;
stomach, oesophagus and colon wall 38-45; stomach water 0-15 with a gas cap
(anterior: the patient is supine, so gas rises toward -y); colon stool with
gas; oesophagus with an optional small air lumen; aortic blood 40-50 with
optional calcified plaques; vertebral cortex 400-900, trabecular bone per
level (normal > 160, osteopenic 110-160, osteoporotic < 110 at L1); discs
70-90; spinal canal 20-30; rib cortex 450-600. Bone HU scale with kVp
(x1.10 at 100 kVp, x0.90 at 140 kVp); ``truth`` gives the image values.

Image formation: organ texture, then a Gaussian PSF (0.6 mm in-plane, plus
the pixel footprint) and a Gaussian slice profile whose FWHM is the slice
thickness, then Gaussian noise of ``noise_sigma_hu`` (in-plane correlated
over ~0.7 mm), clipped to -1024..3071 and rounded to int16.

Lesions (:data:`LESION_TYPES`; contrast is against the organ's mean, or the
wall's for hollow organs)
-------------------------------------------------------------------------

============  =========  ==================================================
site          type       appearance
============  =========  ==================================================
liver         malignant  -25..-5 HU, lobulated border, mild heterogeneity
liver         cyst       water 0-15 HU, homogeneous, sharp round border
liver         benign     +5..+20 HU, well defined, round, homogeneous
pancreas      malignant  -25..-5 HU, lobulated, focal contour bulge if large
pancreas      cyst       water 0-15 HU, round
pancreas      benign     +5..+15 HU, round
stomach       malignant  wall-based mass -15..-5 HU vs the wall, into the lumen
stomach       benign     round submucosal mass +5..+15 HU vs the wall
oesophagus    malignant  focal wall thickening/mass -15..-5 HU, narrows lumen
colon         malignant  wall-based mass -15..-5 HU, into the lumen
lung          nodule     solid, 0-40 HU, 3-30 mm, >= 5 mm from the pleura
============  =========  ==================================================

A lesion is a (lobulated) sphere of ``diameter_mm`` clipped to its organ; in
a hollow organ or the pancreas an organ too thin for it bulges around it.
Lesions are placed fully inside the phantom's field of view in z when they
fit. ``truth["lesions"]`` gives for each: number, site, type, diameter_mm,
contrast_hu, hu, centre_mm (LPS), centre_voxel (k, row, column), voxel_count,
volume_mm3 (rendered) and visible (false when the lesion has no voxel on the
grid: smaller than a voxel, or outside a grid that does not cover the field
of view); ``sites_with_lesions`` counts visible lesions only.

Labelled case folder (what :func:`write_case` writes, and the layout a
hospital produces from its own labelled series for the validation harness)
-------------------------------------------------------------------------

::

    case_dir/dicom/*.dcm   one CT series (CT Image Storage, one file a slice)
    case_dir/labels.npz    uint8 arrays "organs", "lesions", "vertebrae", each
                           (slices, rows, columns) in the order
                           pipelines.volume.load_series returns (ascending
                           along the slice normal); label values as above
    case_dir/truth.json    "label_names" {"1": "lung", ...}, "level_names",
                           "grid" {shape, spacing_mm, origin_mm}, "lesions"
                           [...], the measurements (liver_mean_hu,
                           spleen_mean_hu, steatosis, trabecular_mean_hu,
                           bone_density, ...), "organs_cut", "levels_in_view",
                           and for phantoms "phantom" (every parameter)

A site's own cases need only ``organs`` (``lesions`` and ``vertebrae`` are
optional) and, in truth.json, ``label_names`` and ``lesions`` (number, site,
type, diameter_mm). Without DICOM (``--no-dicom``) ``case_dir/image.npz``
holds ``hu`` (int16) with ``spacing_mm`` and ``origin_mm`` instead of ``dicom/``.

Not modelled: contrast, arms and shoulder girdle, scapulae, clavicles,
pelvis, adrenals, duodenum, hepatic and portal veins, beam hardening and
streaks.

Modules: :mod:`.tables` (labels, lesion types, tissue HU), :mod:`.anatomy` (the
shapes and :class:`Phantom`), :mod:`.grid` (:class:`Grid`), :mod:`.sampling` and
:mod:`.lesions` (a phantom from a seed), :mod:`.painting` and :mod:`.rendering`
(a phantom on a grid), :mod:`.case_folder` (DICOM series and labelled case
folders), :mod:`.cli` (the command line).
"""

from __future__ import annotations

from pipelines.offline.phantom.anatomy import Blob, Diaphragm, Lesion, Phantom, Point, Tissues, Tube, Vertebra
from pipelines.offline.phantom.case_folder import write_case, write_dicom_series
from pipelines.offline.phantom.cli import main
from pipelines.offline.phantom.grid import Grid
from pipelines.offline.phantom.rendering import RenderedPhantom, render
from pipelines.offline.phantom.sampling import sample_phantom
from pipelines.offline.phantom.tables import (
    BONE_DENSITY_CLASSES,
    CANCER_SITES,
    COVERAGES,
    CT_IMAGE_STORAGE,
    CYST_HU,
    HU_RANGES,
    LESION_CONTRAST_HU,
    LESION_DIAMETER_MM,
    LESION_TYPE_WEIGHTS,
    LESION_TYPES,
    LEVEL_INDEX,
    LEVELS,
    MANUFACTURER,
    NODULE_HU,
    NOISE_CORRELATION_MM,
    ORGAN_IDS,
    ORGAN_LABELS,
    PSF_SIGMA_MM,
    STEATOSIS_CLASSES,
    PhantomError,
    bone_density_class,
    kvp_bone_factor,
    steatosis_class,
)

__all__ = [
    "ORGAN_LABELS",
    "ORGAN_IDS",
    "LEVELS",
    "LEVEL_INDEX",
    "LESION_TYPES",
    "CANCER_SITES",
    "LESION_TYPE_WEIGHTS",
    "LESION_DIAMETER_MM",
    "LESION_CONTRAST_HU",
    "CYST_HU",
    "NODULE_HU",
    "HU_RANGES",
    "STEATOSIS_CLASSES",
    "BONE_DENSITY_CLASSES",
    "COVERAGES",
    "CT_IMAGE_STORAGE",
    "MANUFACTURER",
    "PSF_SIGMA_MM",
    "NOISE_CORRELATION_MM",
    "PhantomError",
    "steatosis_class",
    "bone_density_class",
    "kvp_bone_factor",
    "Grid",
    "Point",
    "Blob",
    "Tube",
    "Vertebra",
    "Lesion",
    "Tissues",
    "Diaphragm",
    "Phantom",
    "RenderedPhantom",
    "sample_phantom",
    "render",
    "write_dicom_series",
    "write_case",
    "main",
]
