"""Training: the engine, checkpoints, early stopping, cross-validation and DDP launch."""
