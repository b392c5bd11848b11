"""TRANSPORT: the transport seam and its MPI / NCCL implementations."""
