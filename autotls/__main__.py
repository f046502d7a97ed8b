"""``python -m autotls``: the command line (see :mod:`autotls.cli`)."""

import sys

from autotls.cli import main

if __name__ == "__main__":
    sys.exit(main())
