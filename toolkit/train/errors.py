"""Why a training run stops with an error its user can act on; the CLI prints each as one line and exits non-zero.

Torch-free on purpose: the CLI catches these without importing the trainers (and torch) for every command.
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run cannot go on; the message names the run directory (or file) and what to do."""


class DivergedError(TrainingError):
    """A value a training step returned was not finite; the run stopped before saving, so its checkpoints are the
    last good ones."""


class CheckpointError(TrainingError):
    """A run directory holds checkpoints but none of them loads; the message names every file tried."""


class ClaimError(TrainingError):
    """The main rank could not claim the run directory (held, other config, other inputs); raised on the other ranks,
    which learn the outcome from one collective instead of waiting for a rank that has given up."""
