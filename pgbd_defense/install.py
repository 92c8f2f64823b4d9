"""``python -m pgbd_defense.install``: the BackdoorBench installer (``pgbd_defense/bench/installer.py``)."""

import sys

from .bench.installer import main

if __name__ == "__main__":
    sys.exit(main())
