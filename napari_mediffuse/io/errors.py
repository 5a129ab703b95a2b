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
