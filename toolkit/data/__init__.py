"""Data layer: demo cohort, NIfTI ingest, label schemes, sharded HDF5 stores, PNG export and torch datasets."""
