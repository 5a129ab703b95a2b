"""Evaluations that write JSON, a Markdown table and a picture for docs/.

    python -m training.evaluate <name> ...

Every module in this package that defines ``add_command(subparsers)``
contributes a subcommand.
"""
from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    """The evaluation command as typed (shell-quoted): the first line of every table it writes."""
    return "python -m training.evaluate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
