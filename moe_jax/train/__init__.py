"""Training: partitioning, trainer, optimizers, checkpoints, metrics."""
