"""tumorsynth: a batch toolkit for synthetic-data brain-tumour segmentation research on SLURM clusters."""

__version__ = "0.1.0"
