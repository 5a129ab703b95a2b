"""Input validation and output safety, shared by the reader, the CLI and the panel.

Everything here runs *before* any pixel is read, any model is loaded or any
computation starts, and turns every fault into one line that names the file
and the reason (:class:`~.errors.ReadError` / :class:`~.errors.WriteError`).

Input
    :func:`check_input_path`  the path exists, is a regular file or folder
    (not a FIFO or device, which would block), is not a broken or looping link.
    :func:`check_nifti_header`  NIfTI header sanity from the first 544 bytes:
    magic, dimensions (0-D/1-D, empty axes, more than 5-D), voxel type,
    dimensions against the real file size (for ``.gz`` the gzip ISIZE trailer
    and deflate's 1032:1 ratio bound, so a tiny file claiming gigabytes is
    refused without allocating), finite scaling and a finite, invertible affine.
    :func:`check_volume`  after reading: finite, invertible affine and the
    non-finite voxel rule below.

Non-finite voxel rule
    NaN, +inf and -inf voxels are replaced when a scan is read, so no task
    ever sees them and no result contains them: NaN and -inf by the volume's
    smallest finite value (background: air in CT), +inf by its largest. The
    volume carries a warning with their count and the first one's position
    (slice, row, column of the displayed array). A volume without any finite
    voxel is refused.

Output
    :func:`check_output_file` / :func:`check_output_folder`  before computing:
    the folder exists and is writable, the name is accepted by the file system
    (probed by creating and removing it), the target is not a folder, nothing
    exists under that name (a file, a folder, or a symbolic link, even a
    broken one) unless ``overwrite``, and it is not an input unless
    ``overwrite``.
    :func:`atomic_output`  writes go to a unique temporary file made by
    :mod:`tempfile` in the target folder, published with one atomic rename
    (a hard link when not overwriting, so a file created meanwhile is never
    replaced) and removed on any failure or Ctrl-C: the target is either the
    complete new file or untouched, and the message says which.
"""
from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import InputWarning, ReadError, WriteCancelled, WriteError

#: deflate cannot compress better than about 1032:1 (RFC 1951 block limits).
GZIP_MAX_RATIO = 1032

#: Largest value tasks can compute with (they work in float32).
FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Voxel kinds a task can compute with (bool comes from labels layers).
SUPPORTED_KINDS = "biuf"

_NIFTI_HEADER_SIZES = {348: 1, 540: 2}


# ---------------------------------------------------------------------------
# Input paths
# ---------------------------------------------------------------------------


def check_input_path(path) -> Path:
    """Check that ``path`` can be opened for reading without blocking.

    Returns
    -------
    Path
        The path, unchanged.

    Raises
    ------
    ReadError
        Missing path, broken or looping symbolic link, a name too long for the
        file system, no permission, an empty file, or something that is
        neither a regular file nor a folder (FIFO, socket, device).
    """
    path = Path(path)
    reason = input_path_fault(path)
    if reason:
        raise ReadError(f"{path!r}: {reason}" if "\x00" in str(path) else f"{path}: {reason}")
    return path


def input_path_fault(path) -> str:
    """Why ``path`` cannot be read ('' when it can): see :func:`check_input_path`.

    The DICOM folder walk uses it to say why a listed entry was skipped.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        return _input_os_reason(path, exc)
    except ValueError as exc:  # embedded NUL byte
        return f"not a valid path ({exc})"
    if stat.S_ISDIR(info.st_mode):
        if not os.access(path, os.R_OK | os.X_OK):
            return "permission denied (the folder cannot be listed)"
        return ""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file or folder (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    if info.st_size == 0:
        return "the file is empty (0 bytes)"
    return ""


#: What an OSError means to the user, by errno (reading and writing alike).
OS_REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.ELOOP: "symbolic link loop (the links never reach a file)",
    errno.ENAMETOOLONG: "file name too long for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EINVAL: "the file system refuses this name (invalid characters)",
    errno.EILSEQ: "the file system refuses this name (invalid characters)",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
}


def os_reason(exc: OSError) -> str:
    """One phrase for an OSError (:data:`OS_REASONS`), else the system's own text."""
    return OS_REASONS.get(exc.errno) or exc.strerror or type(exc).__name__


