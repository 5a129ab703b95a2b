"""The ``mediffuse`` command: the same core as the napari panel, headless.

    mediffuse view [PATH ...]          napari with the panel docked (sample CT if no PATH)
    mediffuse info PATH                 series, geometry and value range of a scan
    mediffuse convert INPUT -o OUTPUT   NIfTI <-> DICOM series, geometry kept
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import io

log = logging.getLogger("mediffuse")


def _cmd_view(args) -> int:
    import napari

    from .plugin import sample_abdomen_ct

    viewer = napari.Viewer(title="napari-mediffuse")
    viewer.window.add_plugin_dock_widget("napari-mediffuse", "mediffuse")
    if args.paths:
        for path in args.paths:
            viewer.open(path, plugin="napari-mediffuse")
    else:
        for data, kwargs, layer_type in sample_abdomen_ct():
            viewer.add_image(data, **kwargs)
    if args.screenshot:
        viewer.window._qt_window.resize(1400, 900)
        napari.qt.get_qapp().processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def describe(volume: io.Volume) -> str:
    """A short, non-identifying text summary of a volume."""
    data = volume.data
    lines = [
        f"{volume.name}",
        f"  modality     {volume.modality}",
        f"  shape        {' x '.join(map(str, data.shape))} ({data.dtype})",
        f"  spacing      {' x '.join(f'{s:.4g}' for s in volume.spacing)} mm",
        f"  orientation  {''.join(io.volume.axcodes(volume.affine))} (array axes)",
        f"  values       {float(np.min(data)):.1f} .. {float(np.max(data)):.1f}",
    ]
    for warning in volume.metadata.get("warnings", []):
        lines.append(f"  warning      {warning}")
    return "\n".join(lines)


def _cmd_info(args) -> int:
    # The read's warnings are listed under each volume; print only the others
    # (e.g. skipped files), once, in the CLI's one-line form.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volumes = io.read(args.input)
    listed = {w for v in volumes for w in v.metadata.get("warnings", [])}
    for item in caught:
        text = str(item.message)
        if text not in listed:
            listed.add(text)
            print(f"warning: {text}", file=sys.stderr)
    for volume in volumes:
        print(describe(volume))
    return 0


def _cmd_convert(args) -> int:
    out = Path(args.output)
    # The output is checked before the input is read: no work is lost to a bad name.
    single_file = io.is_nifti_path(out) or out.suffix.lower() == ".dcm"
    if single_file:
        io.validate.check_output_file(out, inputs=[args.input])
    else:
        io.validate.check_output_folder(out)
    from .io.labels import looks_like_label_map
    from .io.selection import select_series

    volume = select_series(io.read(args.input), args.series, where=str(args.input))
    source_files = volume.metadata.get("files")
    if args.source:  # the DICOM series a NIfTI result was computed on
        source = select_series(io.read(args.source), None, where=str(args.source))
        source_files = source.metadata.get("files")
    if io.is_nifti_path(out):
        io.write_nifti(volume, out)
    elif single_file and (volume.metadata.get("layer_type") == "labels"
                          or looks_like_label_map(volume.data)):
        io.write_dicom_seg(volume, out, source_files=source_files, description=args.description)
    elif single_file:
        io.write_parametric_map(volume, out, source_files=source_files, description=args.description)
    else:
        io.write_dicom_series(volume, out, series_description=args.description or volume.name,
                              source_files=source_files)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediffuse",
        description="Diffusion models for CT and MRI, headless (same core as the napari panel).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    view = sub.add_parser("view", help="open napari with the mediffuse panel (sample CT if no path)")
    view.add_argument("paths", nargs="*", help="NIfTI files, DICOM files or folders")
    view.add_argument("--screenshot", help=argparse.SUPPRESS)
    view.set_defaults(func=_cmd_view)

    info = sub.add_parser("info", help="print series, geometry and value range")
    info.add_argument("input")
    info.set_defaults(func=_cmd_info)

    convert = sub.add_parser("convert", help="NIfTI <-> DICOM series, geometry kept")
    convert.add_argument("input")
    convert.add_argument("-o", "--output", required=True,
                         help="a .nii/.nii.gz file, a new folder for a DICOM series, or a .dcm "
                              "file: a label map as DICOM SEG, a float map as Parametric Map")
    convert.add_argument("--series", metavar="INDEX|UID|DESCRIPTION",
                         help="the series when INPUT holds several: index, SeriesInstanceUID or "
                              "description text (default: the only one that is not a localizer)")
    convert.add_argument("--description", help="SeriesDescription of a written DICOM series")
    convert.add_argument("--source", metavar="DICOM_SERIES",
                         help="the DICOM series a NIfTI result was computed on: patient, frame of "
                              "reference and source images of the output (needed for a .dcm SEG "
                              "or Parametric Map)")
    convert.set_defaults(func=_cmd_convert)

    from .tasks.cli import add_task_commands  # task subcommands live with the tasks
    add_task_commands(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for users: ``warning: <message>`` on one line,
    no source path or code line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file or sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    saved_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    outputs = _output_states(args)  # to say, on Ctrl-C, which outputs were completed
    try:
        with io.validate.library_log_lines() as library_lines:
            code = args.func(args)
        where = f"{args.input}: " if isinstance(getattr(args, "input", None), str) else ""
        for line in dict.fromkeys(library_lines):  # not folded into a volume's warnings
            print(f"warning: {where}{line}", file=sys.stderr)
        return code
    except io.MediffuseIOError as exc:
        print(f"mediffuse: error: {_with_outcome(str(exc), outputs)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad parameters from the core: say why, no traceback
        if isinstance(exc, np.linalg.LinAlgError):  # a numerical fault, not a parameter: name the input
            return _unexpected(args, exc)
        print(f"mediffuse: error: {_with_outcome(_one_line(exc), outputs)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"mediffuse: error: {getattr(args, 'input', '')}: not enough memory (nothing was written)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Outputs are written atomically: one that changed is complete.
        written = [path for path, state in outputs.items() if _path_state(path) not in (state, None)]
        message = str(exc) or "cancelled"  # WriteCancelled names the file being written
        if written:
            message += f"; complete output{'s' if len(written) > 1 else ''} written before: {', '.join(written)}"
        elif "nothing was written" not in message:
            message += "; nothing was written"
        print(f"mediffuse: {message}", file=sys.stderr)
        return 130
    except Exception as exc:
        return _unexpected(args, exc)
    finally:
        warnings.showwarning = saved_showwarning


def _with_outcome(message: str, outputs: dict) -> str:
    """``message`` plus what happened to the command's outputs, unless it says so."""
    if not outputs or "written" in message or "kept" in message:
        return message
    written = [path for path, state in outputs.items() if _path_state(path) not in (state, None)]
    if written:
        return f"{message} (complete output{'s' if len(written) > 1 else ''} written before: {', '.join(written)})"
    return f"{message} (nothing was written)"


def _output_states(args) -> dict:
    """The OUTPUT paths of a command (``output`` and ``*_out`` options) and
    their current state."""
    paths = [value for key, value in vars(args).items()
             if (key == "output" or key.endswith("_out")) and isinstance(value, str) and value]
    return {path: _path_state(path) for path in paths}


def _path_state(path: str):
    """Identity of what is at ``path`` (None if nothing): inode and mtime."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return info.st_ino, info.st_mtime_ns


def _unexpected(args, exc: Exception) -> int:
    """A fault no check foresaw: one line naming the input, not a traceback
    (-v re-raises it for a bug report)."""
    log.debug("unexpected error", exc_info=True)
    where = getattr(args, "input", None)
    print(f"mediffuse: error: {str(where) + ': ' if where else ''}{type(exc).__name__}: {_one_line(exc)} "
          "(nothing was written; run with -v for details)", file=sys.stderr)
    if args.verbose:
        raise exc
    return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
