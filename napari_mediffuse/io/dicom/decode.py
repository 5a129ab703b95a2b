"""Decoding and rescaling the pixel data of DICOM frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import UID

from .discovery import _Frame, _quiet_pydicom


class _PixelError(Exception):
    """Pixel data of ``path`` cannot be decoded; ``reason`` completes "<file> ..."."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _load_slices(frames: list[_Frame]) -> np.ndarray:
    """Decode and rescale the frames into an ``(n, rows, columns)`` array.

    RescaleSlope/RescaleIntercept are applied per frame. The result is int16
    (or int32 if needed; float64 beyond int32) when every slope and intercept
    is integral, else float32.
    """
    raw = _decode_frames(frames)
    slopes = [f.slope for f in frames]
    intercepts = [f.intercept for f in frames]
    integral = (all(float(v).is_integer() for v in slopes + intercepts)
                and all(r.dtype.kind in "biu" for r in raw))
    if not integral:
        out = np.empty((len(raw),) + raw[0].shape, dtype=np.float32)
        for k, (r, s, i) in enumerate(zip(raw, slopes, intercepts)):
            out[k] = r.astype(np.float64) * s + i
        return out

    # Value range of each rescaled slice (a negative slope swaps the ends).
    ends = [(int(r.min()) * int(s) + int(i), int(r.max()) * int(s) + int(i))
            for r, s, i in zip(raw, slopes, intercepts)]
    low, high = min(min(e) for e in ends), max(max(e) for e in ends)
    dtype = next((t for t in (np.int16, np.int32)
                  if np.iinfo(t).min <= low and high <= np.iinfo(t).max), np.float64)
    out = np.empty((len(raw),) + raw[0].shape, dtype=dtype)
    for k, (r, s, i) in enumerate(zip(raw, slopes, intercepts)):
        out[k] = r.astype(np.int64) * int(s) + int(i)
    return out


def _decode_frames(frames: list[_Frame]) -> list[np.ndarray]:
    """Stored pixel values of each frame (2D arrays), in the order given.

    Every file is decoded once; of a multi-frame file only the frames needed.
    """
    needed: dict[Path, list[_Frame]] = {}
    for frame in frames:
        needed.setdefault(frame.path, []).append(frame)
    decoded: dict[tuple[Path, int | None], np.ndarray] = {}
    for path, file_frames in needed.items():
        indices = sorted({f.frame_index for f in file_frames}, key=lambda i: -1 if i is None else i)
        for index, pixels in zip(indices, _decode_file(file_frames[0], indices)):
            decoded[(path, index)] = pixels
    return [decoded[(f.path, f.frame_index)] for f in frames]


def _decode_file(frame: _Frame, indices: list[int | None]) -> list[np.ndarray]:
    """Decoded frames ``indices`` of ``frame.path`` (``[None]``: single-frame).

    Raises :class:`_PixelError` naming the transfer syntax on any failure.
    """
    path = frame.path
    syntax = _transfer_syntax_name(frame.header)
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True)
            if indices == [None]:
                arrays = [np.asarray(ds.pixel_array)]
            else:
                arrays = [np.asarray(a) for a in iter_pixels(ds, indices=indices)]
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise _PixelError(path, f"cannot be decoded (transfer syntax {syntax}): "
                                f"{detail}") from None
    expected = (frame.rows, frame.columns)
    for k, pixels in enumerate(arrays):
        if pixels.ndim == 3 and pixels.shape[0] == 1:
            arrays[k] = pixels = pixels[0]
        if pixels.shape != expected:
            raise _PixelError(path, f"has pixel data of shape {pixels.shape} that does "
                                    f"not match its {expected[0]}x{expected[1]} header "
                                    f"(transfer syntax {syntax})")
    return arrays


def _transfer_syntax_name(ds: Dataset) -> str:
    """Name of the file's transfer syntax ('JPEG 2000 Image Compression'...)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        return "unknown (no file meta information)"
    name = UID(str(uid)).name
    return name or str(uid)


def _resample_slices(data: np.ndarray, offsets: np.ndarray, n_slices: int) -> np.ndarray:
    """Linearly interpolate slices at ``offsets`` onto ``n_slices`` even ones.

    The output grid runs from ``offsets[0]`` to ``offsets[-1]`` (mm) so the
    first and last slices are copied exactly. Returns float32.
    """
    targets = np.linspace(offsets[0], offsets[-1], n_slices)
    out = np.empty((n_slices,) + data.shape[1:], dtype=np.float32)
    for k, target in enumerate(targets):
        j = int(np.clip(np.searchsorted(offsets, target, side="right") - 1,
                        0, len(offsets) - 2))
        weight = (target - offsets[j]) / (offsets[j + 1] - offsets[j])
        if weight <= 1e-9:
            out[k] = data[j]
        elif weight >= 1 - 1e-9:
            out[k] = data[j + 1]
        else:
            out[k] = (1.0 - weight) * data[j].astype(np.float64) + weight * data[j + 1]
    return out

