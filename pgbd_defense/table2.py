"""``python -m pgbd_defense.table2``: the Table 2 command (``pgbd_defense/experiments/table2.py``)."""

import sys

from .experiments.table2 import main

if __name__ == "__main__":
    sys.exit(main())
