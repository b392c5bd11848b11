"""sync schedule under mpirun == single-process backprop on the same global batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "ranks"))

from compare import load_dump  # noqa: E402
from launcher import run_ranks  # noqa: E402
from toy import toy_config, toy_data, toy_model  # noqa: E402
from transports import TRANSPORTS, each_transport  # noqa: E402

from dpsgs.job.run_setup import prepare  # noqa: E402
from dpsgs.job.data import get_batch  # noqa: E402
from dpsgs.job.optim import build_optimizer, lr_at, set_lr  # noqa: E402


def backprop(cfg, steps):
    """Plain single-process training of the full model on each global batch (the N
    replicas' shares joined), same optimizer and LR schedule; the final parameters."""
    setup = prepare(cfg, toy_model(), toy_data())
    m = setup.model
    opt = build_optimizer(m.parameters(), cfg)
    nb = setup.batches_per_epoch
    for g in range(steps):
        e, b = divmod(g, nb)
        xs, ys = zip(*(get_batch(setup.train, setup.sampler, e, b, r)
                       for r in range(cfg.replicas)))
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.cat(xs).double()), torch.cat(ys)).backward()
        set_lr(opt, lr_at(g, setup.total_iterations, cfg, nb))
        opt.step()
    return [p.detach() for p in m.parameters()]


@pytest.mark.parametrize("transport", each_transport())
def test_sync_equals_backprop(tmp_path, transport):
    # 96 samples / (8 x 2) = 6 batches per epoch: 20 steps cross 3 epoch boundaries
    specs = [{"name": f"sync-{kind}", "schedule": "sync", "stages": 2, "replicas": 2,
              "sync_kind": kind, "micro_batches": 4, "epochs": 4, "max_steps": 20}
             for kind in ("1f1b", "gpipe")]
    run_ranks(4, "train_dump.py", str(tmp_path), transport, json.dumps(specs), timeout=240)
    for spec in specs:
        cfg = toy_config(**{k: v for k, v in spec.items() if k != "name"})
        want = backprop(cfg, 20)
        dump = load_dump(tmp_path / f"{spec['name']}.pt")
        assert dump["summary"]["iterations"] == 20
        got = {(d["replica"], d["stage"]): d["params"] for d in dump["ranks"]}
        positions = prepare(cfg, toy_model(), toy_data()).positions
        worst = 0.0
        for r in range(2):
            flat = [p for k in range(2) for p in got[(r, k)]]
            assert len(flat) == len(want)
            for p, q in zip(flat, want):
                worst = max(worst, float((p - q).abs().max()))
        assert worst <= 1e-10, f"{spec['name']}: max abs difference {worst:.3e}"
        assert positions == [2]                              # stage 1 starts at block 2


@pytest.mark.parametrize("transport", TRANSPORTS[:1])
def test_one_stage_is_data_parallel(tmp_path, transport):
    spec = {"name": "dp", "schedule": "sync", "stages": 1, "replicas": 2,
            "micro_batches": 2, "max_steps": 8}
    run_ranks(2, "train_dump.py", str(tmp_path), transport, json.dumps([spec]), timeout=120)
    cfg = toy_config(**{k: v for k, v in spec.items() if k != "name"})
    want = backprop(cfg, 8)
    dump = load_dump(tmp_path / "dp.pt")
    for d in dump["ranks"]:
        for p, q in zip(d["params"], want, strict=True):
            assert float((p - q).abs().max()) <= 1e-10
