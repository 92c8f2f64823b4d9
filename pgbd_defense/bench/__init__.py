"""Running inside a BackdoorBench checkout: the defense class the benchmark's scripts
expect (``plugin.py``), what the installer adds to a checkout (``installer.py``),
``python -m pgbd_defense.run`` inside a checkout (``driver.py``), and the benchmark's own
attack and defense scripts run for side-by-side comparison (``compare.py``). Nothing here
imports BackdoorBench at import time: its modules are imported from the checkout when a
command runs inside one."""
