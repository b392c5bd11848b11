"""The training bench's dpsgs split: module paths inside a block, or torch pipelining's blocks."""

from __future__ import annotations

from dpsgs.bench import train
from dpsgs.bench.train_configs import Workload

W = Workload("t", "resnet20", (3, 8, 8), 16, "test")


def test_dpsgs_split_kinds():
    flops = train.dpsgs_split(W, "flops", [4])
    assert flops["split_by"] == "flops" and len(flops["split"]) == 1
    assert flops == train.dpsgs_split(W, "flops", [4])                # deterministic
    assert len(flops["stage_costs"]) == 2 and flops["stage_cost_unit"] == "MFLOP-eq/sample"
    timed = train.dpsgs_split(W, "time", [4])
    assert timed["split_by"] == "time" and timed["stage_cost_unit"] == "ms/batch"
    assert all(c > 0 for c in timed["stage_costs"])
    assert train.dpsgs_split(W, "blocks", [4]) == {"split": ["4"], "split_by": "blocks",
                                                   "stage_costs": None, "stage_cost_unit": None}
    line = train._split_line(flops)
    assert line.startswith(f"dpsgs K=2 split before '{flops['split'][0]}' (flops; predicted")


def test_the_bench_splits_as_the_trainer_does_by_default():
    # the trainer's own default (TrainConfig.balance) is what a bench run measures unless told
    from dpsgs.config import TrainConfig

    assert train.build_parser().parse_args([]).dpsgs_split == "flops" == TrainConfig().balance
