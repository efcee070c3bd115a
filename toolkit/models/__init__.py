"""Network architectures only (no data or training imports): the paper's U-Net, PGAN and SPADE."""
