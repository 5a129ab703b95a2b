"""napari-mediffuse: diffusion models for CT and MRI in napari.

Qt-free core: :mod:`napari_mediffuse.io` (reading/writing with geometry),
:mod:`napari_mediffuse.engine` (networks, schedulers, checkpoints, samplers),
:mod:`napari_mediffuse.tasks` (denoise, super-resolution, anomaly, translation,
synthesis). :mod:`napari_mediffuse.gui` holds the napari widgets and
:mod:`napari_mediffuse.cli` the ``mediffuse`` command.
"""
__version__ = "0.1.0"
