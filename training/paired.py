"""Paired CT/MR training data: SynthRAD2023 and folder adapters, and pairs simulated from CT.

Translation models (``task: translation``) learn from registered CT/MR pairs
on one grid. Three sources, mixed freely in a config's ``data.pairs`` list:

* ``synthrad: {root: ..., regions: [brain, pelvis]}`` -- the SynthRAD2023
  layout ``<root>/<region>/<case>/ct.nii.gz, mr.nii.gz, mask.nii.gz``
  (``root`` may also be one region folder). ``brain`` cases get the body
  region ``head-neck``, ``pelvis`` cases ``abdomen`` (the nearest of
  :data:`~napari_mediffuse.engine.networks.REGIONS`).
* ``folder: {root: ...}`` -- a generic layout ``<root>/ct/<case>``,
  ``<root>/mr/<case>`` and optionally ``<root>/mask/<case>``, cases matched
  by name (NIfTI files or DICOM series folders).
* ``simulate: {ct: ..., labels: ..., contrast: T1}`` -- an MR-like image
  simulated from a real CT (:func:`simulate_mr`), for machines without real
  pairs. Models trained on these learn the simulator, not real MR physics.
  ``ct`` may be a folder of patients (``glob``, e.g. OpenKBP's
  ``*/ct.nii.gz``, with ``labels`` then a file name beside each CT,
  ``patients`` / ``max_patients`` to choose some), ``label_scheme`` names
  the labels' legend (:data:`~training.mr_simulator.LABEL_SCHEMES`: TotalSegmentator or OpenKBP),
  ``orientation_fix`` and ``exclude_mask`` work as in the CT prior's
  configs (:mod:`training.data`).

``data.heldout_pairs`` (same entries) are patients held out whole: never
trained on, in the validation stream and the evaluation. An entry may set
its own ``holdout_fraction`` / ``holdout_side`` (a held-out block of a
training patient). :func:`check_pair_split` refuses a patient in both lists,
or a missing file, before anything is loaded.

The simulator itself is :mod:`training.mr_simulator`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_mediffuse import io
from napari_mediffuse.engine.intensity import (
    DEFAULT_CT_NORMALIZATION,
    DEFAULT_MR_NORMALIZATION,
    intensity_range,
    normalize,
)

from napari_mediffuse.io.volume import slab_affine
from napari_mediffuse.tasks.common import PLANE_AXIS

from .data import (
    ORIENTATIONS,
    ConfigError,
    SampleStream,
    body_box,
    dataset_files,
    excluded_blocks,
    fix_orientation,
    image_level,
    make_augmentation,
    resample_isotropic,
    patient_id,
    region_index,
    resolve_path,
    stacked_patch,
    volume_probabilities,
)
from .mr_simulator import body_mask, simulate_mr

log = logging.getLogger(__name__)

DIRECTIONS = ("ct2mr", "mr2ct")
#: SynthRAD2023 region folder -> body region of the network.
SYNTHRAD_REGIONS = {"brain": "head-neck", "pelvis": "abdomen"}
#: Output range of synthetic MR (arbitrary units): normalised [-1, 1] -> [0, 1000].
MR_OUTPUT_RANGE = (0.0, 1000.0)


# -- pairs on disk ----------------------------------------------------------------------------

@dataclass
class PairFiles:
    """One case: a CT and an MR on the same grid, and an optional mask."""

    case: str
    ct: Path
    mr: Path
    mask: Path | None = None
    region: str | None = None


def synthrad_pairs(root, regions=None) -> list[PairFiles]:
    """Cases of the SynthRAD2023 layout ``<root>/<region>/<case>/{ct,mr,mask}.nii.gz``.

    ``root`` may be the task folder (holding ``brain/`` and ``pelvis/``) or one
    region folder; ``regions`` restricts the regions read.
    """
    root = resolve_path(str(root))
    if not root.is_dir():
        raise FileNotFoundError(f"SynthRAD2023 folder {root} not found")
    region_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SYNTHRAD_REGIONS]
    if not region_dirs and any((d / "ct.nii.gz").is_file() for d in root.iterdir() if d.is_dir()):
        region_dirs = [root]
    pairs = []
    for rdir in region_dirs:
        if regions is not None and rdir.name not in regions:
            continue
        region = SYNTHRAD_REGIONS.get(rdir.name)
        for case in sorted(d for d in rdir.iterdir() if d.is_dir()):
            ct, mr, mask = case / "ct.nii.gz", case / "mr.nii.gz", case / "mask.nii.gz"
            if not (ct.is_file() and mr.is_file()):
                log.warning("%s: no ct.nii.gz + mr.nii.gz pair, skipped", case)
                continue
            pairs.append(PairFiles(case=f"{rdir.name}/{case.name}", ct=ct, mr=mr,
                                   mask=mask if mask.is_file() else None, region=region))
    if not pairs:
        raise ValueError(f"{root}: no SynthRAD2023 cases (<region>/<case>/ct.nii.gz + mr.nii.gz)")
    return pairs


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def folder_pairs(root) -> list[PairFiles]:
    """Cases of the generic layout ``<root>/ct/<case>``, ``<root>/mr/<case>``,
    optional ``<root>/mask/<case>`` (NIfTI files or DICOM folders), matched by name."""
    root = resolve_path(str(root))
    found = {}
    for part in ("ct", "mr", "mask"):
        folder = root / part
        if not folder.is_dir():
            if part == "mask":
                continue
            raise FileNotFoundError(f"{root}: paired folder needs {part}/ (and ct/, mr/, optional mask/)")
        found[part] = {_case_name(p): p for p in sorted(folder.iterdir())
                       if p.is_dir() or io.is_nifti_path(p)}
    cases = sorted(set(found["ct"]) & set(found["mr"]))
    unmatched = sorted(set(found["ct"]) ^ set(found["mr"]))
    if unmatched:
        log.warning("%s: cases without a partner skipped: %s", root, ", ".join(unmatched))
    if not cases:
        raise ValueError(f"{root}: no case has both ct/<case> and mr/<case>")
    masks = found.get("mask", {})
    return [PairFiles(case=c, ct=found["ct"][c], mr=found["mr"][c], mask=masks.get(c)) for c in cases]


def _read_one(path: Path, modality: str) -> io.Volume:
    volumes = io.read(path) if path.is_dir() else [io.read_nifti(path, modality=modality)]
    if len(volumes) != 1:
        raise ValueError(f"{path}: expected one series, found {len(volumes)}")
    return volumes[0]


@dataclass
class PairedVolume:
    """A registered CT/MR pair in display orientation (S, P, L), scanner units."""

    ct: np.ndarray          # HU
    mr: np.ndarray          # arbitrary units
    mask: np.ndarray        # bool
    spacing: tuple
    region: int
    source: str
    affine: np.ndarray | None = None
    mr_clean: np.ndarray | None = None  # simulated pairs: the MR without bias field and noise
    patient: str = ""
    holdout_fraction: float | None = None  # this pair's held-out block (None: data.holdout_fraction)
    holdout_side: str | None = None
    held_out: bool = False  # a held-out patient (data.heldout_pairs): every slice is held out


def read_pair(files: PairFiles, *, region=None) -> PairedVolume:
    """Read a case; the CT, MR and mask must share one grid (SynthRAD pairs are registered)."""
    ct = _read_one(files.ct, "CT")
    mr = _read_one(files.mr, "MR")
    for other, what in ((mr, "MR"),):
        if other.data.shape != ct.data.shape or not np.allclose(other.affine, ct.affine, atol=1e-2):
            raise ValueError(f"{files.case}: {what} {other.data.shape} is not on the CT's grid "
                             f"{ct.data.shape}; pairs must be registered and resampled to one grid")
    if files.mask is not None:
        mask_vol = _read_one(files.mask, "OT")
        if mask_vol.data.shape != ct.data.shape:
            raise ValueError(f"{files.case}: mask {mask_vol.data.shape} is not on the CT's grid")
        mask = np.asarray(mask_vol.data) > 0
    else:
        mask = body_mask(np.asarray(ct.data, dtype=np.float32))
    return PairedVolume(ct=np.asarray(ct.data, dtype=np.float32), mr=np.asarray(mr.data, dtype=np.float32),
                        mask=mask, spacing=ct.spacing, region=region_index(region or files.region),
                        source=files.case, affine=ct.affine)


def _place_labels(labels: np.ndarray, shape, offset) -> np.ndarray:
    """A label crop placed at voxel ``offset`` (display orientation) of a grid."""
    out = np.zeros(shape, dtype=labels.dtype)
    offset = [int(o) for o in (offset or (0, 0, 0))]
    src = tuple(slice(max(0, -o), min(n, s - o)) for o, n, s in zip(offset, labels.shape, shape))
    dst = tuple(slice(max(0, o), max(0, o) + (sl.stop - sl.start)) for o, sl in zip(offset, src))
    out[dst] = labels[src]
    return out


@dataclass
class SimulationCase:
    """One CT of a ``simulate`` entry: its file, labels file and patient."""

    ct: Path
    labels: Path | None
    patient: str


def _natural_key(path: Path):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def simulation_cases(spec: dict) -> list[SimulationCase]:
    """The CTs of a ``simulate`` spec (every file checked to exist).

    ``ct`` is a file, or a folder with ``glob`` (default ``*/ct.nii.gz``);
    for a folder ``labels`` is a file name beside each CT (OpenKBP's
    ``structures.nii.gz``). ``patients`` (ids, e.g. ``[pt_201, pt_202]``)
    or ``max_patients`` (the first N in natural order) choose some.
    """
    root = resolve_path(str(spec["ct"]))
    if not root.exists():
        raise FileNotFoundError(f"simulate: CT {root} not found (paths are relative to {Path.cwd()})")
    if root.is_dir():
        files = sorted((p for p, _ in dataset_files([{"path": str(root), "glob": spec.get("glob", "*/ct.nii.gz")}])),
                       key=_natural_key)
        wanted = spec.get("patients")
        if wanted:
            by_id = {patient_id(p): p for p in files}
            missing = [str(w) for w in wanted if str(w) not in by_id]
            if missing:
                raise FileNotFoundError(f"simulate: patient(s) {', '.join(missing)} not found in {root}")
            files = [by_id[str(w)] for w in wanted]
        if spec.get("max_patients"):
            files = files[: int(spec["max_patients"])]
        labels = [p.parent / spec["labels"] if spec.get("labels") else None for p in files]
    else:
        files = [root]
        labels = [resolve_path(str(spec["labels"])) if spec.get("labels") else None]
    for lab in labels:
        if lab is not None and not lab.exists():
            raise FileNotFoundError(f"simulate: labels {lab} not found")
    mask = spec.get("exclude_mask")
    if mask and not resolve_path(str(mask)).exists():
        raise FileNotFoundError(f"simulate: exclude_mask {resolve_path(str(mask))} not found")
    return [SimulationCase(ct=f, labels=lab, patient=patient_id(f)) for f, lab in zip(files, labels)]


def simulated_pairs(spec: dict, *, region=None) -> list[PairedVolume]:
    """Pairs simulated from real CTs (``variants`` MR versions with different seeds).

    ``spec``: ``ct`` (a file, or a folder of patients: :func:`simulation_cases`),
    optional ``labels`` (same grid, or a crop placed by ``labels_offset``
    [S, P, L] voxels in display orientation), ``label_scheme`` (the labels'
    legend, :data:`~training.mr_simulator.LABEL_SCHEMES`, default TotalSegmentator), ``contrast``
    ('T1'/'T2'), ``seed``, ``variants``, ``bias``, ``noise``,
    ``orientation_fix`` (:data:`training.data.ORIENTATION_FIXES`, applied to
    CT and labels), ``resample_mm`` (the CT resampled to this isotropic
    voxel size before simulation, antialiased; without labels), ``exclude_mask`` + ``exclude_margin_mm`` (only axial
    blocks that far from the mask's voxels are kept, each its own pair: a
    lesion is never trained on). Patient ``i`` of a folder gets seeds
    ``seed + 100 i + v``.
    """
    out = []
    for i, case in enumerate(simulation_cases(spec)):
        out.extend(_simulate_case(spec, case, int(spec.get("seed", 0)) + 100 * i, region))
    return out


def _simulate_case(spec: dict, case: SimulationCase, seed: int, region) -> list[PairedVolume]:
    ct_vol = _read_one(case.ct, "CT")
    ct = np.asarray(ct_vol.data, dtype=np.float32)
    labels = coverage = None
    if case.labels is not None:
        lab = np.asarray(_read_one(case.labels, "OT").data)
        if spec.get("labels_offset") is None and lab.shape != ct.shape:
            raise ValueError(f"labels {lab.shape} are not on the CT's grid {ct.shape}; "
                             "give labels_offset for a crop")
        labels = _place_labels(lab.astype(np.int16), ct.shape, spec.get("labels_offset"))
        coverage = _place_labels(np.ones(lab.shape, dtype=bool), ct.shape, spec.get("labels_offset"))
    fixes = spec.get("orientation_fix")
    spacing, affine = ct_vol.spacing, ct_vol.affine
    if fixes:  # the affine no longer describes the array: the evaluation uses the spacing
        ct, spacing = fix_orientation(ct, ct_vol.spacing, fixes)
        if labels is not None:
            labels, _ = fix_orientation(labels, ct_vol.spacing, fixes)
            coverage, _ = fix_orientation(coverage, ct_vol.spacing, fixes)
        affine = None
    if spec.get("resample_mm"):  # a thin-slice CT simulated at the model's pixel size: a fraction of the memory
        if labels is not None or spec.get("exclude_mask"):
            raise ConfigError(f"simulate {case.ct}: resample_mm works without labels and exclude_mask")
        ct = resample_isotropic(ct, spacing, float(spec["resample_mm"])).astype(np.float32)
        spacing, affine = (float(spec["resample_mm"]),) * 3, None
    blocks = [slice(0, ct.shape[0])]
    if spec.get("exclude_mask"):
        mask = np.asarray(_read_one(resolve_path(str(spec["exclude_mask"])), "OT").data) > 0
        if mask.shape != ct_vol.data.shape:
            raise ConfigError(f"exclude_mask {spec['exclude_mask']} has shape {mask.shape}, its CT {ct_vol.data.shape}")
        if fixes:
            mask, _ = fix_orientation(mask, ct_vol.spacing, fixes)
        blocks = excluded_blocks(mask, spacing[0], float(spec.get("exclude_margin_mm", 10.0)),
                                 int(spec.get("min_slices", 4)))
    out = []
    for block in blocks:
        sub = ct[block]
        sub_labels = labels[block] if labels is not None else None
        sub_cover = coverage[block] if coverage is not None else None
        sub_affine = slab_affine(affine, block.start) if affine is not None and block.start else affine
        for v in range(int(spec.get("variants", 1))):
            sim = simulate_mr(sub, sub_labels, contrast=spec.get("contrast", "T1"), seed=seed + v,
                              bias=float(spec.get("bias", 0.15)), noise=float(spec.get("noise", 0.02)),
                              label_coverage=sub_cover, label_scheme=spec.get("label_scheme", "totalsegmentator"))
            where = f", slices {block.start}-{block.stop - 1}" if len(blocks) > 1 or block.start else ""
            name = str(case.ct) if case.ct != resolve_path(str(spec["ct"])) else str(spec["ct"])
            out.append(PairedVolume(ct=sub, mr=sim.mr, mask=sim.mask, spacing=spacing,
                                    region=region_index(region), source=f"{name} (simulated "
                                    f"{sim.contrast}w, seed {seed + v}{where})",
                                    affine=sub_affine, mr_clean=sim.clean, patient=case.patient))
    return out


def _entry_pairs(entry: dict, *, held_out: bool = False) -> list[PairedVolume]:
    region = entry.get("region")
    if "simulate" in entry:
        pairs = simulated_pairs(entry["simulate"], region=region)
    elif "synthrad" in entry:
        spec = entry["synthrad"]
        pairs = [read_pair(f, region=region) for f in synthrad_pairs(spec["root"], spec.get("regions"))]
    elif "folder" in entry:
        pairs = [read_pair(f, region=region) for f in folder_pairs(entry["folder"]["root"])]
    else:
        raise ValueError(f"unknown pair source {entry!r}: use simulate, synthrad or folder")
    for pair in pairs:
        pair.held_out = held_out
        if "holdout_fraction" in entry:
            pair.holdout_fraction = float(entry["holdout_fraction"])
        if "holdout_side" in entry:
            pair.holdout_side = entry["holdout_side"]
    return pairs


def load_pairs(data_config: dict) -> list[PairedVolume]:
    """Every pair of a config's ``data.pairs`` list (see the module docstring)."""
    pairs = []
    for entry in data_config["pairs"]:
        pairs.extend(_entry_pairs(entry))
    if not pairs:
        raise ValueError("no training pairs found")
    return pairs