def _input_os_reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symbolic link (to {os.readlink(path)})"
    return os_reason(exc)


# ---------------------------------------------------------------------------
# NIfTI header
# ---------------------------------------------------------------------------


def check_nifti_header(path):
    """Validate a NIfTI-1/2 header against the file before reading voxels.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nibabel.Nifti1Header or nibabel.Nifti2Header
        The parsed header (not yet used to read anything).

    Raises
    ------
    ReadError
        Not gzip although named ``.gz``; truncated; wrong header size or magic
        (ANALYZE, two-file ``.hdr/.img`` NIfTI); 0-D, 1-D, more than 5-D or an
        empty axis; complex, RGB or unknown voxel type; more voxel bytes than
        the file holds; non-finite ``scl_slope``/``scl_inter``; a non-finite or
        singular affine.
    """
    path = check_input_path(path)
    compressed = str(path).lower().endswith(".gz")
    head = _nifti_head(path, compressed)
    header = _parse_nifti_header(path, head)
    shape = tuple(int(d) for d in header["dim"][1:int(header["dim"][0]) + 1])
    _check_nifti_shape(path, shape)
    dtype = _check_nifti_dtype(path, header)
    offset = _nifti_data_offset(path, header)
    needed = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    _check_file_holds(path, needed, compressed, shape, dtype, offset)
    _check_scaling(path, header, dtype)
    _check_header_affine(path, header)
    return header


