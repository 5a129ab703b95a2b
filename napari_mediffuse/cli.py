"""The ``mediffuse`` command: the same core as the napari panel, headless.

    mediffuse view [PATH ...]          napari with the panel docked (sample CT if no PATH)
    mediffuse info PATH                 series, geometry and value range of a scan
    mediffuse convert INPUT -o OUTPUT   NIfTI <-> DICOM series, geometry kept
"""
from __future__ import annotations

import argparse
import logging
import sys
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
    for volume in io.read(args.input):
        print(describe(volume))
    return 0


def _cmd_convert(args) -> int:
    volumes = io.read(args.input)
    if len(volumes) > 1 and args.series is None:
        names = ", ".join(f"{i}: {v.name}" for i, v in enumerate(volumes))
        raise io.ReadError(f"{args.input}: holds {len(volumes)} series ({names}); choose one with --series")
    volume = volumes[args.series or 0]
    out = Path(args.output)
    if io.is_nifti_path(out):
        io.write_nifti(volume, out)
    else:
        io.write_dicom_series(volume, out, series_description=args.description or volume.name,
                              source_files=volume.metadata.get("files"))
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
                         help="a .nii/.nii.gz file, or a new folder for a DICOM series")
    convert.add_argument("--series", type=int, help="series index when INPUT holds several")
    convert.add_argument("--description", help="SeriesDescription of a written DICOM series")
    convert.set_defaults(func=_cmd_convert)

    from .tasks.cli import add_task_commands  # task subcommands live with the tasks
    add_task_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except io.MediffuseIOError as exc:
        print(f"mediffuse: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad parameters from the core: say why, no traceback
        print(f"mediffuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mediffuse: cancelled; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
