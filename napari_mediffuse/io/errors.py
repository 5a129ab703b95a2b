"""Errors raised by napari_mediffuse.io.

Every message names the offending file (or folder) and the reason, and never
contains patient-identifying tags (name, ID, birth date).
"""


class MediffuseIOError(ValueError):
    """Base class: a file could not be read or written."""


class ReadError(MediffuseIOError):
    """A path could not be read as a CT/MR image; the message says why."""


class WriteError(MediffuseIOError):
    """A result could not be written (e.g. the target exists); nothing was written."""


class WriteCancelled(KeyboardInterrupt):
    """Ctrl-C while a result was written; the message says whether the
    complete file is there or nothing was written."""


class InputWarning(UserWarning):
    """Something in an input was repaired or assumed (e.g. non-finite voxels
    replaced); the message names the file."""
