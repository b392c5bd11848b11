"""Benchmark runners, one per peer: single process, PyTorch DDP, torch pipelining, dpsgs."""

__all__ = ["common", "single", "ddp", "pipe", "dpsgs_run", "tta_torch", "tta_dpsgs"]
