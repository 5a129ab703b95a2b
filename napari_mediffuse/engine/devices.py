"""Device and precision selection: CUDA, Apple MPS, or CPU fallback."""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

#: Slices a batch holds when the user does not say (``batch_size=None``), per device type, in
#: the loops that halve a batch that runs out of memory (:class:`~.runner.SliceRunner`).
#: Measured: super-resolution of a 4-slice 512 x 512 chest slab ran 8x faster on an H200 at 32
#: planes a call than at 4 (0.40 against 3.4 s per thick slice, 192 MB of GPU memory;
#: docs/benchmarks/sr_cuda_batch32.md); denoising took 340 MB at 4 (tasks_cuda.md), so about
#: 2.7 GB at 32. A CPU gains nothing from more than a few slices at once.
AUTO_BATCH_SIZE = {"cuda": 32}
#: ... on every other device, and in loops that do not halve (synthesis, Stable Diffusion).
DEFAULT_BATCH_SIZE = 4


def resolve_batch_size(batch_size=None, device=None) -> int:
    """The batch size to run with: ``batch_size`` itself (at least 1, else ValueError), or
    for ``None`` :data:`AUTO_BATCH_SIZE` of ``device``'s type; callers whose loop does not
    halve a batch that runs out of memory pass no device and get :data:`DEFAULT_BATCH_SIZE`."""
    if batch_size is None:
        if device is None:
            return DEFAULT_BATCH_SIZE
        return AUTO_BATCH_SIZE.get(torch.device(device).type, DEFAULT_BATCH_SIZE)
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return int(batch_size)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: CUDA's ``OutOfMemoryError``, or a RuntimeError
    whose message says "out of memory" (Apple MPS, older CUDA builds), not any other failure."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory(device) -> None:
    """Give a GPU's cached blocks back after an out-of-memory error (no-op elsewhere)."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and mps_available() and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices(*, cuda_available=None, mps_is_available=None) -> list[str]:
    """Names of the devices this machine has: 'cpu', 'cuda:0' ..., 'mps'."""
    cuda_ok = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps_ok = mps_available() if mps_is_available is None else mps_is_available
    names = ["cpu"]
    if cuda_ok:
        names += [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
    if mps_ok:
        names.append("mps")
    return names


def select_device(preference="auto", *, cuda_available=None, mps_is_available=None) -> torch.device:
    """The torch device for a user preference.

    Parameters
    ----------
    preference : {'auto', 'cpu', 'cuda', 'cuda:N', 'mps'} or torch.device
        'auto' takes CUDA, then MPS, then CPU. A ``torch.device`` is taken
        as it is (tests run tasks on the ``meta`` device).
    cuda_available, mps_is_available : bool, optional
        Override hardware detection (tests).

    Raises
    ------
    ValueError
        An explicit device that this machine does not have (no silent
        fallback when the user asked for a GPU); the message names the
        devices that are there.
    """
    if isinstance(preference, torch.device):
        return preference
    cuda_ok = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps_ok = mps_available() if mps_is_available is None else mps_is_available
    choice = (preference or "auto").lower().strip()
    present = ", ".join(available_devices(cuda_available=cuda_ok, mps_is_available=mps_ok))
    if choice == "auto":
        if cuda_ok:
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        index = choice.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"unknown device {preference!r}; write cuda:N with a GPU number N")
        if not cuda_ok:
            raise ValueError(f"device {preference!r} requested but CUDA is not available on this machine; "
                             f"devices here: {present}")
        if index and cuda_available is None and int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {preference!r} requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s); devices here: {present}")
        return torch.device(choice)
    if choice == "mps":
        if not mps_ok:
            raise ValueError(f"device 'mps' requested but Apple MPS is not available on this machine; "
                             f"devices here: {present}")
        return torch.device("mps")
    raise ValueError(f"unknown device {preference!r}; choose auto, cpu, cuda, cuda:N or mps "
                     f"(devices here: {present})")


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def bf16_native(device: torch.device) -> bool:
    """True where ``device`` computes bfloat16 in hardware.

    CUDA: compute capability 8.0 (Ampere) or newer; ``torch.cuda.is_bf16_supported()``
    also counts emulation, which is slower than fp32. CPU and MPS: True
    (the CPU autocasts bf16 natively on current x86/Arm; MPS from macOS 14).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def autocast_dtype(device: torch.device, precision: str = "auto", *, bf16_supported=None):
    """Reduced-precision dtype for the network on ``device``, or None for fp32.

    'auto' gives bf16 on CUDA GPUs that compute it natively, fp16 on other
    CUDA GPUs and on MPS, and fp32 on CPU (CPU half precision is slower, not
    faster). An explicit 'bf16' on a GPU without it is refused.
    """
    precision = (precision or "auto").lower()
    if precision in ("fp32", "float32", "no"):
        return None
    if precision in ("fp16", "float16"):
        return torch.float16
    if precision not in ("bf16", "bfloat16", "auto"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")
    if device.type not in ("cuda", "mps"):
        return torch.bfloat16 if precision != "auto" else None
    native = bf16_native(device) if bf16_supported is None else bf16_supported
    if precision != "auto":
        if not native:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" and bf16_supported is None \
                else str(device)
            raise ValueError(f"precision bf16 requested but {name} does not compute bfloat16 natively "
                             "(it needs a CUDA GPU of compute capability 8.0 or newer); use fp16 or fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if native else torch.float16
    return torch.float16


def sampler_dtype(device: torch.device) -> torch.dtype:
    """Float type of sampler arithmetic: float64 (x0 from eps near t = T, where
    abar is about 1e-9, needs it), except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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
