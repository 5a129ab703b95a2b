"""The one slice runner every diffusion task goes through.

A task hands :class:`SliceRunner` the slices it wants processed and a
function that restores (or generates) one batch of them; the runner

* places every tensor that meets the network on the predictor's device
  (:meth:`SliceRunner.tensor`) and brings results back to host memory
  (:meth:`SliceRunner.numpy`), so no task writes placement code of its own;
* picks the sampler's float type for the device (float64 where the DDIM
  arithmetic near ``t = T`` needs it, float32 on Apple MPS, which has no
  float64);
* gives each slice its own noise stream, keyed by ``(seed, stream, slice
  index)`` and drawn on the CPU (:class:`SliceNoise`), so a result depends
  on the seed alone: not on the batch size, not on which other slices run
  with it (the panel's one-slice preview equals the same slice of the whole
  run), and not on the device;
* batches (32 slices at a time on a CUDA GPU unless told otherwise, 4
  elsewhere; a GPU that runs out of memory gets the same batch again in
  halves, with the same result, since noise is per slice), reports progress
  and checks for cancellation between batches.

A tensor on PyTorch's ``meta`` device has a shape and no values:
:meth:`SliceRunner.numpy` returns zeros for it, so a whole task can be run
with its network on ``meta`` to prove that every tensor the network meets
lives on the network's device (the tests do this on CPU-only machines).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .control import CancelCheck, ProgressCallback, ProgressSpan, check_cancel, report
from .devices import is_out_of_memory, release_cached_memory, resolve_batch_size, sampler_dtype

log = logging.getLogger(__name__)


def slice_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for slice ``index`` of noise stream ``stream`` of a run seeded ``seed``.

    NumPy's ``SeedSequence`` mixes the three numbers, so neighbouring slices
    (or seeds) get unrelated streams.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def resolve_seed(seed: Optional[int]) -> int:
    """``seed``, or a fresh random one for ``None`` (a run that is not meant to repeat)."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().generate_state(1)[0])


