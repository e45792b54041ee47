"""``python -m recmeta_sdk``: the command line (:mod:`recmeta_sdk.cli`)."""
from .cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main())
