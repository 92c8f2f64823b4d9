"""The defenses PGBD is compared with, for the standalone path (inside a BackdoorBench
checkout the benchmark's own implementations are used). Each is a :class:`Method` of
the shared loop in ``finetune.py``; what follows its paper and what is simplified is
in ``docs/baselines.md``."""
