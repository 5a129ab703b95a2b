"""Display settings: CT window presets and MR auto-windowing.

Plain functions over arrays (no Qt); the napari layer code calls them.
"""
from __future__ import annotations

import numpy as np

#: CT window presets as (level, width) in Hounsfield units, from standard
#: radiology practice (e.g. Radiopaedia's "windowing (CT)").
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}

DEFAULT_CT_PRESET = "soft tissue"


def window_to_limits(level: float, width: float) -> tuple[float, float]:
    """(level, width) in HU -> napari contrast limits (low, high) in HU."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return (level - width / 2.0, level + width / 2.0)


def ct_preset_limits(preset: str) -> tuple[float, float]:
    """Contrast limits (HU) of a named CT window preset."""
    try:
        level, width = CT_WINDOW_PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown CT window {preset!r}; choose one of {sorted(CT_WINDOW_PRESETS)}"
        ) from None
    return window_to_limits(level, width)


def robust_limits(data: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                  max_samples: int = 2_000_000) -> tuple[float, float]:
    """Contrast limits from percentiles of the non-background voxels.

    Used for MR (arbitrary units): background (exact zeros or the minimum,
    common after skull stripping) is ignored so it does not squash the range.
    """
    flat = np.asarray(data).ravel()
    if flat.size > max_samples:
        flat = flat[:: flat.size // max_samples + 1]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return (0.0, 1.0)
    foreground = flat[flat > flat.min()]
    if foreground.size < 0.01 * flat.size:
        foreground = flat
    low, high = np.percentile(foreground, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return (float(low), float(high))


def default_contrast_limits(data: np.ndarray, modality: str) -> tuple[float, float]:
    """Soft-tissue window for CT, robust percentiles otherwise."""
    if modality == "CT":
        return ct_preset_limits(DEFAULT_CT_PRESET)
    return robust_limits(data)


def value_range(data: np.ndarray) -> tuple[float, float]:
    """Full (min, max) of the data: napari's contrast-limit slider range."""
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    return (low, high if high > low else low + 1.0)
