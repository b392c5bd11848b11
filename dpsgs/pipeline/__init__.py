"""ALGORITHM: schedules, partitioning, stage compute, the step executor, the reference."""
