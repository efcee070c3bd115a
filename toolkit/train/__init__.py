"""Training: the shared loop, checkpoints and distributed layer, and one trainer module per model."""
