"""Progress reporting and cooperative cancellation for long loops."""
from __future__ import annotations

from typing import Callable, Optional

#: ``progress(done, total, message)``; called after each unit of work.
ProgressCallback = Callable[[int, int, str], None]
#: Returns True when the user asked to stop (e.g. ``threading.Event().is_set``).
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside a loop when its cancel check returns True."""


def check_cancel(cancel: Optional[CancelCheck]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` says so."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressCallback], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)


class ProgressSpan:
    """Maps the progress of one stage onto a slice of an overall total.

    A task running ``n`` batches of ``s`` sampler steps reports
    ``batch * s + step`` out of ``n * s`` through one of these.

    ``scale`` maps the stage's own units onto the total's (a batch that holds
    half the slices it was planned with counts half its steps).
    """

    def __init__(self, progress: Optional[ProgressCallback], offset: int, total: int, message: str = "",
                 scale: float = 1.0):
        self.progress, self.offset, self.total, self.message = progress, offset, total, message
        self.scale = scale

    def __call__(self, done: int, _total: int, message: str = "") -> None:
        report(self.progress, self.offset + int(round(done * self.scale)), self.total, message or self.message)
