"""The trainer over torch.distributed (dpsgs.comm.torch_dist.TorchTransport) under real ranks.

Channels and all-reduce over gloo (on the default group with tags, and on two-rank groups
per direction as NCCL uses them) and over the "dpsgs" backend: byte-exact messages, one
HeaderMismatch per kind of difference, refusals, a deadline naming the peer, the job on a
group the script initialised. Then fdg ==
the single-process reference (float64, <= 1e-10) over gloo for K x N in {2x1, 2x2, 3x1, 1x2}
and over "dpsgs" for 2x2, with the job initialising torch.distributed itself over mpi://;
and `python -m dpsgs train --transport torch` with no environment variables."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import compare_to_reference, load_dump  # noqa: E402
from launcher import run_ranks  # noqa: E402

pytest.importorskip("dpsgs._C", reason="dpsgs._C not built")

WHERE = "channel 'act s0->s1' message #{} on rank 1 from rank 0: "


@pytest.mark.parametrize("backend,pairs", [("gloo", ""), ("gloo", "pairs"), ("dpsgs", "")],
                         ids=["gloo", "gloo-pair-groups", "dpsgs"])
def test_channels_and_allreduce(backend: str, pairs: str) -> None:
    run = run_ranks(2, "torch_transport_ranks.py", backend, *([pairs] if pairs else []), timeout=180)
    out = run.stdout
    assert "PASS" in out, run.tail()
    assert "rank 0: conforms; all-reduce is the mean" in out, run.tail()
    assert "rank 1: received 64 messages byte-exact" in out, run.tail()
    assert re.search(r"rank 0: sent 64 messages, at most 2 in flight", out), run.tail()
    # the sender's messages #64, #65 are the first case's; each case sends two
    assert WHERE.format(64) + "expected 2 tensor(s) [float32 (2, 3), int64 (0,)] but received 3 " \
        "[float32 (2, 3), int64 (0,), float64 (20000,)]" in out, run.tail()
    assert WHERE.format(66) + "tensor 1 of 3: expected dtype int32 shape (0,) but received dtype " \
        "int64 shape (0,)" in out, run.tail()
    assert WHERE.format(68) + "tensor 2 of 3: expected dtype float64 shape (20001,) but received " \
        "dtype float64 shape (20000,)" in out, run.tail()
    for r, end in ((0, "send #70: a message holds 1 to 16 tensors; got 17"),
                   (1, "recv #70: a message holds 1 to 16 tensors; expected 17")):
        assert f"rank {r}: refused: rank {r}: channel 'act s0->s1' {end}" in out, run.tail()
    other = "dpsgs" if backend == "gloo" else "gloo"
    assert f"rank 0: refused: --torch-backend {other}: torch.distributed is initialised already, " \
        f"with backend {backend}" in out, run.tail()
    assert "rank 1: the job used the script's group and left it" in out, run.tail()
    line = next(x for x in out.splitlines() if "CommTimeout" in x)
    assert "rank 1: channel 'grad r0 s1->s0' recv #0 from rank 0: no progress after 1.5 s" in line, line
    took = float(re.search(r"after ([0-9.]+) s: CommTimeout", line).group(1))
    assert 1.4 <= took < 10, line


def _specs(K: int, N: int, backend: str) -> list[dict]:
    base = {"stages": K, "replicas": N, "max_steps": 10, "transport": "torch",
            "torch_backend": backend}
    # both stash and both overlap modes; with N = 2 BatchNorm's per-replica buffers, and
    # AdamW with warm-up over one pipeline across both epochs
    return [{"name": f"{backend}-weights-backward", **base},
            {"name": f"{backend}-recompute-step", "stash": "recompute", "overlap": "step",
             "shrink": 0.5, "bn": N == 2, **base}] + \
        ([{"name": f"{backend}-adamw-warmup-noflush", "optimizer": "adamw", "lr": 0.01,
           "warmup_epochs": 0.5, "flush_every_epoch": False, "epochs": 2, **base}] if N == 2 else [])


@pytest.mark.parametrize("K,N,backend", [(2, 1, "gloo"), (2, 2, "gloo"), (3, 1, "gloo"),
                                         (1, 2, "gloo"), (2, 2, "dpsgs")],
                         ids=["K2N1-gloo", "K2N2-gloo", "K3N1-gloo", "K1N2-gloo", "K2N2-dpsgs"])
def test_fdg_equals_reference_over_torch(tmp_path: Path, K: int, N: int, backend: str) -> None:
    specs = _specs(K, N, backend)
    run_ranks(K * N, "train_dump.py", str(tmp_path), "config", json.dumps(specs), timeout=300)
    for spec in specs:
        dump = load_dump(tmp_path / f"{spec['name']}.pt")
        want = 2 if spec.get("overlap") == "step" else (1 if N > 1 else 0)
        assert [d["grad_sets"] for d in dump["ranks"]] == [want] * K * N
        figures = compare_to_reference(dump, spec)
        assert figures["loss_diff"] <= 1e-10 and figures["param_diff"] <= 1e-10, (spec, figures)
        assert figures["test_accuracy"] == figures["ref_test_accuracy"]


def test_cli_trains_over_torch_with_no_environment(tmp_path: Path) -> None:
    """The job initialises torch.distributed itself (mpi://): no MASTER_ADDR/PORT, no RANK;
    and ends cleanly (regression: mpi://'s store server outlived MPI_Finalize: a segfault)."""
    import os

    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(os.environ)
    run = run_ranks(2, "dpsgs", "train", "-K", "2", "-N", "1", "--transport", "torch",
                    "--torch-backend", "gloo", "--max-steps", "4", "--epochs", "1",
                    "--no-progress", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
                    module=True, timeout=180)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["transport"], config["torch_backend"]) == ("torch", "gloo"), config
    assert "final test accuracy" in run.stdout, run.tail()
