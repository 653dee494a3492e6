"""Experiments from config files: sweeps over recipe keys (`sweep.py`)."""