def _nifti_head(path: Path, compressed: bool) -> bytes:
    """The first 544 bytes (decompressed for ``.gz``), read boundedly."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            if compressed and magic != b"\x1f\x8b":
                raise ReadError(f"{path}: named .gz but not gzip-compressed "
                                "(rename it to .nii if it is an uncompressed NIfTI)")
            if not compressed and magic == b"\x1f\x8b":
                raise ReadError(f"{path}: gzip-compressed but named .nii (rename it to .nii.gz)")
            fh.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read(544)
            return fh.read(544)
    except ReadError:
        raise
    except EOFError:
        raise ReadError(f"{path}: truncated gzip stream (the file ends inside the header)") from None
    except (OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ReadError(f"{path}: corrupt gzip data ({exc})") from None


def _parse_nifti_header(path: Path, head: bytes):
    import nibabel as nib

    if len(head) < 348:
        raise ReadError(f"{path}: truncated NIfTI header ({len(head)} of at least 348 bytes)")
    version = None
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size in _NIFTI_HEADER_SIZES:
            version, endian = _NIFTI_HEADER_SIZES[size], order
            break
    if version is None:
        raise ReadError(f"{path}: not a NIfTI file (header size field is not 348 or 540: wrong format or "
                        "corrupt header)")
    if version == 2 and len(head) < 540:
        raise ReadError(f"{path}: truncated NIfTI-2 header ({len(head)} of 540 bytes)")
    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    try:
        header = klass(head[:348 if version == 1 else 540], endianness=endian, check=False)
    except Exception as exc:  # nibabel's header errors vary by field
        raise ReadError(f"{path}: unreadable NIfTI-{version} header ({exc})") from None
    magic = bytes(np.asarray(header["magic"]).item())
    if magic in (b"ni1", b"ni2"):
        raise ReadError(f"{path}: the header says the voxels are in a separate .img file "
                        "(two-file NIfTI); not supported")
    if magic not in (b"n+1", b"n+2"):
        raise ReadError(f"{path}: bad NIfTI magic {magic!r} (an ANALYZE 7.5 file or a corrupt header)")
    return header


def _check_nifti_shape(path: Path, shape: tuple) -> None:
    dims = " x ".join(map(str, shape))
    if len(shape) == 0:
        raise ReadError(f"{path}: 0-D NIfTI (the header's dim[0] is 0 or invalid): no image axes")
    if len(shape) > 7 or any(s < 0 for s in shape):
        raise ReadError(f"{path}: invalid dimensions in the header ({dims})")
    if any(s == 0 for s in shape):
        raise ReadError(f"{path}: the image has an empty axis ({dims}): it holds no voxels")
    kept = effective_nifti_shape(shape)
    if len(kept) == 1:
        raise ReadError(f"{path}: 1-D NIfTI ({dims}); an image needs 2 or 3 spatial axes")
    if len(kept) > 4:
        raise ReadError(f"{path}: {len(kept)}-D NIfTI ({dims}); only 2-D, 3-D and 3-D + time are supported")


def effective_nifti_shape(shape: tuple) -> tuple:
    """The NIfTI shape as read: a unit 4th axis of a 5-D vector image and
    trailing unit axes beyond the third are dropped."""
    shape = tuple(shape)
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_nifti_dtype(path: Path, header) -> np.dtype:
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise ReadError(f"{path}: unknown NIfTI voxel type (datatype code {code})") from None
    if dtype.names is not None:
        raise ReadError(f"{path}: RGB colour voxels ({'/'.join(dtype.names)}); "
                        "only grey-value CT/MR images are supported")
    if dtype.kind == "c":
        raise ReadError(f"{path}: complex voxels ({dtype.name}, e.g. MR phase/k-space); "
                        "save the magnitude image instead")
    if dtype.kind not in "iuf" or dtype.itemsize == 0 or (dtype.kind == "f" and dtype.itemsize > 8):
        raise ReadError(f"{path}: unsupported voxel type (datatype code {code}, {dtype})")
    return dtype


def _nifti_data_offset(path: Path, header) -> int:
    raw = float(header["vox_offset"])
    minimum = 352 if int(header["sizeof_hdr"]) == 348 else 544
    if not np.isfinite(raw) or raw < minimum:
        # nibabel would read the header bytes themselves as voxels
        raise ReadError(f"{path}: invalid vox_offset {raw:g} in the header (the voxels must start at "
                        f"byte {minimum} or later)")
    return int(raw)


def _check_file_holds(path: Path, needed: int, compressed: bool, shape, dtype, offset: int) -> None:
    """Refuse when the header's voxels cannot fit in the file (no allocation)."""
    size = os.stat(path).st_size
    what = (f"the header says {' x '.join(map(str, shape))} {dtype.name} voxels "
            f"({_bytes(needed - offset)} from byte {offset})")
    if not compressed:
        if size < needed:
            raise ReadError(f"{path}: truncated or impossible dimensions: {what} but the file has {_bytes(size)}")
        return
    if needed > GZIP_MAX_RATIO * size + 1024:
        raise ReadError(f"{path}: impossible dimensions: {what}, more than {_bytes(size)} of gzip data can hold")
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")  # uncompressed size mod 2**32
    if needed < 2 ** 32 and isize >= needed:
        return
    # Multi-member gzip, > 4 GiB or truncated: count the real bytes, streaming.
    if _gzip_length_at_least(path, needed) < needed:
        raise ReadError(f"{path}: truncated or impossible dimensions: {what} but the file decompresses "
                        "to less")


def _gzip_length_at_least(path: Path, needed: int, chunk: int = 1 << 22) -> int:
    """Decompressed length of ``path``, counted up to ``needed`` (memory: one chunk)."""
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while total < needed:
                block = gz.read(min(chunk, needed - total))
                if not block:
                    break
                total += len(block)
    except EOFError:
        return total
    except (OSError, zlib.error) as exc:
        raise ReadError(f"{path}: corrupt gzip data ({exc})") from None
    return total


def _check_scaling(path: Path, header, dtype: np.dtype) -> None:
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isnan(slope) or slope == 0:
        return  # NIfTI: no scaling (the intercept is ignored)
    if not np.isfinite(slope):
        raise ReadError(f"{path}: invalid scl_slope {slope} in the header")
    if not np.isfinite(inter):
        raise ReadError(f"{path}: invalid scl_inter {inter} in the header (scl_slope is {slope:g})")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        top = abs(slope) * max(abs(float(info.min)), float(info.max)) + abs(inter)
        if top > FLOAT32_MAX:
            raise ReadError(f"{path}: scl_slope {slope:g} and scl_inter {inter:g} can scale the voxels to "
                            f"{top:.3g}, beyond what tasks compute with (float32, {FLOAT32_MAX:.3g})")


