"""Training: the engine, its state, run folders and resume, checkpoints, the memory plan, folds and DDP launch."""
