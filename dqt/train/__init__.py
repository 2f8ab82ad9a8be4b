"""Training: distributed environment, data, models, optimizers, logging, checkpoints, the trainer."""
