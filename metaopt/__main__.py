"""``python -m metaopt``: the same as the ``metaopt`` command."""

import sys

from metaopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