def _check_header_affine(path: Path, header) -> None:
    """The affine the reader will use (sform, else qform, else pixdim), after
    the header fixes nibabel applies on loading (e.g. negative pixdim)."""
    name, affine = "pixdim", None
    if int(header["sform_code"]) <= 0:
        # nibabel would silently read a zero voxel size as 1 mm: refuse instead
        sizes = np.asarray(header["pixdim"][1:4], dtype=float)
        where = "qform" if int(header["qform_code"]) > 0 else "pixdim"
        if not np.all(np.isfinite(sizes)):
            raise ReadError(f"{path}: the header's {where} is not finite (voxel sizes "
                            f"{' x '.join(f'{v:g}' for v in sizes)})")
        if np.any(sizes == 0):
            raise ReadError(f"{path}: the header's {where} is singular (a voxel size is zero: "
                            f"{' x '.join(f'{v:g}' for v in sizes)} mm)")
    header = _as_nibabel_loads(header)
    try:
        if int(header["sform_code"]) > 0:
            name, affine = "sform", header.get_sform()
        elif int(header["qform_code"]) > 0:
            name, affine = "qform", header.get_qform()
        else:
            affine = header.get_base_affine()
    except Exception as exc:
        raise ReadError(f"{path}: invalid {name} in the header ({exc})") from None
    reason = affine_fault(affine)
    if reason:
        raise ReadError(f"{path}: the header's {name} is {reason}")


def _as_nibabel_loads(header):
    """A copy of ``header`` with the fixes nibabel applies when loading."""
    fixed = header.copy()
    try:
        with library_log_lines():  # the reader reports these lines itself
            fixed.check_fix(error_level=100)  # fix what nibabel fixes, never raise
    except Exception:
        return header
    return fixed


