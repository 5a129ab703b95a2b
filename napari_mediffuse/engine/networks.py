"""The one network definition used by inference and training.

:class:`DiffusionNetwork` wraps a UNet backbone (diffusers ``UNet2DModel`` in
2D, MONAI ``DiffusionModelUNet`` in 2D or 3D) and adds the MedDiff-FM
conditioning: sinusoidal position channels of each pixel's coordinates in the
whole image (and, for a 2D prior with ``position_axes: 3``, of its slice's
place along the volume's third axis: MedDiff-FM's 3D position), an optional
coarse body-region class, and optional conditioning
channels (the source image for translation, neighbouring slices...). It is
configured by a plain dict (saved in the checkpoint's JSON), like diffusers'
models.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .position import coordinate_grid, encode_positions, num_position_channels

#: Coarse body regions a prior may be conditioned on (index 0 = unknown).
REGIONS = ("unknown", "head-neck", "chest", "abdomen")

BACKBONES = ("diffusers.UNet2DModel", "monai.DiffusionModelUNet")

#: A small CPU-friendly 2D prior: no self-attention at high resolution.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "backbone": "diffusers.UNet2DModel",
    "spatial_dims": 2,
    "image_channels": 1,
    "condition_channels": 0,
    # Extra views of every condition channel, each a window [low, high] of the
    # condition's normalised units stretched to [-1, 1] and clipped (a CT in
    # the wide HU window gets a soft-tissue window: its 50 HU contrasts are
    # otherwise 0.03 units, which the first convolution barely sees).
    "condition_windows": [],
    "position_frequencies": 4,
    # Coordinate axes given to the network: None = its spatial dims. A 2D
    # network with 3 also gets its slice's place along the volume's third
    # axis (constant over the slice); a coordinate may be NaN (not known), which
    # encodes as zeros, a value sin/cos never take together.
    "position_axes": None,
    "num_regions": len(REGIONS),
    # Space-to-depth stem: the UNet runs at 1/stride resolution on
    # stride^2 x channels (PixelUnshuffle/PixelShuffle), which cuts the cost of
    # the full-resolution level, the most expensive one on CPU, by stride^2.
    "stem_stride": 2,
    "backbone_config": {
        "block_out_channels": [48, 64, 96, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 16,
        "attention_head_dim": 32,
        "add_attention": False,
    },
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def position_axes_of(config: dict) -> int:
    """Coordinate axes a (completed) architecture gives its network:
    ``position_axes``, or its spatial dims when that is None."""
    return int(config["position_axes"] or config["spatial_dims"])


def complete_architecture(config: dict | None) -> dict:
    """Fill in defaults so a saved config fully describes the network.

    The default ``backbone_config`` belongs to the default backbone; another
    backbone keeps only its own ``backbone_config`` (MONAI's keywords differ).
    """
    config = config or {}
    base = DEFAULT_ARCHITECTURE
    if config.get("backbone", base["backbone"]) != base["backbone"]:
        base = {k: v for k, v in base.items() if k != "backbone_config"}
        base["backbone_config"] = {}
    config = _merge(base, config)
    if config["backbone"] not in BACKBONES:
        raise ValueError(f"unknown backbone {config['backbone']!r}; known: {BACKBONES}")
    if config["backbone"] == "diffusers.UNet2DModel" and config["spatial_dims"] != 2:
        raise ValueError("diffusers.UNet2DModel is 2D; use monai.DiffusionModelUNet for 3D")
    return config


def _build_backbone(config: dict, in_channels: int, out_channels: int) -> nn.Module:
    kwargs = dict(config["backbone_config"])
    num_regions = config["num_regions"] or None
    if config["backbone"] == "diffusers.UNet2DModel":
        from diffusers import UNet2DModel

        return UNet2DModel(in_channels=in_channels, out_channels=out_channels,
                           num_class_embeds=num_regions, **kwargs)
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=config["spatial_dims"], in_channels=in_channels,
                              out_channels=out_channels, num_class_embeds=num_regions, **kwargs)


def window_channels(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` in ``[low, high]`` stretched to [-1, 1], clipped outside."""
    return torch.clamp((x - low) * (2.0 / (high - low)) - 1.0, -1.0, 1.0)


class DiffusionNetwork(nn.Module):
    """Noise-prediction network with position, region and image conditioning.

    Parameters
    ----------
    config : dict
        Architecture (see :data:`DEFAULT_ARCHITECTURE`); completed with
        defaults and kept in ``self.config`` for saving.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = complete_architecture(config)
        c = self.config
        self.spatial_dims = c["spatial_dims"]
        self.image_channels = c["image_channels"]
        self.condition_channels = c["condition_channels"]
        self.condition_windows = [(float(low), float(high)) for low, high in c["condition_windows"]]
        if any(not high > low for low, high in self.condition_windows):
            raise ValueError(f"condition_windows need low < high, got {c['condition_windows']}")
        if self.condition_windows and not self.condition_channels:
            raise ValueError("condition_windows need condition_channels")
        self.position_frequencies = c["position_frequencies"]
        self.position_axes = position_axes_of(c)
        # a 2D network may take one axis more (its slice's place in the volume), nothing else
        allowed = (self.spatial_dims, self.spatial_dims + 1) if self.spatial_dims == 2 else (self.spatial_dims,)
        if self.position_axes not in allowed:
            raise ValueError(f"position_axes {self.position_axes} for a {self.spatial_dims}D network; "
                             f"allowed: {', '.join(map(str, allowed))}")
        in_channels = (self.image_channels + self.condition_channels * (1 + len(self.condition_windows))
                       + num_position_channels(self.position_axes, self.position_frequencies))
        self.stem_stride = int(c["stem_stride"])
        if self.stem_stride > 1 and self.spatial_dims != 2:
            raise ValueError("stem_stride > 1 is implemented for 2D networks only")
        factor = self.stem_stride ** self.spatial_dims
        self.backbone = _build_backbone(c, in_channels * factor, self.image_channels * factor)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (stem stride x UNet downsampling)."""
        levels = len(self.config["backbone_config"].get("block_out_channels", [0, 0, 0, 0]))
        return self.stem_stride * 2 ** (levels - 1)

    @property
    def uses_regions(self) -> bool:
        return bool(self.config["num_regions"])

    @property
    def uses_slice_position(self) -> bool:
        """Whether the network takes its slice's place along the volume's third axis."""
        return self.position_axes > self.spatial_dims

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, *,
                coords: torch.Tensor | None = None,
                condition: torch.Tensor | None = None,
                region: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``sample`` at ``timesteps``.

        Parameters
        ----------
        sample : Tensor (B, C, *spatial)
            Noisy image, normalised intensities.
        timesteps : Tensor (B,) or scalar
            Diffusion step indices.
        coords : Tensor (B, D, *spatial), optional
            Coordinates of each pixel in the whole image, in [-1, 1]; the
            sample is taken to be the whole image when omitted. Axes the
            network takes beyond these (``position_axes``: the slice's place
            in its volume) are 'not known' (NaN) when not given.
        condition : Tensor (B, condition_channels, *spatial), optional
            Conditioning images (required when the network has any).
        region : Tensor (B,) of int, optional
            Body-region class (0 = unknown) for region-conditioned priors.
        """
        batch = sample.shape[0]
        spatial = sample.shape[2:]
        if coords is None:
            grid = coordinate_grid([(0, n) for n in spatial], spatial,
                                   device=sample.device, dtype=sample.dtype)
            coords = grid.unsqueeze(0).expand(batch, *grid.shape)
        coords = coords.to(sample.dtype)
        if coords.shape[1] < self.position_axes:
            unknown = coords.new_full((batch, self.position_axes - coords.shape[1]) + tuple(spatial), float("nan"))
            coords = torch.cat([coords, unknown], dim=1)
        elif coords.shape[1] > self.position_axes:
            raise ValueError(f"network takes {self.position_axes} coordinate axes, got {coords.shape[1]}")
        parts = [sample]
        if self.condition_channels:
            if condition is None or condition.shape[1] != self.condition_channels:
                got = None if condition is None else condition.shape[1]
                raise ValueError(f"network expects {self.condition_channels} condition channels, got {got}")
            condition = condition.to(sample.dtype)
            parts.append(condition)
            parts.extend(window_channels(condition, low, high) for low, high in self.condition_windows)
        # a coordinate that is not known (NaN) encodes as zeros
        parts.append(torch.nan_to_num(encode_positions(coords, self.position_frequencies), nan=0.0))
        x = torch.cat(parts, dim=1)
        if self.stem_stride > 1:
            x = nn.functional.pixel_unshuffle(x, self.stem_stride)
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        class_labels = None
        if self.uses_regions:
            class_labels = (torch.zeros(batch, dtype=torch.long, device=sample.device)
                            if region is None else torch.as_tensor(region, device=sample.device).long())
        if self.config["backbone"] == "diffusers.UNet2DModel":
            out = self.backbone(x, timesteps, class_labels=class_labels).sample
        else:
            out = self.backbone(x, timesteps, class_labels=class_labels)
        if self.stem_stride > 1:
            out = nn.functional.pixel_shuffle(out, self.stem_stride)
        return out
