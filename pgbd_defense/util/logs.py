"""Console logging for the commands (libraries only log; the entry points configure)."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    """One console handler on the root logger (added once per process), INFO or DEBUG."""
    root = logging.getLogger()
    if not any(getattr(h, "_pgbd_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._pgbd_console = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("filelock").setLevel(logging.WARNING)  # it logs every acquire and release
    logging.captureWarnings(True)
