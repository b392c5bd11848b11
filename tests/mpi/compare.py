"""Hold a dumped distributed run (tests/mpi/ranks/train_dump.py) against the single-process
reference (dpsgs.pipeline.reference over the loopback transport)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "ranks"))

from dpsgs.job.simulate import reference_for  # noqa: E402
from toy import toy_config, toy_data, toy_model  # noqa: E402

__all__ = ["compare_to_reference", "load_dump"]


def load_dump(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def compare_to_reference(dump: dict, spec: dict) -> dict:
    """Assert losses (per global batch and replica), observed staleness and final parameters
    of every rank equal the reference's (float64, <= 1e-10); return figures for reports."""
    spec = {k: v for k, v in spec.items() if k != "name"}
    bn, kind = spec.pop("bn", False), spec.pop("model", "seq")
    cfg = toy_config(**spec)
    ref = reference_for(cfg, toy_model(bn=bn, kind=kind), toy_data())
    summary = ref.run()
    K, N = cfg.stages, cfg.replicas
    ranks = {(d["replica"], d["stage"]): d for d in dump["ranks"]}
    assert sorted(ranks) == [(r, k) for r in range(N) for k in range(K)]
    worst_loss = worst_param = 0.0
    for (r, k), d in ranks.items():
        if k == K - 1:
            got = {(g, r): v for g, v in d["losses"].items()}
            want = {key: v for key, v in ref.losses.items() if key[1] == r}
            assert sorted(got) == sorted(want), f"replica {r}: {sorted(got)} vs {sorted(want)}"
            for key, (loss, correct) in want.items():
                worst_loss = max(worst_loss, abs(got[key][0] - loss))
                assert got[key][1] == correct, f"replica {r} batch {key[0]}: correct differs"
        else:
            assert d["losses"] == {}
        # observed staleness: the same records as the reference, = 2(K-1-k) (+1 step)
        expect = 2 * (K - 1 - k) + (cfg.overlap == "step") if cfg.schedule == "fdg" else 0
        want_st = sorted(s for s in ref.staleness if s[0] == k)
        assert sorted(d["staleness"]) == want_st
        assert {s[2] for s in d["staleness"]} == {expect}, (k, d["staleness"][:4])
        for p, q in zip(d["params"], ref.parameters(r)[k], strict=True):   # (a GPU reference too)
            worst_param = max(worst_param, float((p.cpu() - q.cpu()).abs().max()))
        ref_buffers = list(ref.executors[r][k].compute.module.buffers())
        for b, c in zip(d.get("buffers", ref_buffers), ref_buffers, strict=True):
            worst_param = max(worst_param, float((b.cpu().double() - c.cpu().double()).abs().max()))
    assert worst_loss <= 1e-10, f"loss differs by {worst_loss:.3e}"
    assert worst_param <= 1e-10, f"parameters differ by {worst_param:.3e}"
    for k in range(K):   # replicas of a stage hold identical parameters
        for r in range(1, N):
            for p, q in zip(ranks[(r, k)]["params"], ranks[(0, k)]["params"]):
                assert torch.equal(p, q)
    return {"loss_diff": worst_loss, "param_diff": worst_param,
            "ref_test_accuracy": summary["test_accuracy"],
            "test_accuracy": dump["summary"]["test_accuracy"]}