def load_heldout_pairs(data_config: dict) -> list[PairedVolume]:
    """The held-out patients of ``data.heldout_pairs`` (every slice held out)."""
    return [p for entry in data_config.get("heldout_pairs") or [] for p in _entry_pairs(entry, held_out=True)]


def _entry_patients(entry: dict) -> list[tuple[str, Path]]:
    if "simulate" in entry:
        return [(c.patient, c.ct.resolve()) for c in simulation_cases(entry["simulate"])]
    if "synthrad" in entry:
        spec = entry["synthrad"]
        return [(f.case.split("/")[-1], f.ct.resolve()) for f in synthrad_pairs(spec["root"], spec.get("regions"))]
    if "folder" in entry:
        return [(f.case, f.ct.resolve()) for f in folder_pairs(entry["folder"]["root"])]
    raise ValueError(f"unknown pair source {entry!r}: use simulate, synthrad or folder")


def check_pair_split(data_config: dict) -> dict:
    """Check a translation config's pairs before anything is loaded: every
    file exists and no patient (same file or same patient id, as
    :func:`training.data.patient_id` names it) is in ``data.pairs`` and in
    ``data.heldout_pairs``. Returns ``{"pairs": [...], "heldout_pairs": [...]}``
    (patient ids).

    Raises
    ------
    FileNotFoundError
        A CT, labels file, mask or patient named by the config is missing.
    ConfigError
        A patient is in both lists.
    """
    found = {key: [p for e in data_config.get(key) or [] for p in _entry_patients(e)]
             for key in ("pairs", "heldout_pairs")}
    train_ids = {pid: path for pid, path in found["pairs"]}
    train_paths = {path for _, path in found["pairs"]}
    for pid, path in found["heldout_pairs"]:
        if pid in train_ids or path in train_paths:
            other = train_ids.get(pid, path)
            raise ConfigError(f"patient {pid!r} is in data.pairs ({other}) and in data.heldout_pairs ({path}): "
                              "split by patient")
    return {key: [pid for pid, _ in value] for key, value in found.items()}


