"""The BN-vs-GN comparison behind compare.py: ``study.config`` (grid, presets, per-cell TrainConfig),
``study.runner`` (trains every cell through ``engine.fit``), ``study.report`` (study.csv / .md / .png).

Imports engine/ and below; never a script (see docs/architecture.md).
"""
