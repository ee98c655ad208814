"""``python -m benchmarks``: run the bench (see ``benchmarks/__init__.py``)."""

import sys

from benchmarks.run import main

if __name__ == "__main__":
    sys.exit(main())
