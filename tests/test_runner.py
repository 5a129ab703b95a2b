"""The slice runner, per-slice noise, devices and precision (engine level)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mediffuse.engine.devices import autocast_dtype, available_devices, sampler_dtype, select_device
from napari_mediffuse.engine.runner import SliceNoise, SliceRunner, slice_seed
from napari_mediffuse.engine.sampling import randn


def test_slice_noise_is_the_same_alone_and_in_a_batch():
    batch = SliceNoise.for_slices(7, [3, 4, 5]).randn((3, 1, 8, 8))
    alone = SliceNoise.for_slices(7, [4]).randn((1, 1, 8, 8))
    np.testing.assert_array_equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    other_stream = SliceNoise.for_slices(7, [4], stream=1).randn((1, 1, 8, 8))
    assert not torch.equal(alone, other_stream)
    assert slice_seed(7, 0, 4) != slice_seed(8, 0, 4)


def test_randn_takes_slice_noise_and_places_on_the_device_in_the_sampler_dtype():
    noise = randn((2, 1, 4, 4), SliceNoise.for_slices(0, [0, 1]), torch.device("meta"), torch.float64)
    assert noise.device.type == "meta" and noise.dtype == torch.float64
    with pytest.raises(ValueError, match="noise for 3 samples"):
        SliceNoise.for_slices(0, [0, 1]).randn((3, 1, 4, 4))


def test_runner_batches_keys_noise_by_slice_index_and_offset():
    seen = {}

    def fn(index, noise, progress):
        draws = noise.randn((len(index), 2))
        for i, d in zip(index, draws):
            seen.setdefault(int(i), []).append(d)
        return draws.numpy()

    a = SliceRunner("cpu", seed=1, batch_size=1).run(range(4), fn)
    b = SliceRunner("cpu", seed=1, batch_size=3).run(range(4), fn)
    np.testing.assert_array_equal(a, b)
    # a slab starting at slice 2 draws what slices 2.. drew in the whole run
    c = SliceRunner("cpu", seed=1, batch_size=2, index_offset=2).run(range(2), fn)
    np.testing.assert_array_equal(c, a[2:])


def test_runner_reports_progress_and_cancels_between_batches():
    from napari_mediffuse.engine.control import Cancelled

    calls = []
    SliceRunner("cpu", batch_size=2, progress=lambda d, n, m="": calls.append((d, n))).run(
        range(5), lambda i, n, p: np.zeros(len(i)), cost=3)
    assert calls[-1] == (9, 9)
    with pytest.raises(Cancelled):
        SliceRunner("cpu", cancel=lambda: True).run(range(2), lambda i, n, p: np.zeros(len(i)))


def test_runner_dry_run_on_meta_gives_zeros_of_the_shape():
    runner = SliceRunner(torch.device("meta"))
    t = runner.tensor(np.ones((2, 5, 6), np.float32))
    assert t.device.type == "meta" and t.shape == (2, 1, 5, 6)
    out = runner.numpy(t)
    assert out.shape == (2, 5, 6) and not out.any()


def test_missing_devices_are_named_with_the_ones_present():
    assert available_devices(cuda_available=False, mps_is_available=False) == ["cpu"]
    with pytest.raises(ValueError, match=r"devices here: cpu, mps"):
        select_device("cuda", cuda_available=False, mps_is_available=True)
    with pytest.raises(ValueError, match=r"devices here: cpu$"):
        select_device("mps", cuda_available=False, mps_is_available=False)
    with pytest.raises(ValueError, match="cuda:N"):
        select_device("cuda:x", cuda_available=True)
    assert select_device(torch.device("meta")).type == "meta"


def test_bf16_is_refused_on_a_gpu_without_it_and_mps_samples_in_float32():
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="bf16.*fp16 or fp32"):
        autocast_dtype(cuda, "bf16", bf16_supported=False)
    assert autocast_dtype(cuda, "bf16", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype(cuda, "fp16", bf16_supported=False) == torch.float16
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert sampler_dtype(torch.device("mps")) == torch.float32
    assert sampler_dtype(torch.device("cuda")) == torch.float64


def test_the_default_batch_is_32_slices_on_a_cuda_gpu_and_4_elsewhere():
    from napari_mediffuse.engine.devices import resolve_batch_size

    assert resolve_batch_size(None, torch.device("cuda", 1)) == 32
    assert resolve_batch_size(None, "cpu") == resolve_batch_size(None, "meta") == resolve_batch_size(None, "mps") == 4
    assert resolve_batch_size(None) == 4  # loops that do not halve on running out of memory
    assert resolve_batch_size(2, "cuda") == 2
    with pytest.raises(ValueError, match="at least 1, got 0"):
        resolve_batch_size(0, "cpu")
    assert SliceRunner("meta").batch_size == 4 and SliceRunner("cpu", batch_size=16).batch_size == 16


def out_of_memory_above(limit: int, *, after_steps: int = 0, message: str = ""):
    """A batch function that fails as a GPU without room does when handed more than ``limit``
    slices (CUDA's own error, or a RuntimeError saying ``message``), after reporting
    ``after_steps`` of its 4 steps, and keeps how many slices each call was given."""
    calls = []

    def fn(index, noise, progress):
        calls.append(len(index))
        for step in range(1, 5):
            if step > after_steps and len(index) > limit:
                if message:
                    raise RuntimeError(message)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            progress(step, 4)
        return noise.randn((len(index), 3)).numpy() + np.asarray(index)[:, None]
    return fn, calls


@pytest.mark.parametrize("after_steps, message", [(0, ""), (2, ""), (3, "MPS backend out of memory")])
def test_a_gpu_out_of_memory_halves_the_batch_and_gives_the_same_result(after_steps, message):
    reference = SliceRunner("cpu", seed=3, batch_size=1).run(range(11), out_of_memory_above(100)[0], cost=4)
    fn, calls = out_of_memory_above(3, after_steps=after_steps, message=message)
    reports = []
    runner = SliceRunner("cpu", seed=3, batch_size=8, progress=lambda d, t, m: reports.append((d, t)))
    out = runner.run(range(11), fn, cost=4)
    np.testing.assert_array_equal(out, reference)  # noise is per slice: halving changes nothing
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1] and runner.batch_size == 2
    done = [d for d, _ in reports]
    # progress keeps the plan's total (2 batches of 4 steps) and never goes back, though the
    # failed batches had reported some of their steps before running out
    assert {t for _, t in reports} == {8} and done == sorted(done) and done[-1] == 8


def test_progress_of_runs_sharing_a_runner_stays_within_the_planned_total():
    # the inpainting pattern: one runner, groups of slices, one total planned up front
    fn, _ = out_of_memory_above(2)
    reports = []
    runner = SliceRunner("cpu", batch_size=8, progress=lambda d, t, m: reports.append((d, t)))
    groups = [np.arange(8), np.arange(8, 16)]
    total = sum(len(runner.batches(g)) for g in groups) * 4
    offset = 0
    for group in groups:
        runner.run(group, fn, cost=4, progress_offset=offset, progress_total=total)
        offset += len(runner.batches(group)) * 4
    done = [d for d, _ in reports]
    assert total == 8 and done == sorted(done) and done[-1] == 8


def test_out_of_memory_at_one_slice_and_other_errors_are_raised():
    fn, calls = out_of_memory_above(0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        SliceRunner("cpu", batch_size=4).run(range(5), fn)
    assert calls == [4, 2, 1]

    def broken(index, noise, progress):
        calls.append(len(index))
        raise RuntimeError("expected all tensors to be on the same device")
    calls.clear()
    with pytest.raises(RuntimeError, match="same device"):
        SliceRunner("cpu", batch_size=4).run(range(5), broken)
    assert calls == [4]  # not retried: only running out of memory is
