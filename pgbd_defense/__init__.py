"""PGBD: prototype guided backdoor defense, a BackdoorBench plugin."""

__version__ = "0.1.0"
