"""A CT -> MR simulator: MR-like images from real CT, for paired training without real pairs.

Models trained on its images learn the simulator, not real MR physics
(:mod:`training.paired` turns them into training pairs).

Each voxel is decomposed into up to two materials from its HU (after a
light smoothing that removes CT noise), with linear partial-volume mixing:

* air (-1000 HU) and fat (-100 HU) below -100 HU (lungs and bowel gas,
  when labelled, mix air with the organ's tissue instead of fat);
* fat and a soft tissue between -100 HU and the soft tissue's nominal HU
  (:data:`NOMINAL_HU`); the soft tissue is the organ of the TotalSegmentator
  label when labels are given, else a generic muscle-like tissue;
* in bone (TotalSegmentator bone labels, or HU >= 150 without labels):
  marrow and cortex, the cortical fraction rising from 200 to 700 HU (at
  the 1-3 mm of clinical CT, cortex is rarely resolved: its voxels are
  partial volumes).

Each tissue has literature relaxation times at 1.5 T (:data:`TISSUES`;
de Bazelaire et al., Radiology 2004; Stanisz et al., MRM 2005; approximate
values for fluid, cortex and generic tissue) and a relative proton density.
The spin-echo signal is ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)`` with
T1-weighted (TR 500 ms, TE 15 ms) or T2-weighted (TR 4000 ms, TE 100 ms)
parameters; flowing blood in labelled vessels is dark (flow void, PD x 0.1).
The signal is blurred slightly (partial volume, 0.6 voxel), multiplied by a
smooth random bias field (log-field from a coarse random grid, +-15 % by
default) and corrupted by Rician noise (std 2 % of the 99th percentile of
the body signal), then scaled so that percentile is 1000 (arbitrary units).
Everything is deterministic given the seed. The body mask is the largest
connected region above -500 HU, holes filled slice by slice, dilated by one
voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


# -- tissues ---------------------------------------------------------------

@dataclass(frozen=True)
class Tissue:
    """Relaxation times (ms) at 1.5 T and proton density relative to water."""

    t1: float
    t2: float
    pd: float


#: 1.5 T values. Fat, liver, spleen, kidney (cortex/medulla mean), pancreas and
#: vertebral marrow: de Bazelaire et al. 2004; muscle, blood, cartilage:
#: Stanisz et al. 2005; spinal cord: white-matter-like; fluid (urine, bile, CSF),
#: cortical bone and generic soft tissue: approximate.
TISSUES: dict[str, Tissue] = {
    "air": Tissue(t1=1.0, t2=1.0, pd=0.0),
    "fat": Tissue(t1=343.0, t2=58.0, pd=0.90),
    "fluid": Tissue(t1=3500.0, t2=1500.0, pd=1.00),
    "soft_tissue": Tissue(t1=900.0, t2=50.0, pd=0.75),
    "muscle": Tissue(t1=1008.0, t2=44.0, pd=0.75),
    "liver": Tissue(t1=586.0, t2=46.0, pd=0.70),
    "spleen": Tissue(t1=1057.0, t2=79.0, pd=0.80),
    "kidney": Tissue(t1=1190.0, t2=86.0, pd=0.85),
    "pancreas": Tissue(t1=584.0, t2=46.0, pd=0.75),
    "bowel": Tissue(t1=900.0, t2=60.0, pd=0.75),
    "blood_flow": Tissue(t1=1441.0, t2=290.0, pd=0.09),  # flow void: PD 0.9 x 0.1
    "spinal_cord": Tissue(t1=745.0, t2=74.0, pd=0.70),
    "cartilage": Tissue(t1=1024.0, t2=30.0, pd=0.75),
    "marrow": Tissue(t1=549.0, t2=49.0, pd=0.85),
    "cortical_bone": Tissue(t1=250.0, t2=0.5, pd=0.15),
    # brainstem: white matter at 1.5 T (Stanisz et al., MRM 2005: T1 884 ms, T2 72 ms)
    "white_matter": Tissue(t1=884.0, t2=72.0, pd=0.70),
    # parotid gland: approximate. It is partly fatty (more so with age), so on
    # T1w images it is brighter than muscle and darker than subcutaneous fat:
    # T1 between the two, T2 like other glandular tissue.
    "parotid": Tissue(t1=650.0, t2=70.0, pd=0.80),
}
TISSUE_NAMES = tuple(TISSUES)

#: HU of each soft tissue without partial volume (fat/tissue mixing runs from
#: -100 HU to this value).
NOMINAL_HU = {"soft_tissue": 40.0, "muscle": 45.0, "liver": 55.0, "spleen": 45.0, "kidney": 30.0,
              "pancreas": 40.0, "bowel": 30.0, "blood_flow": 40.0, "spinal_cord": 30.0,
              "cartilage": 100.0, "fluid": 5.0, "fat": -100.0, "white_matter": 30.0, "parotid": 10.0}
FAT_HU, AIR_HU = -100.0, -1000.0
BONE_HU = 150.0                 # HU-only: bone from here up
CORTEX_HU = (200.0, 700.0)      # cortical fraction 0 -> 1 over this range (unsmoothed HU)

#: Spin-echo parameters (ms).
SEQUENCES = {"T1": {"tr": 500.0, "te": 15.0}, "T2": {"tr": 4000.0, "te": 100.0}}

#: TotalSegmentator v2 ("total" task) label -> soft tissue (or 'bone').
_TS = {
    1: "spleen", 2: "kidney", 3: "kidney", 4: "fluid", 5: "liver", 6: "bowel", 7: "pancreas",
    8: "soft_tissue", 9: "soft_tissue", 10: "lung", 11: "lung", 12: "lung", 13: "lung", 14: "lung",
    15: "bowel", 16: "lung", 17: "soft_tissue", 18: "bowel", 19: "bowel", 20: "bowel", 21: "fluid",
    22: "soft_tissue", 23: "fluid", 24: "fluid", 51: "blood_flow", 79: "spinal_cord", 90: "soft_tissue",
    117: "cartilage",
}
_TS.update({i: "bone" for i in range(25, 51)})           # sacrum, vertebrae S1..C1
_TS.update({i: "blood_flow" for i in range(52, 69)})     # great vessels
_TS.update({i: "bone" for i in range(69, 79)})           # humerus .. hip
_TS.update({i: "muscle" for i in range(80, 90)})         # gluteus, autochthon, iliopsoas
_TS.update({i: "bone" for i in range(91, 117)})          # skull, ribs, sternum
TOTALSEGMENTATOR_TISSUE = _TS
_GAS_LABELS = {"lung", "bowel"}

#: OpenKBP structure label (ct/openkbp/structures.json) -> tissue; None: the
#: HU rules (the PTVs mark a planning target plus margin, not a tissue). The
#: oesophagus takes the bowel's tissue (a muscular tube whose gas mixes with
#: its wall, not with fat); the larynx cartilage, its airway mixing air with it.
OPENKBP_TISSUE = {1: "white_matter", 2: "spinal_cord", 3: "parotid", 4: "parotid", 5: "bowel",
                  6: "cartilage", 7: "bone", 8: None, 9: None, 10: None}


@dataclass(frozen=True)
class LabelScheme:
    """A label legend: label -> tissue (None: HU rules), whether its bone
    labels cover every bone (else unlabelled voxels >= :data:`BONE_HU` are
    bone), and labels whose voxels below their tissue's HU are air mixed with
    that tissue (gas-bearing organs, besides the lung and bowel tissues)."""

    tissues: dict
    complete_bones: bool
    gas_labels: tuple = ()


#: ``simulate: {label_scheme: ...}``: the legends :func:`simulate_mr` knows.
LABEL_SCHEMES = {
    "totalsegmentator": LabelScheme(TOTALSEGMENTATOR_TISSUE, complete_bones=True),
    "openkbp": LabelScheme(OPENKBP_TISSUE, complete_bones=False, gas_labels=(5, 6)),
}


def get_label_scheme(name: str) -> LabelScheme:
    if name not in LABEL_SCHEMES:
        raise ValueError(f"unknown label_scheme {name!r}; choose one of {', '.join(LABEL_SCHEMES)}")
    return LABEL_SCHEMES[name]


def spin_echo(tissue: Tissue, tr: float, te: float) -> float:
    """Spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` of one tissue."""
    return float(tissue.pd * (1.0 - np.exp(-tr / tissue.t1)) * np.exp(-te / tissue.t2))


def tissue_signals(contrast: str = "T1") -> dict[str, float]:
    """Signal of every tissue of :data:`TISSUES` for a sequence of :data:`SEQUENCES`."""
    if contrast not in SEQUENCES:
        raise ValueError(f"unknown MR contrast {contrast!r}; choose one of {', '.join(SEQUENCES)}")
    seq = SEQUENCES[contrast]
    return {name: spin_echo(t, seq["tr"], seq["te"]) for name, t in TISSUES.items()}


def body_mask(ct_hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Body outline: the largest connected region above ``threshold`` HU,
    holes filled in each axial slice, dilated by one voxel."""
    above = ct_hu > threshold
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(ct_hu.shape, dtype=bool)
    sizes = ndimage.sum_labels(above, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    return ndimage.binary_dilation(body, iterations=1)


def _tissue_lookup(labels: np.ndarray | None, shape,
                   scheme: str = "totalsegmentator") -> tuple[np.ndarray, list[str]]:
    """(per-voxel index into ``names``, ``names``): the tissue of each voxel's
    label in ``scheme`` (:data:`LABEL_SCHEMES`; 'soft_tissue', i.e. the HU
    rules, where unlabelled or the label has no tissue)."""
    names = ["soft_tissue", "lung", "bone"] + [n for n in TISSUE_NAMES if n not in ("soft_tissue",)]
    if labels is None:
        return np.zeros(shape, dtype=np.int16), names
    table = np.zeros(max(256, int(labels.max()) + 1), dtype=np.int16)
    for label, tissue in get_label_scheme(scheme).tissues.items():
        if tissue is not None:
            table[label] = names.index(tissue)
    return table[labels.astype(np.int64)], names


def bias_field(shape, rng: np.random.Generator, strength: float = 0.15, grid: int = 4) -> np.ndarray:
    """Smooth multiplicative field ``exp(b)`` with ``|b| <= strength`` (cubic
    interpolation of a coarse random grid)."""
    coarse = rng.standard_normal((grid,) * len(shape))
    field = ndimage.zoom(coarse, [s / grid for s in shape], order=3, mode="nearest")
    field = field[tuple(slice(0, s) for s in shape)]
    peak = float(np.abs(field).max()) or 1.0
    return np.exp(field * (strength / peak)).astype(np.float32)


@dataclass
class SimulatedMR:
    """A simulated MR on the CT's grid."""

    mr: np.ndarray          # float32, arbitrary units (99th body percentile = 1000)
    mask: np.ndarray        # bool, body
    clean: np.ndarray       # noiseless, bias-free signal (same units)
    contrast: str


def simulate_mr(ct_hu: np.ndarray, labels: np.ndarray | None = None, *, contrast: str = "T1",
                seed: int = 0, bias: float = 0.15, noise: float = 0.02, blur: float = 0.6,
                smooth_ct: float = 0.7, label_coverage: np.ndarray | None = None,
                label_scheme: str = "totalsegmentator") -> SimulatedMR:
    """An MR-like image from a CT in HU (see the module docstring).

    Parameters
    ----------
    ct_hu : ndarray (S, P, L)
        CT in Hounsfield units.
    labels : ndarray of int, optional
        Labels on the same grid (0 = none): TotalSegmentator "total" labels,
        or another legend of :data:`LABEL_SCHEMES` (``label_scheme``).
    contrast : {'T1', 'T2'}
        Spin-echo weighting (:data:`SEQUENCES`).
    seed : int
        Seed of the bias field and the noise.
    bias : float
        Peak log-amplitude of the multiplicative bias field (0.15 = +-15 %).
    noise : float
        Rician noise std as a fraction of the 99th percentile body signal.
    blur : float
        Gaussian partial-volume blur (voxels).
    smooth_ct : float
        Gaussian smoothing of the CT before classification (voxels).
    label_coverage : ndarray of bool, optional
        Where ``labels`` are valid (a segmentation of part of the CT); the
        HU-only rules apply elsewhere. All of the grid by default.
    label_scheme : str
        The labels' legend (:data:`LABEL_SCHEMES`). With a legend whose bone
        labels are not complete (OpenKBP: the mandible only), unlabelled
        voxels >= :data:`BONE_HU` are bone as without labels, and so are
        organ-labelled ones (a contour reaching into bone).
    """
    signals = tissue_signals(contrast)
    hu = ndimage.gaussian_filter(np.asarray(ct_hu, dtype=np.float32), smooth_ct) if smooth_ct else \
        np.asarray(ct_hu, dtype=np.float32)
    if labels is not None and labels.shape != hu.shape:
        raise ValueError(f"labels {labels.shape} are not on the CT's grid {hu.shape}")
    scheme = get_label_scheme(label_scheme)
    index, names = _tissue_lookup(labels, hu.shape, label_scheme)
    is_lung = index == names.index("lung")
    if labels is None:
        covered = np.zeros(hu.shape, dtype=bool)
    else:
        covered = np.ones(hu.shape, dtype=bool) if label_coverage is None else np.asarray(label_coverage, bool)
    # bone: labelled bone (down to -100 HU) where labels are valid, HU >= 150 elsewhere
    labelled_bone = (index == names.index("bone")) & (hu >= FAT_HU)
    is_bone = np.where(covered, labelled_bone if scheme.complete_bones else labelled_bone | (hu >= BONE_HU),
                       hu >= BONE_HU)
    # soft-tissue signal and nominal HU per voxel (lungs: generic tissue mixed with air)
    soft_names = ["soft_tissue" if n in ("lung", "bone") else n for n in names]
    s_table = np.array([signals[n] for n in soft_names], dtype=np.float32)
    h_table = np.array([NOMINAL_HU.get(n, 40.0) for n in soft_names], dtype=np.float32)
    s_soft, h_soft = s_table[index], h_table[index]
    s_fat, s_marrow, s_cortex = signals["fat"], signals["marrow"], signals["cortical_bone"]

    out = np.empty(hu.shape, dtype=np.float32)
    # below -100 HU: air mixed with fat, or with the organ's tissue in gas-bearing organs
    gas_organ = is_lung | np.isin(index, [names.index(n) for n in _GAS_LABELS if n in names])
    if scheme.gas_labels and labels is not None:
        gas_organ |= covered & np.isin(labels, scheme.gas_labels)
    f_air = np.clip((hu - AIR_HU) / (FAT_HU - AIR_HU), 0.0, 1.0)
    partner = np.where(gas_organ, s_soft, s_fat)
    partner_hu = np.where(gas_organ, h_soft, FAT_HU)
    f_gas = np.clip((hu - AIR_HU) / np.maximum(partner_hu - AIR_HU, 1.0), 0.0, 1.0)
    low = hu < np.where(gas_organ, partner_hu, FAT_HU)
    out[low] = np.where(gas_organ, f_gas * partner, f_air * s_fat)[low]
    # fat <-> soft tissue
    f_soft = np.clip((hu - FAT_HU) / np.maximum(h_soft - FAT_HU, 1.0), 0.0, 1.0)
    mid = ~low
    out[mid] = (f_soft * s_soft + (1.0 - f_soft) * s_fat)[mid]
    # bone: marrow <-> cortex (bone voxels below -100 HU keep the air/fat mix)
    raw = np.asarray(ct_hu, dtype=np.float32)
    f_cortex = np.clip((raw - CORTEX_HU[0]) / (CORTEX_HU[1] - CORTEX_HU[0]), 0.0, 1.0)
    out[is_bone] = (f_cortex * s_cortex + (1.0 - f_cortex) * s_marrow)[is_bone]

    if blur:
        out = ndimage.gaussian_filter(out, blur)
    mask = body_mask(np.asarray(ct_hu, dtype=np.float32))
    rng = np.random.default_rng(seed)
    ref = float(np.percentile(out[mask], 99)) if mask.any() else float(out.max() or 1.0)
    scale = 1000.0 / max(ref, 1e-6)
    clean = out * scale
    field = bias_field(hu.shape, rng, bias) if bias else 1.0
    signal = clean * field
    sigma = noise * 1000.0
    noisy = np.sqrt((signal + sigma * rng.standard_normal(hu.shape, dtype=np.float32)) ** 2
                    + (sigma * rng.standard_normal(hu.shape, dtype=np.float32)) ** 2)
    return SimulatedMR(mr=noisy.astype(np.float32), mask=mask, clean=clean.astype(np.float32),
                       contrast=contrast)
