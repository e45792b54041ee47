"""Command line: ``recmeta <command>`` or ``python -m recmeta_sdk <command>``.

Commands
--------
env       what is installed and which backends are available, and why
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _cmd_env(args) -> int:
    import numpy
    import torch

    from . import __version__, backends

    print(f"recmeta {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    print(f"numpy {numpy.__version__}, torch {torch.__version__}")
    try:
        from . import _core

        print(f"compiled core: CPU kernel variant '{_core.cpu_isa()}' "
              f"(best on this CPU: '{_core.cpu_best_isa()}'), OpenMP "
              f"{'on' if _core.has_openmp() else 'off'}, {_core.get_num_threads()} threads")
    except ImportError as e:
        print(f"compiled core: not available ({e})")
    print("backends:")
    for name, (ok, why) in backends.describe().items():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    print(f"default CPU backend: {backends.resolve(None, 'cpu')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recmeta", description="recmeta recommender SDK")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="show the installation and the available backends")
    p.set_defaults(func=_cmd_env)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
