"""The task tabs of the mediffuse panel: one :class:`TaskSpec` per task.

Each spec binds a plain task function of :mod:`napari_mediffuse.tasks` to
its parameters; nothing here computes anything.
"""
from __future__ import annotations

from .task_tab import TaskSpec


def task_specs() -> list[TaskSpec]:
    """Specs of every task tab, in panel order."""
    return []
