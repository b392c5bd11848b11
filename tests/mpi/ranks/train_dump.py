"""Rank program: train the toy model under several configs in one launch and dump, per
config, every rank's losses, observed staleness and final parameters to OUT/NAME.pt.

    mpirun -n P python -m mpi4py train_dump.py OUT TRANSPORT '[{"name": .., <TrainConfig>}]'

TRANSPORT: a name for Trainer (core, mpi4py), or `config`: each spec's own (e.g.
"transport": "torch", "torch_backend": "gloo").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from dpsgs.job.trainer import Trainer
from dpsgs.pipeline.recorder import Recorder
from toy import toy_config, toy_data, toy_model

torch.set_num_threads(1)


def main() -> None:
    out, transport, specs = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    transport = None if transport == "config" else transport
    comm = MPI.COMM_WORLD
    for spec in specs:
        spec = dict(spec)
        name, bn, kind = spec.pop("name"), spec.pop("bn", False), spec.pop("model", "seq")
        cfg = toy_config(**spec)
        rec = Recorder()
        t = Trainer(cfg, comm, model=toy_model(bn=bn, kind=kind), data=toy_data(),
                    transport=transport, hooks=rec)
        summary = t.fit()
        w = t.executor
        mine = {"rank": t.rank, "replica": t.replica, "stage": t.stage,
                "losses": {g: v for (g, _), v in rec.losses.items()},
                "staleness": list(rec.staleness),
                "params": [p.detach().cpu().clone() for p in w.compute.params],
                "state": {k: v.detach().cpu().clone() for k, v in w.compute.module.state_dict().items()},
                "buffers": [b.detach().cpu().clone() for b in w.compute.module.buffers()],
                "stash_peak_bytes": w.compute.peak_stash_bytes,
                "grad_sets": w.reducer.buffers if w.reducer else 0}
        everyone = comm.gather(mine, root=0)
        if comm.rank == 0:
            torch.save({"ranks": everyone, "summary": summary}, out / f"{name}.pt")
            keys = ("steps", "iterations", "staleness", "test_accuracy")
            print(f"{name}: {json.dumps({k: summary[k] for k in keys})}", flush=True)


if __name__ == "__main__":
    main()
