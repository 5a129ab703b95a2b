"""Registers one ``mediffuse`` subcommand per task module.

Every module in :mod:`napari_mediffuse.tasks` that defines
``add_command(subparsers)`` contributes its subcommand(s); the CLI needs no
list to keep in sync.
"""
from __future__ import annotations

import importlib
import sys
import pkgutil

import numpy as np


def task_modules():
    """Task modules that define ``add_command``, in name order."""
    from .. import tasks

    modules = []
    for info in sorted(pkgutil.iter_modules(tasks.__path__), key=lambda m: m.name):
        if info.name in ("cli", "common") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{tasks.__name__}.{info.name}")
        if hasattr(module, "add_command"):
            modules.append(module)
    return modules


def add_task_commands(subparsers) -> None:
    """Add every task's subcommand to the ``mediffuse`` parser."""
    for module in task_modules():
        module.add_command(subparsers)


def add_common_options(parser, *, steps: int | None = None, model: bool = True) -> None:
    """Options shared by the diffusion task subcommands."""
    if model:
        parser.add_argument("--model", help="checkpoint name or folder (default: the task's default model)")
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps",
                        help="where the network runs (default auto: CUDA, then MPS, then CPU)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="network precision (default auto: fp32 on CPU, bf16 or fp16 on a GPU); "
                             "the sampler's arithmetic stays in full precision")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices processed together (the result does not depend on it; default: 32 "
                             "on a CUDA GPU, halved while it runs out of memory, 4 elsewhere and for "
                             "synthesis and Stable-Diffusion translation)")
    parser.add_argument("--window", type=int, default=None, metavar="PIXELS",
                        help="evaluate the network in overlapping PIXELS x PIXELS windows with blended "
                             "estimates (less memory for large slices; default: whole slices)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    if any(action.dest == "input" for action in parser._actions):  # tasks that read a scan
        add_input_options(parser)


def add_region_option(parser) -> None:
    """``--region``: the body-region class a region-conditioned prior is given."""
    from ..engine.networks import REGIONS

    # 'unknown' is the class a model gets when no region is given, not one to ask for
    parser.add_argument("--region", choices=[r for r in REGIONS if r != "unknown"], default=None,
                        help="the scan's body region: the class a region-conditioned model is given and the "
                             "region checked against what a model saw (default: the model's own class; the "
                             "check judges the region from DICOM BodyPartExamined or the scan)")


def add_ensemble_option(parser, *, per: str, default: int = 1) -> None:
    """``--ensemble``: estimates of a learned model averaged (each one more network evaluation)."""
    parser.add_argument("--ensemble", type=int, default=default,
                        help=f"learned: average this many estimates per {per} (own noise draws, mirrored "
                             f"views); each costs one more network evaluation (default {default})")


def add_input_options(parser) -> None:
    """``--series`` and ``--modality``: which series of INPUT, and what it is."""
    parser.add_argument("--series", default=None, metavar="INDEX|UID|DESCRIPTION",
                        help="the series to use when INPUT holds several: its index in the list "
                             "the error shows (0, 1, ...), its SeriesInstanceUID, or text of its "
                             "description (default: the only series that is not a localizer)")
    parser.add_argument("--modality", default=None, type=str.upper, choices=["CT", "MR"],
                        help="what INPUT is, overriding DICOM's Modality or the guess made for "
                             "NIfTI (e.g. a CT crop without air guessed MR)")


def options_from_args(args, progress=None):
    """:class:`~.common.RunOptions` from parsed CLI arguments."""
    from .common import RunOptions

    from ..engine.devices import autocast_dtype, select_device

    if args.window is not None and args.window < 8:
        raise ValueError(f"--window must be at least 8 pixels, got {args.window}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    # a device or precision this machine lacks is refused before anything is read or written
    autocast_dtype(select_device(args.device), args.precision)
    return RunOptions(device=args.device, precision=args.precision, seed=args.seed,
                      batch_size=args.batch_size, window=args.window, progress=progress)


def read_single_volume(path, *, series=None, modality=None):
    """The one series in ``path``, or the one ``series`` names (a clear error
    listing the choices if there are several), with ``modality`` ('CT'/'MR')
    overriding the one read (see :mod:`napari_mediffuse.io.selection`).

    Goes through :func:`napari_mediffuse.io.read`, so the input is validated
    (header against file size, affine) and non-finite voxels are replaced
    with a warning before any task sees them.
    """
    from .. import io

    from ..io.selection import override_modality, select_series

    volume = select_series(io.read(path), series, where=str(path))
    return override_modality(volume, modality)


def check_output_free(path, overwrite: bool, inputs=()) -> None:
    """Refuse early (before any computation) an OUTPUT that cannot or may not
    be written: see :func:`napari_mediffuse.io.validate.check_output_file`
    (folder, name, existing file or symbolic link, an input)."""
    from .. import io

    io.validate.check_output_file(path, overwrite=overwrite, inputs=inputs)


def prepare_volume_command(args):
    """Checks shared by the volume-in, NIfTI-out subcommands, done before any
    computation: OUTPUT is a free NIfTI path and INPUT holds one series.

    Returns ``(volume, options)``.
    """
    from .. import io

    if not io.is_nifti_path(args.output):
        raise io.WriteError(f"{args.output}: OUTPUT must be a .nii or .nii.gz file (nothing was written)")
    inputs = [args.input] + [getattr(args, name) for name in ("mask", "roi") if getattr(args, name, None)]
    check_output_free(args.output, args.overwrite, inputs=inputs)
    options = options_from_args(args, progress=cli_progress())  # device and precision first: cheap
    volume = read_single_volume(args.input, series=getattr(args, "series", None),
                                modality=getattr(args, "modality", None))
    return volume, options


def finish_volume_command(args, result, summary: str = "") -> int:
    """Write the result to OUTPUT and report it (with the result's warnings).

    A result with NaN or infinite voxels is refused (nothing is written): it
    would be a fault of the task, never something to hand to the user.
    """
    from .. import io

    data = np.asarray(result.data)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise io.WriteError(f"{args.output}: the result has {bad} NaN or infinite voxels; "
                            "nothing was written (please report this with the input)")
    io.write_nifti(result, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}" + (f" ({summary})" if summary else ""))
    print_warnings(result)
    return 0


def print_warnings(result) -> None:
    """A result's warnings (outside the model's domain, resampled grids), one line each on stderr."""
    for warning in result.metadata.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def cli_progress(verbose: bool = True):
    """A progress callback printing one updating line to stderr."""
    import sys

    def progress(done, total, message=""):
        if verbose:
            end = "\n" if done >= total else ""
            print(f"\r{message or ''} {done}/{total}", end=end, file=sys.stderr, flush=True)

    return progress
