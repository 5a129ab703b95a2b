"""Training packs: a config's loaded volumes in one file, trained on where the scans are not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_mediffuse.engine.intensity import denormalize
from napari_mediffuse.plugin import sample_ct_path
from training.data import ConfigError, load_volumes
from training.pack import check_pack, read_pack, write_pack
from training.trainer import load_config, read_log, train

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "ct_prior_tiny.yaml"


@pytest.fixture
def scan(tmp_path):
    """The packaged sample CT (3 mm abdomen) under a name of its own, so a test can remove it."""
    path = tmp_path / "scans" / "abdomen.nii.gz"
    path.parent.mkdir()
    path.write_bytes(sample_ct_path().read_bytes())
    return path


@pytest.fixture
def config(scan):
    config = load_config(TINY_CONFIG)
    config["data"]["train"] = [{"path": str(scan), "region": "abdomen"}]
    return config


def test_a_pack_holds_the_volumes_load_volumes_returns(tmp_path, config):
    counts = write_pack(config, tmp_path / "pack.npz")
    assert counts == {"train": 1}
    (loaded,) = load_volumes(config["data"], config["normalization"])
    (packed,) = read_pack(tmp_path / "pack.npz", "train")
    assert packed.data.dtype == np.float32 and packed.data.shape == loaded.data.shape
    # float16 storage: within 1 HU of the loaded volume everywhere (soft tissue) and 2 HU in bone
    window = (config["normalization"]["low"], config["normalization"]["high"])
    hu = lambda v: denormalize(v.data, window)  # noqa: E731
    err = np.abs(hu(packed) - hu(loaded))
    assert np.percentile(err, 99) < 1.0 and err.max() < 2.0
    assert (packed.region, packed.holdout_start, packed.patient) == (loaded.region, loaded.holdout_start,
                                                                      loaded.patient)
    assert packed.spacing_mm == pytest.approx(loaded.spacing_mm)


def test_training_runs_from_a_pack_when_the_scans_are_gone(tmp_path, config, scan):
    write_pack(config, tmp_path / "pack.npz")
    scan.unlink()  # as on a GPU machine without the data
    config["data"]["packed"] = str(tmp_path / "pack.npz")
    train(config, tmp_path / "run", device="cpu", max_steps=2, command="pytest")
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and np.isfinite(losses).all()
    from napari_mediffuse.engine.checkpoint import read_card

    # the card says the model trained from a pack, and that the pack kept every slice
    assert read_card(tmp_path / "run" / "ema")["training"]["packed"] == {"path": str(tmp_path / "pack.npz"),
                                                                        "slice_step": 1}


def test_a_pack_made_with_other_data_settings_is_refused(tmp_path, config):
    write_pack(config, tmp_path / "pack.npz")
    config["data"]["packed"] = str(tmp_path / "pack.npz")
    config["data"]["spacing_mm"] = float(config["data"]["spacing_mm"]) / 2
    with pytest.raises(ConfigError, match="spacing_mm"):
        check_pack(config["data"], config["normalization"])


def test_train_cli_names_a_missing_pack_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(TINY_CONFIG),
                             "--packed", str(tmp_path / "absent.npz"), "--output", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent.npz" in lines[0] and "Traceback" not in result.stderr


def test_pack_cli_refuses_a_patient_in_both_splits_before_loading(tmp_path, config, scan):
    config["data"]["validation"] = [{"path": str(scan), "region": "abdomen"}]
    config_path = tmp_path / "both.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "training", "pack", "--config", str(config_path),
                             "--output", str(tmp_path / "pack.npz")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "split by patient" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pack.npz").exists()


def test_paired_translation_configs_do_not_pack(tmp_path):
    config = load_config(REPO / "training" / "configs" / "translate_ct2mr.yaml")
    with pytest.raises(ConfigError, match="only CT volume data"):
        write_pack(config, tmp_path / "pack.npz")
    config["data"]["packed"] = str(tmp_path / "pack.npz")
    with pytest.raises(ConfigError, match="only CT volume data"):
        check_pack(config["data"], config.get("normalization", {}))


def test_a_damaged_pack_or_another_patient_list_is_refused(tmp_path, config):
    write_pack(config, tmp_path / "pack.npz")
    config["data"]["packed"] = str(tmp_path / "pack.npz")
    other = dict(config, data=dict(config["data"], train=[{"path": "elsewhere.nii.gz", "region": "abdomen"}]))
    with pytest.raises(ConfigError, match="train"):
        check_pack(other["data"], other["normalization"])
    (tmp_path / "pack.npz").write_bytes((tmp_path / "pack.npz").read_bytes()[:1000])  # cut short
    with pytest.raises(ConfigError, match="not a training pack"):
        check_pack(config["data"], config["normalization"])
    np.save(tmp_path / "array.npy", np.zeros(3))
    config["data"]["packed"] = str(tmp_path / "array.npy")
    with pytest.raises(ConfigError, match="not a training pack"):
        check_pack(config["data"], config["normalization"])


def test_a_slice_step_keeps_every_nth_axial_slice_of_single_slice_kinds(tmp_path, config):
    with pytest.raises(ConfigError, match="only data kinds that train on single axial slices"):
        write_pack(config, tmp_path / "multi.npz", slice_step=2)  # multi-level slices cut coronal planes too
    config["data"]["kind"] = "lesion_healing"
    config["data"].pop("pixel_sizes_mm", None)
    config["data"].pop("spacing_mm", None)
    write_pack(config, tmp_path / "every4.npz", slice_step=4)
    (loaded,) = load_volumes(config["data"], config["normalization"])
    (packed,) = read_pack(tmp_path / "every4.npz", "train")
    np.testing.assert_allclose(packed.data, loaded.data[::4], atol=1e-3)
    # the kept slices are 4 x as far apart; in-plane spacing as loaded
    assert packed.spacing_mm == pytest.approx((4 * loaded.spacing_mm[0], *loaded.spacing_mm[1:]))
    # the held-out block starts at the first kept slice at or after the loaded one
    assert packed.holdout_start == -(-loaded.holdout_start // 4) and loaded.holdout_start % 4 != 0
    check_pack(dict(config["data"], packed=str(tmp_path / "every4.npz")), config["normalization"])
    multi_level = {k: v for k, v in config["data"].items() if k != "kind"}
    with pytest.raises(ConfigError, match="keeps every 4th axial slice"):
        check_pack(dict(multi_level, packed=str(tmp_path / "every4.npz")), config["normalization"])
    with pytest.raises(ConfigError, match="at least 1"):
        write_pack(config, tmp_path / "none.npz", slice_step=0)