def affine_fault(affine) -> str:
    """Why a voxel -> mm affine cannot be used ('' when it can).

    It must be finite with non-zero, finite voxel sizes and invertible
    (determinant not negligible against the product of the voxel sizes).
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        return f"not 4 x 4 (shape {affine.shape})"
    if not np.all(np.isfinite(affine)):
        return "not finite (NaN or infinite entries)"
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(sizes <= 1e-9):
        return f"singular (a voxel size is zero: {' x '.join(f'{s:.3g}' for s in sizes)} mm)"
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * float(np.prod(sizes)):
        return "singular (two voxel axes point the same way)"
    return ""


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------
# Volumes after reading
# ---------------------------------------------------------------------------


def check_volume(volume, *, where: str | None = None):
    """Check a read volume's affine and apply the non-finite voxel rule.

    Parameters
    ----------
    volume : Volume
        Read or received from napari; ``data`` may be replaced (never modified
        in place) and a warning appended to ``metadata['warnings']``.
    where : str, optional
        File or layer named in messages; ``volume.source`` or its name by default.

    Returns
    -------
    Volume
        The same volume, or a copy with finite data (float32 at least when
        data had to be converted from float16).

    Raises
    ------
    ReadError
        Non-finite or singular affine, unsupported voxel type, or no finite voxel.
    """
    where = where or volume.source or volume.name
    reason = affine_fault(volume.affine)
    if reason:
        raise ReadError(f"{where}: the voxel -> mm affine is {reason}")
    data = volume.data
    if data.dtype.kind not in SUPPORTED_KINDS or (data.dtype.kind == "f" and data.dtype.itemsize > 8):
        raise ReadError(f"{where}: unsupported voxel type {data.dtype}")
    if data.dtype == np.float16:  # torch/scipy/bm3d compute in float32 anyway
        data = data.astype(np.float32)
    data, note = finite_voxels(data, where)
    if data.dtype.kind == "f" and data.dtype.itemsize > 4 and data.size:  # float32 cannot exceed it
        top = max(abs(float(data.min())), abs(float(data.max())))  # no |data| copy of a large volume
        if top > FLOAT32_MAX:
            raise ReadError(f"{where}: values up to {top:.3g}, beyond what tasks compute with "
                            f"(float32, {FLOAT32_MAX:.3g})")
    if data is volume.data:
        return volume
    metadata = dict(volume.metadata)
    if note:
        metadata["warnings"] = list(metadata.get("warnings", [])) + [note]
        warnings.warn(InputWarning(note), stacklevel=2)
    volume = volume.with_data(data)
    volume.metadata = metadata
    return volume


def finite_voxels(data: np.ndarray, where: str = "volume") -> tuple[np.ndarray, str]:
    """Apply the non-finite voxel rule (module docstring).

    Returns
    -------
    data : ndarray
        ``data`` itself when all voxels are finite, else a copy where NaN and
        -inf became the smallest finite value and +inf the largest.
    note : str
        '' or a one-line warning with the count and first position.

    Raises
    ------
    ReadError
        No voxel is finite.
    """
    if data.dtype.kind != "f":
        return data, ""
    bad = ~np.isfinite(data)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return data, ""
    if count == data.size:
        raise ReadError(f"{where}: no finite voxel (all {data.size} are NaN or infinite)")
    finite = data[~bad]
    low, high = finite.min(), finite.max()
    first = np.unravel_index(int(np.flatnonzero(bad)[0]), data.shape)
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_pos = int(np.count_nonzero(data == np.inf))
    n_neg = count - n_nan - n_pos
    out = np.where(np.isnan(data) | (data == -np.inf), low, data)
    out = np.where(out == np.inf, high, out).astype(data.dtype, copy=False)
    kinds = ", ".join(f"{n} {label}" for n, label in ((n_nan, "NaN"), (n_pos, "+inf"), (n_neg, "-inf")) if n)
    position = ", ".join(str(int(i)) for i in first)
    note = (f"{where}: {count} non-finite voxel{'s' if count > 1 else ''} ({kinds}; first at index "
            f"[{position}]) replaced: NaN and -inf by the minimum {float(low):g}, +inf by the maximum "
            f"{float(high):g}")
    return out, note


# ---------------------------------------------------------------------------
# Library log lines
# ---------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(" ".join(record.getMessage().split()))
        except Exception:  # a malformed log call must not break reading
            pass


@contextmanager
def library_log_lines(names: Iterable[str] = ("nibabel", "nibabel.global"), level: int = logging.INFO):
    """Collect the log lines of libraries (nibabel's "Level 35" header fixes,
    which nibabel prints through its own handler on ``nibabel.global``)
    instead of letting them print in their own format. DEBUG lines (cosmetic
    header fixes) are dropped.

    Yields the list the messages (one line each) are appended to.
    """
    handler = _Collect()
    handler.setLevel(level)
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        yield handler.messages
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved):
            lg.handlers = handlers
            lg.propagate = propagate


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def check_output_file(path, *, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Check, before any computing, that a result can be written to ``path``.

    Parameters
    ----------
    path : str or Path
        The file the user named.
    overwrite : bool
        Allow replacing an existing file (or symbolic link) and writing over an input.
    inputs : iterable of paths
        Files or folders read for this result.

    Returns
    -------
    Path

    Raises
    ------
    WriteError
        Folder missing, not a folder or not writable; ``path`` is a folder;
        something exists at ``path`` (file, symbolic link, even broken) and
        not ``overwrite``; ``path`` is an input and not ``overwrite``; the
        file system refuses the name (too long, invalid characters).
    """
    path = Path(path)
    nothing = "nothing was written"
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise WriteError(f"{path}: not a file name ({nothing})")
    if "\x00" in str(path):
        raise WriteError(f"{path!r}: a file name cannot contain a NUL character ({nothing})")
    folder = path.parent
    _check_folder_writable(folder, path)
    if os.path.isdir(path):
        raise WriteError(f"{path}: is a folder; give a file name ({nothing})")
    for source in inputs or ():
        if source and _same_path(path, source) and not overwrite:
            raise WriteError(f"{path}: is the input file; choose another name or pass --overwrite ({nothing})")
    if os.path.lexists(path):
        if not overwrite:
            kind = ("a broken symbolic link" if os.path.islink(path) and not os.path.exists(path)
                    else "a symbolic link" if os.path.islink(path) else "file")
            raise WriteError(f"{path}: {kind} exists; choose another name or pass --overwrite ({nothing})")
        return path
    _probe_name(path)
    return path


