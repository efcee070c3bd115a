"""Metrics shared by training, evaluation and the command line."""
