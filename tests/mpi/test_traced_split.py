"""Any nn.Module split by tracing, under real ranks: a model with functional ops between its
layers trains as plain PyTorch (sync, float64, <= 1e-10) for K in {1, 2, 3}; a skip
connection across a cut matches the reference (fdg); a model that cannot be traced is one
line, printed once; two identical runs write bit-identical training numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "ranks"))

from compare import compare_to_reference, load_dump  # noqa: E402
from launcher import REPO, mpirun, run_ranks  # noqa: E402
from toy import toy_config, toy_data, toy_model  # noqa: E402
from transports import TRANSPORTS, each_transport  # noqa: E402

from dpsgs.job.data import get_batch  # noqa: E402
from dpsgs.job.metrics import read_metrics  # noqa: E402
from dpsgs.job.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from dpsgs.job.run_setup import prepare  # noqa: E402


def _backprop(cfg, kind, steps):
    """Plain PyTorch on the same module, global batches, optimizer and LR schedule."""
    one = toy_config(**{**cfg.to_dict(), "stages": 1, "split": None})
    setup = prepare(one, toy_model(kind=kind), toy_data())
    m = setup.model
    opt = build_optimizer(m.parameters(), one)
    nb = setup.batches_per_epoch
    for g in range(steps):
        e, b = divmod(g, nb)
        xs, ys = zip(*(get_batch(setup.train, setup.sampler, e, b, r) for r in range(cfg.replicas)))
        opt.zero_grad()
        F.cross_entropy(m(torch.cat(xs).double()), torch.cat(ys)).backward()
        set_lr(opt, lr_at(g, setup.total_iterations, one, nb))
        opt.step()
    return m.state_dict()


@pytest.mark.parametrize("K,N,split", [(1, 2, None), (2, 1, ["fc2"]), (3, 1, ["fc2", "fc3"])])
def test_functional_ops_between_layers_sync_equals_plain_pytorch(tmp_path, K, N, split):
    # regression (issue 16): the stages were model.children(), F.relu and torch.tanh dropped
    spec = {"name": f"relu-K{K}", "model": "relu", "schedule": "sync", "stages": K,
            "replicas": N, "split": split, "micro_batches": 2, "max_steps": 14}
    run_ranks(K * N, "train_dump.py", str(tmp_path), TRANSPORTS[0], json.dumps([spec]),
              timeout=240)
    dump = load_dump(tmp_path / f"{spec['name']}.pt")
    cfg = toy_config(**{k: v for k, v in spec.items() if k not in ("name", "model")})
    want = _backprop(cfg, "relu", 14)
    for r in range(N):
        got = {k: v for d in dump["ranks"] if d["replica"] == r for k, v in d["state"].items()}
        assert list(got) == list(want)                       # module paths, the model's order
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert worst <= 1e-10, f"replica {r}: max |dpsgs - plain PyTorch| = {worst:.3e}"
    assert dump["summary"]["split"] == (split or [])


@pytest.mark.parametrize("transport", each_transport())
def test_skip_connection_across_a_cut_fdg_equals_reference(tmp_path, transport):
    specs = [{"name": f"skip-{stash}", "model": "skip", "stages": 2, "replicas": 2,
              "split": ["block.b"], "stash": stash, "shrink": beta, "max_steps": 10}
             for stash, beta in (("weights", 1.0), ("recompute", 0.5))]
    run_ranks(4, "train_dump.py", str(tmp_path), transport, json.dumps(specs), timeout=240)
    for spec in specs:
        figures = compare_to_reference(load_dump(tmp_path / f"{spec['name']}.pt"), spec)
        assert figures["loss_diff"] <= 1e-10 and figures["param_diff"] <= 1e-10
        assert figures["test_accuracy"] == figures["ref_test_accuracy"]


def test_a_model_that_cannot_be_traced_is_one_line_printed_once(tmp_path):
    run = run_ranks(2, "refusal_ranks.py", TRANSPORTS[0], timeout=120)
    lines = [ln for ln in run.stderr.splitlines() if "cannot split" in ln]
    assert len(lines) == 1, run.tail()
    assert ("cannot split Gated into stages: Gated.forward cannot be traced: symbolically "
            "traced variables cannot be used as inputs to control flow") in lines[0], run.tail()
    assert "Traceback" not in run.stderr
    assert sorted(ln for ln in run.stdout.splitlines() if ln.startswith("rank")) == \
        ["rank 0: refused", "rank 1: refused"]


def _cli(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [mpirun(), "-n", "2", sys.executable, "-m", "dpsgs", "train", "-K", "2",
           "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--batch-size", "32",
           "--run-dir", str(run_dir), "--no-progress", "--timeout", "60", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240,
                          stdin=subprocess.DEVNULL, env={**__import__("os").environ,
                                                         "OMP_NUM_THREADS": "1"})


_TIMING = ("samples_per_s", "compute", "channel", "reduce", "seconds", "stash_bytes", "time")


def test_two_identical_runs_give_bit_identical_numbers(tmp_path):
    # regression (issue 16): the default balance profiled time on each start and could pick
    # another split, so the same command and seed gave other accuracies
    runs = [_cli(tmp_path / name) for name in ("a", "b")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    splits = [[ln for ln in run.stderr.splitlines() if "split: mlp into 2 stages" in ln]
              for run in runs]
    assert all(len(s) == 1 for s in splits) and splits[0] == splits[1], splits
    assert "balanced by flops" in splits[0][0]

    def numbers(name: str) -> list[dict]:
        return [{k: v for k, v in rec.items() if k not in _TIMING}
                for rec in read_metrics(tmp_path / name / "metrics.jsonl")]

    a, b = numbers("a"), numbers("b")
    assert len(a) > 10 and a == b                 # every loss, accuracy, evaluation: bit-equal
    sa, sb = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("a", "b"))
    assert sa["split"] == sb["split"] and sa["test_accuracy"] == sb["test_accuracy"]
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["split"] == sa["split"] and record["history"][0]["split_by"] == "flops"
