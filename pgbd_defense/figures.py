"""``python -m pgbd_defense.figures``: the figures command (``pgbd_defense/experiments/figures.py``)."""

import sys

from .experiments.figures import main

if __name__ == "__main__":
    sys.exit(main())
