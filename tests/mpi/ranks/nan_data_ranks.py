"""Rank program: dpsgs.train on own data holding NaN (K=2 x N=2), `nan_data_ranks.py MODE RUN_DIR`.

train: one training sample is NaN, the one replica 1 gets in batch 2 of epoch 0; every rank
prints the error it raised. test: 3 test samples are NaN; rank 0 prints the summary as JSON.
"""

import json
import sys

import torch
from mpi4py import MPI

import dpsgs
from dpsgs.job.data import BatchSampler, Dataset

torch.set_num_threads(1)
mode, run_dir = sys.argv[1], sys.argv[2]
comm = MPI.COMM_WORLD
g = torch.Generator().manual_seed(0)
x, y = torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g)
tx, ty = torch.randn(40, 16, generator=g), torch.randint(0, 4, (40,), generator=g)
config = dpsgs.TrainConfig(stages=2, replicas=2, model="mlp", batch_size=8, epochs=2,
                           lr_schedule="constant", balance="params", timeout=30.0,
                           progress=False, run_dir=run_dir, seed=3)
if mode == "train":
    victim = int(BatchSampler(128, 8, 2, config.seed).indices(0, 2, 1)[0])
    x[victim, 5] = float("nan")
else:
    tx[[3, 17, 31], 0] = float("nan")
data = (Dataset(x, y, 4, "own"), Dataset(tx, ty, 4, "own"))
try:
    summary = dpsgs.train(config, comm, data=data)
    if comm.Get_rank() == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)
except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
    print(f"rank {comm.Get_rank()} raised {type(e).__name__}: {e}", flush=True)
