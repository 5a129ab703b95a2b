"""Sinusoidal position embedding of pixel coordinates (MedDiff-FM Eq. 5-6).

Each pixel of an image-level input or a patch gets its coordinates in the
*whole* slice (or volume), normalised to [-1, 1], encoded as

    PE(p) = [sin(2^0 pi p), cos(2^0 pi p), ..., sin(2^(L-1) pi p), cos(2^(L-1) pi p)]

for each axis, and these 2L channels per axis are concatenated to the network
input. A patch thus knows where in the body it lies, and a network trained on
patches can be applied to whole slices of any size.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def normalized_coordinates(start: float, stop: float, full: float, *, device=None,
                           dtype=torch.float32) -> torch.Tensor:
    """Coordinates in [-1, 1] of pixels ``start..stop-1`` of an axis of length ``full``.

    Pixel centres: pixel 0 maps to -1 and pixel ``full - 1`` to +1. ``start``
    and ``full`` may be fractional (a crop resampled to another pixel size:
    its first pixel's place in the whole, resampled, slice).
    """
    index = start + torch.arange(int(round(stop - start)), device=device, dtype=dtype)
    if full <= 1:
        return torch.zeros_like(index)
    return index * (2.0 / (full - 1)) - 1.0


def coordinate_grid(window, full_shape, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised coordinates of a window of a full image.

    Parameters
    ----------
    window : sequence of (start, stop)
        The window's extent along each spatial axis, in pixels of the full image.
        For an image-level input resized from the whole slice use
        ``[(0, n) for n in resized_shape]`` with ``full_shape = resized_shape``.
    full_shape : sequence of int
        Size of the full image along each axis.

    Returns
    -------
    Tensor, shape (ndim, *window_shape)
        Channel ``a`` holds the coordinate along axis ``a``.
    """
    axes = [normalized_coordinates(a, b, n, device=device, dtype=dtype)
            for (a, b), n in zip(window, full_shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def encode_positions(coords: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """Sinusoidal encoding of coordinate channels.

    Parameters
    ----------
    coords : Tensor, shape (B, D, *spatial)
        Normalised coordinates (see :func:`coordinate_grid`).
    num_frequencies : int
        L: frequencies 2^0 .. 2^(L-1).

    Returns
    -------
    Tensor, shape (B, 2 * L * D, *spatial)
        For each axis d and frequency l: sin then cos of ``2^l * pi * p``.
    """
    if num_frequencies <= 0:
        return coords[:, :0]
    freqs = (2.0 ** torch.arange(num_frequencies, device=coords.device, dtype=coords.dtype)) * math.pi
    # (B, D, 1, *spatial) * (L,) -> (B, D, L, *spatial)
    view = (1, 1, num_frequencies) + (1,) * (coords.dim() - 2)
    angles = coords.unsqueeze(2) * freqs.view(view)
    encoded = torch.stack((torch.sin(angles), torch.cos(angles)), dim=3)  # B, D, L, 2, ...
    return encoded.flatten(1, 3)


def num_position_channels(spatial_dims: int, num_frequencies: int) -> int:
    """Channels added by :func:`encode_positions`."""
    return 2 * num_frequencies * spatial_dims


def body_extent(data, axis: int, threshold: float, margin: int = 4) -> tuple[int, int]:
    """(start, stop) of the slices along ``axis`` that hold voxels above
    ``threshold`` (the body, table included), grown by ``margin`` slices; the
    whole axis when none do. The training volumes are cropped to this box, so
    the third coordinate of a slice is measured in it (:func:`slice_coordinates`)."""
    data = np.asarray(data)
    n = data.shape[axis]
    other = tuple(a for a in range(data.ndim) if a != axis)
    idx = np.nonzero((data > threshold).any(axis=other))[0]
    if idx.size == 0:
        return 0, n
    return max(0, int(idx[0]) - margin), min(n, int(idx[-1]) + 1 + margin)


def slice_coordinates(indices, start: int, stop: int):
    """Coordinates in [-1, 1] of slices ``indices`` of a volume whose body
    spans slices ``start .. stop - 1`` (MedDiff-FM's 3D position, the third
    axis of a 2D prior). Slices outside the body are clipped to its ends."""
    indices = np.asarray(indices, dtype=np.float64)
    if stop - start <= 1:
        return np.zeros(indices.shape, dtype=np.float32)
    coords = (indices - start) * (2.0 / (stop - 1 - start)) - 1.0
    return np.clip(coords, -1.0, 1.0).astype(np.float32)
