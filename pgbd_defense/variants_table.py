"""``python -m pgbd_defense.variants_table``: the variants table command (``pgbd_defense/experiments/variants.py``)."""

import sys

from .experiments.variants import main

if __name__ == "__main__":
    sys.exit(main())
