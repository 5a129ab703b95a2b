"""Packed training volumes: a config's loaded data in one ``.npz`` file.

A GPU machine may not hold the dataset (a lent accelerator here has no
copy of ``../shared/data`` and takes at most 64 MiB with it). ``python -m
training pack`` runs :func:`training.data.load_volumes` here, on the files,
and writes what it returns (the normalised, cropped, resampled volumes of
``data.train`` and ``data.validation``, their regions, spacings and patient
ids) as float16 into one compressed file; a config with ``data.packed:
FILE`` then trains from it instead of the files::

    python -m training pack --config training/configs/ct_prior_coarse_3d_8mm.yaml --output pack.npz
    python -m training train --config ... --packed pack.npz --output runs/x --device cuda

``--slice-step N`` keeps every N-th axial slice (data kinds that train on
axial slices one at a time, :data:`AXIAL_KINDS`): the lesion segmenter's
174 native-resolution volumes are 140 MiB whole, 35 MiB at N = 4, every
patient still in. The kept slices' spacing is recorded as N times the
volume's.

The patient split is checked when the pack is made (the files are there)
and again on the pack's patient lists when it is read. A pack remembers the
data settings that shaped its arrays and refuses a config that asks for
other ones, so a stale pack cannot train a model on another grid.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .data import ConfigError, TrainingVolume, check_data_config, load_volumes, loading_config, resolve_path

#: data settings that change the arrays (a pack made under other ones is another dataset), the
#: file entries included: a pack of another patient list would train on patients the card does not name
SHAPING_KEYS = ("train", "validation", "evaluation_only", "spacing_mm", "pixel_sizes_mm", "crop_to_body_hu",
                "holdout_fraction", "anatomy_channels", "augment_spacing_mm")
SPLITS = ("train", "validation")
#: data kinds that sample single axial slices (a pack may keep every N-th of them)
AXIAL_KINDS = ("lesion_healing",)


def _require_volume_data(data_config: dict, where: str) -> None:
    if "pairs" in data_config or data_config.get("kind") == "image_folder":
        raise ConfigError(f"{where}only CT volume data packs (paired translation and image folders do not)")


def _check_slice_step(step: int, data_config: dict, where: str) -> None:
    """A pack may drop axial slices only for data kinds that train on single axial slices."""
    if step > 1 and data_config.get("kind") not in AXIAL_KINDS:
        raise ConfigError(f"{where}keeps every {step}th axial slice: only data kinds that train on single "
                          f"axial slices ({', '.join(AXIAL_KINDS)}) may drop slices, not "
                          f"{data_config.get('kind', 'multi-level')!r}")


def _shaping(data_config: dict, normalization: dict) -> dict:
    return {"data": {k: data_config.get(k) for k in SHAPING_KEYS}, "normalization": normalization}


def write_pack(config: dict, path, *, slice_step: int = 1) -> dict:
    """Load the volumes of ``config``'s train and validation splits and write
    them to ``path`` (``.npz``), every ``slice_step``-th axial slice (module
    doc). Returns ``{split: number of volumes}``."""
    data_config = {k: v for k, v in config["data"].items() if k != "packed"}
    _require_volume_data(data_config, "")
    slice_step = int(slice_step)
    if slice_step < 1:
        raise ConfigError(f"--slice-step must be at least 1, got {slice_step}")
    _check_slice_step(slice_step, data_config, "--slice-step: a pack that ")
    patients = check_data_config(data_config)
    meta = {"shaping": _shaping(data_config, config["normalization"]), "patients": patients, "volumes": {},
            "slice_step": slice_step}
    arrays = {}
    for split in SPLITS:
        if not data_config.get(split):
            continue
        rows = []
        for i, vol in enumerate(load_volumes(loading_config(data_config), config["normalization"], split=split)):
            arrays[f"{split}_{i}"] = vol.data[::slice_step].astype(np.float16)
            if vol.structures is not None:
                arrays[f"{split}_{i}_structures"] = vol.structures[::slice_step]
            spacing = [float(vol.spacing_mm[0]) * slice_step] + [float(s) for s in vol.spacing_mm[1:]]
            rows.append({"region": int(vol.region), "source": vol.source,
                         "holdout_start": -(-int(vol.holdout_start) // slice_step),
                         "spacing_mm": spacing, "patient": vol.patient,
                         "axial_span": [float(s) for s in vol.axial_span]})
        meta["volumes"][split] = rows
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial-pack.npz")  # complete or nothing
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return {split: len(rows) for split, rows in meta["volumes"].items()}


def _open_pack(path) -> tuple[np.lib.npyio.NpzFile, dict]:
    """The open pack at ``path`` (``$VARS`` expanded) and its metadata."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"data.packed {path}: no such file")
    unreadable = (OSError, ValueError, KeyError, zipfile.BadZipFile)
    try:
        pack = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ConfigError(f"data.packed {path}: not a training pack ({exc})") from None
    if not isinstance(pack, np.lib.npyio.NpzFile):
        raise ConfigError(f"data.packed {path}: not a training pack (a single array, not an .npz)")
    try:
        return pack, json.loads(str(pack["meta"]))
    except unreadable as exc:
        pack.close()
        raise ConfigError(f"data.packed {path}: not a training pack ({exc})") from None


def read_pack_meta(path) -> dict:
    pack, meta = _open_pack(path)
    pack.close()
    return meta


def check_pack(data_config: dict, normalization: dict) -> dict:
    """The pack's patients by split, after checking that it was made with this
    config's data settings and that no patient is in two splits."""
    path = data_config["packed"]
    _require_volume_data(data_config, f"data.packed {path}: ")
    meta = read_pack_meta(path)
    wanted = json.loads(json.dumps(_shaping(data_config, normalization)))  # tuples -> lists, as stored
    # a key a pack does not record (packs older than the key) was unset when it was made
    differ = sorted(k for k in wanted["data"] if wanted["data"][k] != meta["shaping"]["data"].get(k))
    if wanted["normalization"] != meta["shaping"]["normalization"]:
        differ.append("normalization")
    if differ:
        raise ConfigError(f"data.packed {path}: made with other data settings ({', '.join(differ)}); "
                          "pack it again from this config")
    _check_slice_step(int(meta.get("slice_step", 1)), data_config, f"data.packed {path}: ")
    patients = meta["patients"]
    train = set(patients.get("train", []))
    for split in ("validation", "evaluation_only"):
        both = sorted(train & set(patients.get(split, [])))
        if both:
            raise ConfigError(f"data.packed {path}: patient {both[0]!r} is in train and in {split}: split by patient")
    return patients


def read_pack(path, split: str) -> list[TrainingVolume]:
    """The ``split`` volumes of a pack (float32, as :func:`load_volumes` returns them)."""
    pack, meta = _open_pack(path)
    with pack:
        rows = meta["volumes"].get(split)
        if not rows:
            raise ValueError(f"data.packed {path}: no {split} volumes")
        volumes = []
        for i, row in enumerate(rows):
            key = f"{split}_{i}"
            structures = pack[key + "_structures"] if key + "_structures" in pack.files else None
            volumes.append(TrainingVolume(data=pack[key].astype(np.float32), region=row["region"],
                                          source=row["source"], holdout_start=row["holdout_start"],
                                          spacing_mm=tuple(row["spacing_mm"]), patient=row["patient"],
                                          structures=structures, axial_span=tuple(row["axial_span"])))
    return volumes
