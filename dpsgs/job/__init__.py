"""TRAINING JOB: run setup, trainer, optimizer, data, models, checkpoints, metrics, plots."""
