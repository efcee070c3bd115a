"""Whole-installation checks (``tumorsynth check``): every path run for real, each figure against its target."""
