"""Every task end to end on a CUDA GPU (skipped without one).

Run on a GPU machine with ``python -m pytest -m gpu``. Each task runs on a
crop of the sample CT on ``cuda`` with the default precision (bf16 or fp16)
and in fp32, and is compared with the CPU run of the same seed: the noise is
drawn on the CPU, so the results differ only by the GPU's arithmetic.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse.tasks.common import RunOptions

from test_task_runs import TASKS, ct_crop  # noqa: F401  (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

#: Largest mean absolute difference from the CPU result (output units: HU, or MR units 0-1000).
TOLERANCE = {"fp32": 2.0, "auto": 25.0}


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_on_cuda_matches_the_cpu(task, precision, ct_crop):  # noqa: F811
    cpu = TASKS[task](ct_crop, RunOptions(device="cpu", seed=1, batch_size=4))
    gpu = TASKS[task](ct_crop, RunOptions(device="cuda", precision=precision, seed=1, batch_size=4))
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    diff = np.abs(gpu.astype(np.float64) - cpu.astype(np.float64)).mean()
    assert diff < TOLERANCE[precision], f"{task} {precision}: mean |GPU - CPU| = {diff:.3f}"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_automatic_batch_on_cuda_gives_the_result_of_batch_4(task, ct_crop):  # noqa: F811
    # batch_size None is 32 slices on CUDA (engine.devices.resolve_batch_size); per-slice noise
    # makes the result independent of it, up to the GPU's arithmetic in another batch shape
    four = TASKS[task](ct_crop, RunOptions(device="cuda", precision="fp32", seed=1, batch_size=4))
    auto = TASKS[task](ct_crop, RunOptions(device="cuda", precision="fp32", seed=1))
    diff = np.abs(auto.astype(np.float64) - four.astype(np.float64)).mean()
    assert diff < TOLERANCE["fp32"], f"{task}: mean |auto - batch 4| = {diff:.3f}"


def test_synthesis_and_samples_on_cuda():
    from napari_mediffuse.tasks import sample_images, synthesize

    volume = synthesize.synthesize((64, 64, 64), steps=4, options=RunOptions(device="cuda", seed=0))
    assert np.isfinite(volume.data).all() and volume.data.std() > 10
    images = sample_images.sample_images(count=4, steps=4, options=RunOptions(device="cuda", seed=0))
    assert images.shape[0] == 4 and np.isfinite(images).all()


def test_training_steps_on_cuda(tmp_path):
    from napari_mediffuse.plugin import sample_ct_path
    from training.trainer import load_config, read_log, train

    from test_training import TINY_CONFIG

    config = load_config(TINY_CONFIG)
    config["data"]["train"] = [{"path": str(sample_ct_path()), "region": "abdomen"}]
    ema = train(config, tmp_path / "run", device="cuda", max_steps=3)
    losses = [row["loss"] for row in read_log(tmp_path / "run") if "loss" in row]
    assert ema.exists() and losses and np.isfinite(losses).all()


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_lesion_segmenter_on_cuda_matches_the_cpu(precision, ct_crop, tmp_path):  # noqa: F811
    from napari_mediffuse.tasks import anomaly

    from test_anomaly_learned import save_random_segmenter

    model = str(save_random_segmenter(tmp_path / "segmenter"))
    cpu, gpu = (anomaly.detect_anomalies(ct_crop, method="learned", model=model, ensemble=2, smooth_mm=0.0,
                                         options=options).heatmap.data
                for options in (RunOptions(device="cpu", seed=1),
                                RunOptions(device="cuda", precision=precision, seed=1)))
    assert np.isfinite(gpu).all()
    # probabilities; fp32 convolutions may run in TF32 on the GPU (PyTorch's default for cuDNN)
    assert np.abs(gpu - cpu).max() < (2e-3 if precision == "fp32" else 0.02)
