"""``python -m training.evaluate``: run an evaluation."""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from .. import evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=evaluate.__doc__)
    sub = parser.add_subparsers(dest="evaluation", required=True)
    for info in sorted(pkgutil.iter_modules(evaluate.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{evaluate.__name__}.{info.name}")
        if hasattr(module, "add_command"):
            module.add_command(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
