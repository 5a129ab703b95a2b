"""Intensity normalisation between scanner units and the network's [-1, 1].

A checkpoint's JSON stores its rule; the same functions serve training and
inference so the two can never disagree.

* ``{"type": "hu_window", "low": -1024, "high": 2048}``: CT, a fixed HU
  window mapped linearly to [-1, 1] (values outside are clipped).
* ``{"type": "robust_percentile", "low_pct": 0.5, "high_pct": 99.5}``: MR
  (arbitrary units), per volume: the percentiles of the foreground map to
  -1 and +1.
"""
from __future__ import annotations

import numpy as np

DEFAULT_CT_NORMALIZATION = {"type": "hu_window", "low": -1024.0, "high": 2048.0}
DEFAULT_MR_NORMALIZATION = {"type": "robust_percentile", "low_pct": 0.5, "high_pct": 99.5}


def intensity_range(data: np.ndarray, rule: dict) -> tuple[float, float]:
    """(low, high) scanner values that map to -1 and +1 for ``data``."""
    kind = rule.get("type")
    if kind == "hu_window":
        return float(rule["low"]), float(rule["high"])
    if kind == "robust_percentile":
        flat = np.asarray(data, dtype=np.float32).ravel()
        flat = flat[:: max(1, flat.size // 2_000_000)]
        foreground = flat[flat > flat.min()]
        if foreground.size < 0.01 * flat.size:
            foreground = flat
        low, high = np.percentile(foreground, [rule["low_pct"], rule["high_pct"]])
        return float(low), float(max(high, low + 1e-3))
    raise ValueError(f"unknown intensity normalisation {rule!r}")


def normalize(data: np.ndarray, rule: dict, value_range=None) -> np.ndarray:
    """Scanner units -> float32 in [-1, 1] (clipped).

    ``value_range`` (from :func:`intensity_range`) is computed from ``data``
    when not given; pass it to normalise slices of one volume consistently.
    """
    low, high = value_range or intensity_range(data, rule)
    out = (np.asarray(data, dtype=np.float32) - low) * (2.0 / (high - low)) - 1.0
    return np.clip(out, -1.0, 1.0)


def denormalize(x: np.ndarray, value_range) -> np.ndarray:
    """[-1, 1] -> scanner units, inverse of :func:`normalize` (inside the range)."""
    low, high = value_range
    return (np.asarray(x, dtype=np.float32) + 1.0) * ((high - low) / 2.0) + low


def hu_per_unit(rule: dict) -> float:
    """HU per normalised unit for a fixed window (noise levels convert with it)."""
    if rule.get("type") != "hu_window":
        raise ValueError("HU scaling is defined for 'hu_window' normalisation only")
    return (float(rule["high"]) - float(rule["low"])) / 2.0