def holdout_block(n: int, pair: PairedVolume, data_config: dict) -> slice:
    """Axial slices of a pair held out: all of a held-out patient's, else the
    pair's own (or the config's) ``holdout_fraction`` at ``holdout_side``."""
    if pair.held_out:
        return slice(0, n)
    fraction = pair.holdout_fraction if pair.holdout_fraction is not None else \
        float(data_config.get("holdout_fraction", 0.0))
    side = pair.holdout_side or data_config.get("holdout_side", "superior")
    k = int(round(fraction * n))
    if side == "superior":
        return slice(n - k, n)
    if side == "inferior":
        return slice(0, k)
    raise ValueError(f"holdout_side must be 'superior' or 'inferior', got {side!r}")


# -- normalisation and the training dataset -------------------------------------------------

def translation_rules(config: dict) -> tuple[dict, dict]:
    """(source rule, target rule) of a translation config: ``source_normalization``
    and ``normalization`` (the generated image's, as for every checkpoint),
    defaulting to the CT HU window and the MR robust percentiles by direction."""
    direction = config.get("direction")
    if direction not in DIRECTIONS:
        raise ValueError(f"translation config needs direction: {' or '.join(DIRECTIONS)}")
    ct2mr = direction == "ct2mr"
    source = config.get("source_normalization") or (DEFAULT_CT_NORMALIZATION if ct2mr else DEFAULT_MR_NORMALIZATION)
    target = config.get("normalization") or (DEFAULT_MR_NORMALIZATION if ct2mr else DEFAULT_CT_NORMALIZATION)
    return dict(source), dict(target)


