"""Running inside a BackdoorBench checkout: the defense class the benchmark's scripts
expect (``plugin.py``), what the installer adds to a checkout (``install.py``), and
running the benchmark's own defense scripts for side-by-side comparison
(``compare.py``). Nothing here imports BackdoorBench at import time: its modules are
imported from the checkout when a command runs inside one."""