def check_output_folder(folder, *, overwrite: bool = False) -> Path:
    """Check, before any computing, that a series can be written into ``folder``
    (created if missing; it must be empty unless ``overwrite``)."""
    folder = Path(folder)
    nothing = "nothing was written"
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise WriteError(f"{folder}: exists and is not a folder ({nothing})")
    if os.path.isdir(folder):
        _check_folder_writable(folder, folder, own=True)
        if not overwrite and any(os.scandir(folder)):
            n = len(os.listdir(folder))
            raise WriteError(f"{folder}: folder is not empty ({n} entries); choose an empty folder ({nothing})")
        return folder
    parent = _existing_ancestor(folder)
    _check_folder_writable(parent, folder)
    if parent == folder.parent:
        _probe_name(folder, folder=True)
    return folder


def _existing_ancestor(path: Path) -> Path:
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_folder_writable(folder: Path, target: Path, own: bool = False) -> None:
    nothing = "nothing was written"
    label = "the folder" if own else f"folder {folder}"
    try:
        info = os.stat(folder)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise WriteError(f"{target}: folder {folder} does not exist ({nothing})") from None
        if exc.errno == errno.ENOTDIR:
            raise WriteError(f"{target}: {folder} is not a folder: a part of the path is a file ({nothing})") \
                from None
        raise WriteError(f"{target}: {label}: {os_reason(exc)} ({nothing})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise WriteError(f"{target}: {folder} is a file, not a folder ({nothing})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"{target}: {label} is not writable ({nothing})")


def _probe_name(path: Path, folder: bool = False) -> None:
    """Create and remove ``path`` itself, so the file system judges the name
    (length, characters) before anything is computed."""
    try:
        if folder:
            os.mkdir(path)
            os.rmdir(path)
        else:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.close(fd)
            finally:
                os.unlink(path)
    except FileExistsError:
        raise WriteError(f"{path}: exists; choose another name (nothing was written)") from None
    except OSError as exc:
        raise WriteError(f"{path}: {os_reason(exc)} (nothing was written)") from None


def _same_path(a, b) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def _file_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".tar.gz"):
        if lower.endswith(suffix):
            return name[-len(suffix):]
    return os.path.splitext(name)[1]


@contextmanager
def atomic_output(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a file through a unique temporary file in the target folder.

    Yields the temporary path (same suffix as ``path``, so writers that pick
    the format from the name work). On normal exit it is published as
    ``path`` in one atomic step; on any exception, including Ctrl-C, it is
    removed and ``path`` is left as it was.

    Raises
    ------
    WriteError
        An OS error while writing or publishing (nothing was written), or
        ``path`` appeared meanwhile and ``overwrite`` is False.
    WriteCancelled
        Ctrl-C; its message says whether the complete file was written.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".mediffuse-", suffix=_file_suffix(path.name))
    except OSError as exc:
        raise WriteError(f"{path}: cannot write: {os_reason(exc)} (nothing was written)") from None
    os.close(fd)
    tmp = Path(name)
    published_inode = None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        published_inode = os.stat(tmp).st_ino
        _publish(tmp, path, overwrite)
    except KeyboardInterrupt:
        if published_inode is not None and _inode(path) == published_inode:
            raise WriteCancelled(f"{path}: cancelled after the complete file was written") from None
        raise WriteCancelled(f"{path}: cancelled while writing; nothing was written"
                             + (" (the existing file is unchanged)" if os.path.lexists(path) else "")) from None
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(f"{path}: cannot write: {os_reason(exc)} (nothing was written)") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _inode(path: Path):
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return None


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)  # replaces a symbolic link itself, never its target
        return
    try:
        os.link(tmp, path)  # fails if anything appeared at path meanwhile: never clobbers
    except FileExistsError:
        raise WriteError(f"{path}: a file of that name appeared while computing; "
                         "choose another name or pass --overwrite (nothing was written)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):  # no hard links here (FAT, some network shares)
            raise WriteError(f"{path}: a file of that name appeared while computing; "
                             "choose another name or pass --overwrite (nothing was written)") from None
        os.replace(tmp, path)


__all__ = [
    "GZIP_MAX_RATIO", "affine_fault", "atomic_output", "check_input_path", "check_nifti_header", "input_path_fault",
    "check_output_file", "check_output_folder", "check_volume", "effective_nifti_shape",
    "finite_voxels", "library_log_lines",
]
