"""Exports of our data for other tools: nnU-Net v2 raw datasets (``tumorsynth export nnunet``)."""
