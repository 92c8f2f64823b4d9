"""``python -m pgbd_defense.sweep``: the sweep command (``pgbd_defense/experiments/sweep.py``)."""

import sys

from .experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