def normalize_pair(pair: PairedVolume, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) of a pair in [-1, 1]. MR: the volume's robust range
    (the same :func:`~napari_mediffuse.engine.intensity.intensity_range` as at
    inference); CT: the fixed HU window.

    ``data.mr_target: clean`` (CT -> MR, simulated pairs): the target is the
    simulator's MR without bias field and noise, in the acquired MR's range
    (so in the same units). Neither can be predicted from the CT: a model
    trained on acquired MR learns to draw a random bias field and noise, which
    are artefacts, not anatomy.
    """
    src_rule, tgt_rule = translation_rules(config)
    ct_first = config["direction"] == "ct2mr"
    src_data, tgt_data = (pair.ct, pair.mr) if ct_first else (pair.mr, pair.ct)
    mr_target = config["data"].get("mr_target", "acquired")
    if mr_target not in ("acquired", "clean"):
        raise ValueError(f"data.mr_target must be 'acquired' or 'clean', got {mr_target!r}")
    tgt_range = intensity_range(tgt_data, tgt_rule)
    if mr_target == "clean" and ct_first:
        if pair.mr_clean is None:
            raise ValueError(f"{pair.source}: data.mr_target 'clean' needs simulated pairs")
        tgt_data = pair.mr_clean
    return (normalize(src_data, src_rule, intensity_range(src_data, src_rule)),
            normalize(tgt_data, tgt_rule, tgt_range))


@dataclass
class TranslationVolume:
    """Normalised source/target of one pair, resampled, with its held-out block."""

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    region: int
    name: str
    holdout: slice      # axial (axis 0) indices held out
    train: slice


def _consumed(items: list):
    """Yield the items of a list, removing each from it first."""
    items.reverse()
    while items:
        yield items.pop()


def prepare_volumes(config: dict, pairs: list[PairedVolume] | None = None) -> list[TranslationVolume]:
    """Normalise, resample to ``data.spacing_mm`` and split every pair.

    The held-out block is the ``holdout_fraction`` of axial slices at the
    ``holdout_side`` ('superior', default, or 'inferior') of each volume
    (:func:`holdout_block`: a pair's own values first; the patients of
    ``data.heldout_pairs`` are held out whole). Without ``pairs`` the
    config's are checked (:func:`check_pair_split`) and read, held-out
    patients included. ``data.crop_to_body: true`` crops each pair to its
    body mask (plus 4 voxels) before resampling; ``data.storage_dtype:
    float16`` halves the memory of the resampled volumes.
    """
    data = config["data"]
    if pairs is None:
        check_pair_split(data)
        # entry by entry, each pair dropped once resampled: native volumes do not pile up
        pairs = (p for key, held in (("pairs", False), ("heldout_pairs", True))
                 for entry in data.get(key) or [] for p in _consumed(_entry_pairs(entry, held_out=held)))
    spacing = float(data.get("spacing_mm", 0) or 0)
    dtype = np.dtype(data.get("storage_dtype", "float32"))
    out = []
    for pair in pairs:
        source, target = normalize_pair(pair, config)
        mask = pair.mask
        if data.get("crop_to_body"):
            box = body_box(mask.astype(np.float32), 0.5, margin=4)
            source, target, mask = source[box], target[box], mask[box]
        if spacing:
            zoom = [s / spacing for s in pair.spacing]
            if not np.allclose(zoom, 1.0, atol=1e-3):
                source = ndimage.zoom(source, zoom, order=1, mode="nearest")
                target = ndimage.zoom(target, zoom, order=1, mode="nearest")
                mask = ndimage.zoom(mask.astype(np.float32), zoom, order=1) > 0.5
        n = source.shape[0]
        holdout = holdout_block(n, pair, data)
        train = slice(0, 0) if holdout == slice(0, n) else \
            (slice(0, holdout.start) if holdout.stop == n else slice(holdout.stop, n))
        out.append(TranslationVolume(source=source.astype(dtype), target=target.astype(dtype),
                                     mask=mask, region=pair.region, name=pair.source,
                                     holdout=holdout, train=train))
    if not any(v.train.stop > v.train.start for v in out):
        raise ValueError("no training pairs found")
    return out


def context_stack(volume: np.ndarray, axis: int, index: int, k: int, step: int = 1) -> np.ndarray:
    """Slices ``index - k*step .. index + k*step`` (every ``step``) along ``axis``,
    clamped at the volume's ends: (2k+1, H, W), the centre slice in the middle."""
    n = volume.shape[axis]
    idx = np.clip(index + step * np.arange(-k, k + 1), 0, n - 1)
    return np.stack([np.take(volume, int(i), axis=axis) for i in idx])


