"""Rank program (2 ranks): torch.distributed.nn imported after the gloo group exists keeps the
group alive past destroy_process_group, and close_gloo raises instead of leaving its threads
to race interpreter exit."""

from datetime import timedelta

import torch.distributed as dist

from dpsgs.bench.peers.common import close_gloo, mpi_rank_size

rank, size = mpi_rank_size()
dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=60))
import torch.distributed.nn  # noqa: E402,F401  (binds group.WORLD as a default argument)

close_gloo()
