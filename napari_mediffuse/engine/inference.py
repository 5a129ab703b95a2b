"""Noise prediction on images of any size: whole-image or sliding windows.

:class:`NoisePredictor` is the MONAI-style *inferer* of this project: it
holds a network on a device and evaluates it on a batch of (padded) images
either in one pass (the network is fully convolutional and gets each pixel's
coordinates, so a prior trained on patches applies to whole slices), or by
overlapping windows whose noise estimates are blended with Gaussian weights
(MedDiff-FM's sliding-window sampling; ``monai.inferers``) when memory
requires it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .devices import autocast, autocast_dtype, select_device
from .networks import DiffusionNetwork
from .position import coordinate_grid


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect"):
    """Pad the spatial axes of ``x`` (B, C, *spatial) at the end to multiples.

    Returns the padded tensor and the original spatial shape (to crop back).
    """
    spatial = tuple(x.shape[2:])
    pads = []
    for n in reversed(spatial):
        extra = (-n) % multiple
        pads.extend([0, extra])
    if not any(pads):
        return x, spatial
    if mode == "reflect" and any(p >= n for p, n in zip(pads[1::2], reversed(spatial))):
        mode = "replicate"  # reflect needs the pad smaller than the image
    return F.pad(x, pads, mode=mode), spatial


def crop_to(x: torch.Tensor, spatial) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]


class NoisePredictor:
    """Evaluate a :class:`DiffusionNetwork` on images of any size.

    Parameters
    ----------
    network : DiffusionNetwork
    device : str or torch.device
        'auto' (CUDA, MPS, CPU), 'cpu', 'cuda', 'mps'.
    precision : str
        'auto' (bf16/fp16 on GPU, fp32 on CPU), 'fp32', 'fp16', 'bf16'.
    window : int or sequence of int, optional
        Sliding-window size in pixels; ``None`` evaluates whole images.
    overlap : float
        Fraction of window overlap for sliding windows.
    window_batch : int
        Windows evaluated together.
    schedule : dict, optional
        The checkpoint's noise schedule: when its ``prediction_type`` is not
        ``'epsilon'`` (v-prediction, sample), outputs are converted to noise
        estimates, so samplers and tasks always get epsilon.
    """

    def __init__(self, network: DiffusionNetwork, device="auto", precision="auto", *,
                 window=None, overlap: float = 0.5, window_batch: int = 8, schedule: dict | None = None):
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.network = network.to(self.device).eval()
        self.window = window
        self.overlap = overlap
        self.window_batch = window_batch
        self.prediction_type = "epsilon"
        #: without a schedule the network's output is returned as it is (a segmenter's logits)
        self.raw_outputs = schedule is None
        if schedule is not None:
            from .schedulers import alphas_cumprod, complete_schedule

            self.prediction_type = complete_schedule(schedule)["prediction_type"]
            self._abar = alphas_cumprod(schedule)

    @property
    def spatial_dims(self) -> int:
        return self.network.spatial_dims

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t, *, condition: torch.Tensor | None = None,
                 region=None, slice_position=None, extent=None) -> torch.Tensor:
        """Predicted noise for ``x_t`` (B, C, *spatial) at step ``t``.

        ``slice_position`` (B,): each slice's place along its volume's third
        axis in [-1, 1] (:func:`~.position.slice_coordinates`; NaN: not
        known), for a network that takes it (``position_axes``); others
        ignore it.

        ``extent``: ``x_t`` is a crop of larger images, ``((start, full), ...)``
        per spatial axis in pixels (``start`` may be fractional): the
        network gets each pixel's coordinates in the whole image, as it was
        trained on patches (MedDiff-FM's patch-level position). ``None``: the
        input is the whole image.
        """
        x_t = x_t.to(self.device)
        # float64 samplers (x0 from eps where abar ~ 1e-9) get float64 back;
        # the network itself always runs in float32 (or autocast's half type)
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        x_in = x_t.float()
        if condition is not None:
            condition = condition.to(self.device).float()
        spatial = tuple(x_t.shape[2:])
        starts, full = (((0,) * len(spatial), spatial) if extent is None
                        else tuple(zip(*[(float(a), float(n)) for a, n in extent])))
        window = self._window_for(spatial)
        with autocast(self.device, self.dtype):
            slices = self._slice_positions(slice_position, x_in)
            if window is None:
                eps = self._whole(x_in, t, condition, region, slices, starts, full)
            else:
                eps = self._sliding(x_in, t, condition, region, window, slices, starts, full)
        if self.prediction_type != "epsilon":
            from .sampling import to_epsilon

            t_index = int(torch.as_tensor(t).reshape(-1)[0])
            return to_epsilon(eps.to(dtype), x_t.to(dtype), float(self._abar[t_index]), self.prediction_type)
        return eps.to(dtype)

    def _window_for(self, spatial):
        if self.window is None:
            return None
        window = (self.window,) * len(spatial) if isinstance(self.window, int) else tuple(self.window)
        if all(w >= n for w, n in zip(window, spatial)):
            return None
        return window

    def _slice_positions(self, slice_position, x_t):
        """(B,) float positions on the device, or None (the network does not take them / none given)."""
        if slice_position is None or not self.network.uses_slice_position:
            return None
        positions = torch.as_tensor(slice_position, dtype=x_t.dtype).reshape(-1).to(x_t.device)
        if positions.numel() == 1:
            positions = positions.expand(x_t.shape[0])
        if positions.numel() != x_t.shape[0]:
            raise ValueError(f"{positions.numel()} slice positions for {x_t.shape[0]} slices")
        return positions

    @staticmethod
    def _with_slices(coords: torch.Tensor, slices) -> torch.Tensor:
        """(B, D, *spatial) coordinates with each sample's slice position as one more constant axis."""
        if slices is None:
            return coords
        view = (-1, 1) + (1,) * (coords.dim() - 2)
        plane = slices.to(coords.dtype).view(view).expand(coords.shape[0], 1, *coords.shape[2:])
        return torch.cat([coords, plane], dim=1)

    def _whole(self, x_t, t, condition, region, slices, starts, full):
        spatial = tuple(x_t.shape[2:])
        multiple = self.network.size_multiple
        inputs = x_t if condition is None else torch.cat([x_t, condition], dim=1)
        padded, _ = pad_to_multiple(inputs, multiple)
        padded_shape = tuple(padded.shape[2:])
        # coordinates are those of the unpadded image (in the whole one), extended into the pad
        coords = coordinate_grid([(a, a + n) for a, n in zip(starts, padded_shape)], full,
                                 device=x_t.device, dtype=x_t.dtype)
        coords = self._with_slices(coords.unsqueeze(0).expand(x_t.shape[0], *coords.shape), slices)
        c = x_t.shape[1]
        eps = self.network(padded[:, :c], self._timesteps(t, x_t), coords=coords,
                           condition=padded[:, c:] if condition is not None else None,
                           region=self._region(region, x_t))
        return crop_to(eps, spatial)

    def _sliding(self, x_t, t, condition, region, window, slices, starts, full):
        from monai.inferers import sliding_window_inference

        c = x_t.shape[1]
        inputs = x_t if condition is None else torch.cat([x_t, condition], dim=1)
        timesteps = self._timesteps(t, x_t)
        regions = self._region(region, x_t)

        def predict(windows: torch.Tensor, locations) -> torch.Tensor:
            # MONAI passes, per window, [batch slice, channel slice, *spatial slices]
            index = torch.tensor([loc[0].start for loc in locations], device=windows.device)
            coords = torch.stack([
                coordinate_grid([(a + s.start, a + s.stop) for a, s in zip(starts, loc[2:])], full,
                                device=windows.device, dtype=windows.dtype)
                for loc in locations])
            coords = self._with_slices(coords, None if slices is None else slices[index])
            return self.network(windows[:, :c], timesteps[index], coords=coords,
                                condition=windows[:, c:] if condition is not None else None,
                                region=None if regions is None else regions[index])

        return sliding_window_inference(
            inputs, roi_size=window, sw_batch_size=self.window_batch,
            predictor=predict, overlap=self.overlap, mode="gaussian", padding_mode="replicate",
            with_coord=True)

    def _timesteps(self, t, x_t):
        t = torch.as_tensor(t, device=x_t.device)
        return t.expand(x_t.shape[0]) if t.dim() == 0 else t

    def _region(self, region, x_t):
        if region is None or not self.network.uses_regions:
            return None
        region = torch.as_tensor(region, device=x_t.device).long()
        return region.expand(x_t.shape[0]) if region.dim() == 0 else region


@torch.no_grad()
def segmentation_logits(predictor: NoisePredictor, condition: torch.Tensor, *, num_train_timesteps: int,
                        region=None) -> torch.Tensor:
    """Per-pixel logits (B, 1, *spatial) of a segmentation checkpoint
    (card ``objective: segmentation``) given its ``condition`` images.

    Such a network is the diffusion network run as an image-to-image model
    (``training.trainer.segmentation_loss``): its noisy-image input is zero
    and its step the last one, as in training. ``predictor`` must return the
    network's raw output (built without a schedule, so nothing converts it to
    a noise estimate).
    """
    if not predictor.raw_outputs:
        raise ValueError("segmentation_logits needs a predictor built without a schedule (raw outputs)")
    n = condition.shape[0]
    x = torch.zeros((n, predictor.network.image_channels, *condition.shape[2:]), dtype=torch.float32,
                    device=condition.device)
    return predictor(x, int(num_train_timesteps) - 1, condition=condition, region=region)
