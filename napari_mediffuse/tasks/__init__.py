"""Task functions: array plus geometry in, array plus geometry out.

Each task is a plain function over :class:`~napari_mediffuse.io.Volume` with
a progress callback and cooperative cancellation; the CLI and the widgets call
the same functions.
"""
