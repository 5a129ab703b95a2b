"""Device and precision selection: CUDA, Apple MPS, or CPU fallback."""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(preference: str = "auto", *, cuda_available=None, mps_is_available=None) -> torch.device:
    """The torch device for a user preference.

    Parameters
    ----------
    preference : {'auto', 'cpu', 'cuda', 'cuda:N', 'mps'}
        'auto' takes CUDA, then MPS, then CPU.
    cuda_available, mps_is_available : bool, optional
        Override hardware detection (tests).

    Raises
    ------
    ValueError
        An explicit device that this machine does not have (no silent
        fallback when the user asked for a GPU).
    """
    cuda_ok = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps_ok = mps_available() if mps_is_available is None else mps_is_available
    choice = (preference or "auto").lower()
    if choice == "auto":
        if cuda_ok:
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not cuda_ok:
            raise ValueError(f"device {preference!r} requested but CUDA is not available on this machine")
        return torch.device(choice)
    if choice == "mps":
        if not mps_ok:
            raise ValueError("device 'mps' requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    raise ValueError(f"unknown device {preference!r}; choose one of {DEVICE_CHOICES}")


def autocast_dtype(device: torch.device, precision: str = "auto", *, bf16_supported=None):
    """Reduced-precision dtype for inference on ``device``, or None for fp32.

    'auto' gives bf16 on CUDA GPUs that support it, fp16 on other CUDA GPUs
    and on MPS, and fp32 on CPU (CPU half precision is slower, not faster).
    """
    precision = (precision or "auto").lower()
    if precision in ("fp32", "float32", "no"):
        return None
    if precision in ("fp16", "float16"):
        return torch.float16
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return torch.bfloat16 if bf16 else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast(device: torch.device, dtype):
    """``torch.autocast`` for ``device`` and ``dtype``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_device(device: torch.device) -> str:
    """Human-readable device name for the GUI ("CPU (2 threads)", GPU name)."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"
