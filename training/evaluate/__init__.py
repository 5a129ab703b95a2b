"""Evaluations that write JSON, a Markdown table and a picture for docs/.

    python -m training.evaluate <name> ...

Every module in this package that defines ``add_command(subparsers)``
contributes a subcommand.
"""