class SliceNoise:
    """Independent noise streams, one per sample of a batch.

    Sample ``b`` of every draw comes from generator ``b``, on the CPU, so a
    sample's noise does not depend on the batch it runs in or on the device.
    Anything that takes a ``torch.Generator`` in :mod:`.sampling` takes a
    :class:`SliceNoise` as well.

    Parameters
    ----------
    generators : sequence of torch.Generator
        One CPU generator per sample.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def for_slices(cls, seed: int, indices: Iterable[int], stream: int = 0) -> "SliceNoise":
        """Generators for slices ``indices`` of noise stream ``stream`` of seed ``seed``."""
        gens = []
        for index in indices:
            g = torch.Generator(device="cpu")
            g.manual_seed(slice_seed(seed, stream, int(index)))
            gens.append(g)
        return cls(gens)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape) -> torch.Tensor:
        """Standard normal float32 noise of ``shape`` (B, ...) on the CPU, row b from generator b."""
        shape = tuple(int(s) for s in shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples asked of {len(self.generators)} streams")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32)
                            for g in self.generators])

    def subset(self, positions: Sequence[int]) -> "SliceNoise":
        """The streams of the samples at ``positions`` of this batch (shared, not copied)."""
        return SliceNoise([self.generators[int(p)] for p in positions])


def device_of(predictor) -> torch.device:
    """Where ``predictor``'s inputs must live: its ``device`` attribute (a
    :class:`~.inference.NoisePredictor` or a function bound to one), else the CPU."""
    return torch.device(getattr(predictor, "device", "cpu"))


#: ``fn(indices, noise, progress) -> ndarray (len(indices), ...)``: process one batch.
BatchFn = Callable[[np.ndarray, SliceNoise, Optional[ProgressCallback]], np.ndarray]


class SliceRunner:
    """Batches, device placement, per-slice noise, progress and cancel for a task.

    Parameters
    ----------
    device : torch.device
        Where the network lives (``predictor.device``).
    seed : int or None
        Seed of the run; ``None`` draws one.
    batch_size : int or None
        Slices evaluated together; ``None``: the device's default
        (:func:`~.devices.resolve_batch_size`). Results do not depend on it.
        A GPU that runs out of memory halves it for the rest of the run;
        :meth:`batches` (progress totals) keeps planning with the first size.
    progress, cancel : callables, optional
        See :mod:`.control`.
    index_offset : int
        Index in the whole scan of the first slice given (a slab of a scan
        draws the same noise per slice as the whole scan).
    """

    def __init__(self, device, *, seed: Optional[int] = 0, batch_size: Optional[int] = None,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None,
                 index_offset: int = 0):
        self.device = torch.device(device)
        self.index_offset = int(index_offset)
        self.seed = resolve_seed(seed)
        self.batch_size = resolve_batch_size(batch_size, self.device)
        self.plan_size = self.batch_size  # progress is planned in these even after halving
        self.progress = progress
        self.cancel = cancel

    @classmethod
    def for_predictor(cls, predictor, options, *, index_offset: int = 0) -> "SliceRunner":
        """A runner on ``predictor``'s device with a task's :class:`RunOptions`."""
        return cls(device_of(predictor), seed=options.seed,
                   batch_size=options.batch_size, progress=options.progress, cancel=options.cancel,
                   index_offset=index_offset)

    # -- placement ---------------------------------------------------------------

    @property
    def sample_dtype(self) -> torch.dtype:
        """Float type of sampler arithmetic on this device (float64, or float32 on MPS)."""
        return sampler_dtype(self.device)

    def tensor(self, array, *, channel: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host array (B, H, W) as a (B, 1, H, W) tensor on the device (``channel=False``: as is)."""
        t = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)
        if channel:
            t = t[:, None]
        return t.to(self.device)

    def noise(self, indices: Iterable[int], stream: int = 0) -> SliceNoise:
        """Noise streams of slices ``indices`` (see :class:`SliceNoise`)."""
        return SliceNoise.for_slices(self.seed, np.asarray(list(indices)) + self.index_offset, stream)

    @staticmethod
    def host(tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in host memory as float32 (zeros for a ``meta`` tensor: a dry run)."""
        if tensor.device.type == "meta":
            return torch.zeros(tensor.shape, dtype=torch.float32)
        return tensor.detach().float().cpu()

    def numpy(self, tensor: torch.Tensor, *, channel: bool = True) -> np.ndarray:
        """A (B, 1, H, W) device tensor as a float32 (B, H, W) host array (``channel=False``: as is)."""
        out = self.host(tensor).numpy()
        return out[:, 0] if channel else out

    # -- the loop ------------------------------------------------------------------

    def batches(self, indices: Sequence[int]) -> list[np.ndarray]:
        indices = np.asarray(list(indices), dtype=np.int64)
        return [indices[s:s + self.plan_size] for s in range(0, len(indices), self.plan_size)]

    def run(self, indices: Sequence[int], fn: BatchFn, *, cost: int = 1, stream: int = 0,
            message: str = "", out: Optional[np.ndarray] = None,
            progress_offset: int = 0, progress_total: Optional[int] = None) -> np.ndarray:
        """Call ``fn`` on each batch of ``indices`` and gather the results.

        Parameters
        ----------
        indices : sequence of int
            Slices to process, in order.
        fn : callable
            ``fn(batch_indices, noise, progress)`` returns an array whose first
            axis matches ``batch_indices``; ``progress(done, cost)`` reports
            the batch's own steps.
        cost : int
            Progress units of one batch (its sampler steps).
        stream : int
            Noise stream (separates the runs of an ensemble, or two planes).
        out : ndarray, optional
            Array the results are written into, in the order of ``indices``
            (by default one is allocated at the first batch).
        progress_offset, progress_total : int
            Where this run's progress sits in a larger task.

        Returns
        -------
        ndarray
            Results stacked in the order of ``indices``.
        """
        indices = np.asarray(list(indices), dtype=np.int64)
        planned = len(self.batches(indices))
        total = progress_total if progress_total is not None else progress_offset + planned * cost
        reached = [progress_offset]

        def forward(done: int, _total: int, text: str = "") -> None:
            # a batch that ran out of memory part way has reported steps its retry reports again
            if done >= reached[0]:
                reached[0] = done
                report(self.progress, done, total, text)

        def position(count: int) -> int:  # progress after the first ``count`` slices, in planned units
            units = planned * cost if count >= len(indices) else int(round(cost * count / self.plan_size))
            return progress_offset + units

        done = 0
        while done < len(indices):
            check_cancel(self.cancel)
            index = indices[done:done + self.batch_size]
            start = position(done)
            span = ProgressSpan(forward, start, total, message,
                                scale=(position(done + len(index)) - start) / max(cost, 1))
            out_of_memory = False
            try:
                result = np.asarray(fn(index, self.noise(index, stream), span))
            except RuntimeError as error:
                if not is_out_of_memory(error) or self.batch_size == 1:
                    raise
                out_of_memory = True  # halve outside the handler: its traceback holds the batch's tensors
            if out_of_memory:
                self._halve(len(index))
                continue
            if out is None:  # results go straight into one array: no list of batches to concatenate
                out = np.empty((len(indices),) + result.shape[1:], dtype=result.dtype)
            out[done:done + len(index)] = result
            done += len(index)
            forward(position(done), total, message)
        return out if out is not None else np.empty((0,), dtype=np.float32)

    def _halve(self, failed: int) -> None:
        self.batch_size = max(1, self.batch_size // 2)
        release_cached_memory(self.device)
        log.warning("%s ran out of memory with %d slices at once; going on with %d", self.device, failed,
                    self.batch_size)
