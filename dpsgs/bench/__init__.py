"""Benchmarks: communication microbenchmarks (dpsgs vs raw mpi4py) and training throughput.

Communication (`python -m dpsgs.bench.comm`): `harness` (sizes, timing, tables, JSON,
verification), `p2p` (channel latency and bandwidth), `allreduce` (time/algbw/busbw),
`overlap` (OSU overlap %), `report` (side-by-side tables, summary), `comm` (entry point).
NCCL on GPUs (`python -m dpsgs bench nccl`): `nccl`, dpsgs's NCCL all-reduce and channel
against torch.distributed's, same ranks, sizes and buffers.
Training (`python -m dpsgs.bench.train`): the `train*` and `tta` modules. Both write through
`outputs`: a new run-specific name by default, never over another run's results.
"""

__all__ = ["allreduce", "comm", "harness", "nccl", "outputs", "overlap", "p2p", "report"]
