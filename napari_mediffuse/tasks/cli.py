"""Registers one ``mediffuse`` subcommand per task."""
from __future__ import annotations

#: (name, module) of the task subcommands; each module has ``add_command(sub)``.
TASK_COMMANDS: list[tuple[str, str]] = []


def add_task_commands(subparsers) -> None:
    """Add every task's subcommand to the ``mediffuse`` parser."""
    from importlib import import_module

    for _name, module in TASK_COMMANDS:
        import_module(module).add_command(subparsers)