def _oriented(stack: np.ndarray, orientation: str) -> np.ndarray:
    return stack[:, ::-1] if orientation != "axial" else stack  # superior at the top


class PairedSlices(SampleStream):
    """Endless stream of (target slice, source context) training samples.

    Each sample: ``image`` (1, P, P) target, ``condition`` (2k+1, P, P) source
    slices centred on the target's, ``coords`` (2, P, P), ``region``. A patch
    is a random crop at native resolution, or (``image_level_probability``)
    the whole slice padded square and resized. In the training part the
    condition is replaced by zeros with probability ``condition_dropout``
    (classifier-free guidance on the image condition).
    """

    def __init__(self, volumes: list[TranslationVolume], data_config: dict, *, seed: int = 0,
                 rank: int = 0, part: str = "train"):
        super().__init__()
        self.volumes = volumes
        self.patch = int(data_config["patch_size"])
        self.k = int(data_config.get("context_slices", 1))
        self.p_image = float(data_config.get("image_level_probability", 0.2))
        self.p_drop = float(data_config.get("condition_dropout", 0.1)) if part == "train" else 0.0
        self.min_body = float(data_config.get("min_body_fraction", 0.05))
        orient = data_config.get("orientations", {"axial": 1.0})
        self.orientations = [o for o in ORIENTATIONS if orient.get(o, 0) > 0]
        weights = np.array([orient[o] for o in self.orientations], dtype=float)
        self.orientation_p = weights / weights.sum()
        self.augment = bool(data_config.get("augment", False)) and part == "train"
        self.seed, self.rank, self.part = seed, rank, part
        self.parts = []
        for v in volumes:
            block = v.train if part == "train" else v.holdout
            sub = (v.source[block], v.target[block], v.mask[block])
            if sub[0].shape[0] > 0:
                self.parts.append((v, sub))
        if not self.parts:
            raise ValueError(f"no {part} slices: check data.holdout_fraction")
        # by size, or by data.region_weights first (30 neck boxes must not drown one abdomen)
        self.part_p = volume_probabilities([p[1][0].size for p in self.parts], [p[0].region for p in self.parts],
                                           data_config.get("region_weights"))

    def sample(self, rng: np.random.Generator, augment=None) -> dict:
        volume, (source, target, mask) = self.parts[int(rng.choice(len(self.parts), p=self.part_p))]
        orientation = self.orientations[int(rng.choice(len(self.orientations), p=self.orientation_p))]
        axis = PLANE_AXIS[orientation]
        # prefer slices with body in them (mostly-air slices teach little)
        for _ in range(10):
            index = int(rng.integers(0, source.shape[axis]))
            if np.take(mask, index, axis=axis).mean() >= self.min_body:
                break
        stack = np.concatenate([np.take(target, index, axis=axis)[None],
                                context_stack(source, axis, index, self.k)])
        stack = np.ascontiguousarray(_oriented(stack, orientation), dtype=np.float32)
        if augment is not None:
            stack = augment(stack)
        if rng.random() < self.p_image:
            stack, coords = image_level(stack, self.patch)
        else:
            stack, coords = stacked_patch(stack, self.patch, rng)
        condition = stack[1:]
        if self.p_drop and rng.random() < self.p_drop:
            condition = np.zeros_like(condition)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(stack[:1])),
            "condition": torch.from_numpy(np.ascontiguousarray(condition)),
            "coords": torch.from_numpy(np.ascontiguousarray(coords)),
            "region": torch.tensor(volume.region, dtype=torch.long),
        }

    def augmentation(self, seed: int):
        return make_augmentation(seed) if self.augment else None


def make_datasets(config: dict, *, seed: int = 0, rank: int = 0):
    """(train, validation) datasets of a translation config, for the shared trainer."""
    volumes = prepare_volumes(config)
    data = config["data"]
    return (PairedSlices(volumes, data, seed=seed, rank=rank, part="train"),
            PairedSlices(volumes, data, seed=seed, part="val"))


def card_fields(config: dict) -> dict:
    """Card entries a translation checkpoint needs at inference (see
    :mod:`napari_mediffuse.tasks.translate`)."""
    source_rule, _ = translation_rules(config)
    direction = config["direction"]
    data = config["data"]
    simulated = any("simulate" in e for e in data["pairs"])
    return {
        "direction": direction,
        "source_modality": "CT" if direction == "ct2mr" else "MR",
        "target_modality": "MR" if direction == "ct2mr" else "CT",
        "source_normalization": source_rule,
        "context_slices": int(data.get("context_slices", 1)),
        "slice_spacing_mm": data.get("spacing_mm"),
        "condition_dropout": float(data.get("condition_dropout", 0.1)),
        "contrast": config.get("contrast"),
        "output_range": list(MR_OUTPUT_RANGE) if direction == "ct2mr" else None,
        "trained_on_simulated_pairs": simulated,
    }
