"""Rank program for tests/mpi/test_newcomer.py: the trainer under real ranks with what a rank
sees of CUDA made up through the trainer's seam (`cuda_view=`), and your own data in each form.

    mpirun -n 2 python -m mpi4py newcomer_ranks.py auto-shared RUN_DIR   # 1 GPU, 2 ranks: cpu
    mpirun -n 2 python -m mpi4py newcomer_ranks.py cuda-cpu-torch RUN_DIR  # refused, one line
    mpirun -n 2 python -m mpi4py newcomer_ranks.py forms RUN_BASE        # 4 runs, one per form
"""

from __future__ import annotations

import json
import sys

import torch
from mpi4py import MPI
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from dpsgs.comm.device import CudaView
from dpsgs.job.agreement import SetupFailed
from dpsgs.job.trainer import train
from toy import toy_config, toy_data, toy_model


class Items(TorchDataset):
    """Map-style: (input, label) items, labels as Python ints."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].clone(), int(self.y[i])


def main() -> None:
    mode, where = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if mode == "auto-shared":
        # one host, one GPU, a CUDA torch and the NCCL build: all but a GPU for each rank
        view = CudaView("gpu-host", rank, ("GPU-0",), True, "2.13.0+cu130", True)
        s = train(toy_config(stages=2, device="auto", run_dir=where), comm,
                  model=toy_model(), data=toy_data(), cuda_view=view)
        if rank == 0:
            print("SUMMARY " + json.dumps({k: s.get(k) for k in ("device", "device_why", "model", "dataset")}))
    elif mode == "cuda-cpu-torch":
        view = CudaView("gpu-host", rank, ("GPU-0", "GPU-1"), False, "2.13.0+cpu", False)
        outcome = "trained"
        try:
            train(toy_config(stages=2, device="cuda", run_dir=where), comm,
                  model=toy_model(), data=toy_data(), cuda_view=view)
        except SetupFailed:
            outcome = "refused"
        said = comm.gather(f"rank {rank}: {outcome}", root=0)   # one printer: no interleaving
        if rank == 0:
            print("\n".join(said), flush=True)
    elif mode == "forms":
        train_ds, test_ds = toy_data()
        forms = {
            "pair": ((train_ds.x, train_ds.y), (test_ds.x, test_ds.y)),
            "tensordataset": (TensorDataset(train_ds.x, train_ds.y), TensorDataset(test_ds.x, test_ds.y)),
            "map-style": (Items(train_ds.x, train_ds.y), Items(test_ds.x, test_ds.y)),
            "dpsgs": (train_ds, test_ds),
        }
        for name, data in forms.items():
            s = train(toy_config(stages=2, device="cpu", run_dir=f"{where}/{name}"), comm,
                      model=toy_model(), data=data)
            if rank == 0:
                print(f"FORM {name} " + json.dumps({"test_loss": s["test_loss"].hex(),
                                                    "test_accuracy": s["test_accuracy"],
                                                    "final_train_loss": s["final_train_loss"].hex(),
                                                    "dataset": s["dataset"]}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
