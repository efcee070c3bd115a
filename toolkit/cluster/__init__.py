"""SLURM and submitit: executors, sweeps, pipelines. The only package besides jobs/ that imports submitit."""
