"""``python -m pgbd_defense.teacher``: the teacher-training command (``pgbd_defense/experiments/teacher.py``)."""

import sys

from .experiments.teacher import main

if __name__ == "__main__":
    sys.exit(main())
