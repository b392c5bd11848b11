"""Any nn.Module split by tracing: what crosses a cut, module-path names, what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsgs.config import TrainConfig
from dpsgs.job.data import Dataset
from dpsgs.job.run_setup import prepare
from dpsgs.job.simulate import reference_for
from dpsgs.pipeline.graph import ModelGraph, SplitError
from dpsgs.pipeline.split import is_random, resolve_split, stage_module


class ReluNet(nn.Module):
    """The issue's Net: functional ops between child layers (a children() split dropped them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class Gated(nn.Module):
    """Data-dependent control flow in the model's own forward: cannot be cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class _Choose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.a(x) if float(x.detach().mean()) > 0 else self.b(x)


class InnerGate(nn.Module):
    """Data-dependent control flow inside a submodule: that module runs whole."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gate, self.fc2 = nn.Linear(6, 16), _Choose(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.gate(torch.tanh(self.fc1(x)))))


def _data(n=96, f=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, classes, "toy"), Dataset(x[:40], y[:40], classes, "toy")


def _config(**kw):
    base = dict(stages=2, replicas=1, dtype="float64", batch_size=8, epochs=1, lr=0.1,
                momentum=0.9, weight_decay=1e-3, lr_schedule="cosine", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _backprop(cfg, data, model, steps):
    """Plain PyTorch on the user's module: the same global batches, optimizer, LR schedule."""
    from dpsgs.job.data import get_batch
    from dpsgs.job.optim import lr_at, set_lr

    setup = prepare(_config(**{**cfg.to_dict(), "stages": 1, "split": None}), copy.deepcopy(model), data)
    m = setup.model
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, foreach=False)
    nb = setup.batches_per_epoch
    for g in range(steps):
        e, b = divmod(g, nb)
        xs, ys = zip(*(get_batch(setup.train, setup.sampler, e, b, r) for r in range(cfg.replicas)))
        opt.zero_grad()
        F.cross_entropy(m(torch.cat(xs).double()), torch.cat(ys)).backward()
        set_lr(opt, lr_at(g, setup.total_iterations, cfg, nb))
        opt.step()
    return m.state_dict()


def _trained(ref):
    """Replica 0's whole model state, from its stages' state_dicts (keyed by module path)."""
    return {k: v for ex in ref.executors[0] for k, v in ex.compute.module.state_dict().items()}


def _worst(a, b):
    assert list(a) == list(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("K,split", [(1, None), (2, None), (2, ["fc3"]), (3, ["fc2", "fc3"])])
def test_functional_ops_between_children_train_as_plain_pytorch(K, split):
    # regression (issue 16): the pipeline was built from model.children(), dropping F.relu
    # and torch.tanh; sync float64 must equal plain PyTorch on the same module
    torch.manual_seed(0)
    model, data = ReluNet(), _data()
    cfg = _config(schedule="sync", stages=K, replicas=2, split=split, micro_batches=2, epochs=2)
    ref = reference_for(cfg, copy.deepcopy(model), data)
    ref.run()
    assert _worst(_trained(ref), _backprop(cfg, data, model, ref.iterations)) <= 1e-10


def test_untraceable_model_is_refused_in_one_line():
    with pytest.raises(SplitError) as e:
        prepare(_config(), Gated(), _data())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot split Gated into stages: Gated.forward cannot be traced: "
                          "symbolically traced variables cannot be used as inputs to control flow")
    assert "--stages 1 runs any model" in msg
    reference_for(_config(stages=1), Gated(), _data()).run()    # K = 1: any forward trains


def test_untraceable_submodule_runs_whole_and_trains_exactly():
    torch.manual_seed(1)
    model, data = InnerGate(), _data()
    cfg = _config(schedule="sync", stages=3, split=["gate", "fc2"], micro_batches=1, max_steps=6)
    setup = prepare(cfg, copy.deepcopy(model), data)
    assert setup.choice.whole == ["gate"]
    assert "run whole, their forward not traceable: gate" in setup.choice.describe("InnerGate", 3)
    with pytest.raises(SplitError, match=r"before 'gate.b': its forward never runs that module"):
        prepare(_config(split=["gate.b"]), copy.deepcopy(model), data)
    assert is_random(setup.stage_layers(setup.model, 1))    # unknown draws: recompute replays
    ref = reference_for(cfg, copy.deepcopy(model), data)
    ref.run()
    assert _worst(_trained(ref), _backprop(cfg, data, model, 6)) <= 1e-10


# ---------------------------------------------------------------------------- what crosses

class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(x + self.b(torch.tanh(self.a(x))))


class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(6, 8), Block(), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.block(torch.tanh(self.inp(x))))


def test_a_cut_inside_a_block_carries_the_skip_tensor():
    torch.manual_seed(0)
    m = SkipNet().double()
    g = ModelGraph.trace(m, torch.randn(3, 6, dtype=torch.float64))
    p = g.position("block.b")
    assert [v.name for v in g.live(p)] == ["tanh", "tanh_1"]      # x of the block, and a's output
    assert g.specs(p) == [(torch.float64, (8,)), (torch.float64, (8,))]
    assert [g.name(c) for c in g.candidates()] == ["block", "block.b", "out"]
    stages = [stage_module(g, m, [p], k) for k in range(2)]
    x = torch.randn(5, 6, dtype=torch.float64)
    mid = stages[0](x)
    assert isinstance(mid, tuple) and len(mid) == 2
    torch.testing.assert_close(stages[1](*mid), m(x), rtol=0, atol=0)
    # parameters keep the model's module paths and order
    assert list(stages[0].state_dict()) == ["inp.weight", "inp.bias", "block.a.weight", "block.a.bias"]
    assert list(stages[1].state_dict()) == ["block.b.weight", "block.b.bias", "out.weight", "out.bias"]


def test_module_paths_and_integer_points_resolve_alike():
    m = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), nn.ReLU(), nn.Linear(8, 3))
    g = ModelGraph.trace(m, torch.randn(3, 3, 4))
    assert resolve_split(g, [1], 2) == resolve_split(g, ["1"], 2) == [2]
    assert resolve_split(g, ["0.1"], 2) == [1]
    assert g.name(1) == "0.1" and g.name(2) == "1"


class _Attrs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.offset = torch.ones(4)            # a plain tensor attribute, not a buffer

    def forward(self, x):
        return self.fc2(self.fc(x) * self.scale + self.offset)


def test_stage_attributes_mirror_the_model():
    m = _Attrs()
    g = ModelGraph.trace(m, torch.randn(3, 4))
    s0, s1 = (stage_module(g, m, [g.position("fc2")], k) for k in range(2))
    assert list(s0.state_dict()) == ["fc.weight", "fc.bias"]        # scale is not persistent
    assert [n for n, _ in s0.named_buffers()] == ["scale"]
    assert s0.offset is m.offset and "offset" not in dict(s0.named_buffers())
    assert list(s1.state_dict()) == ["fc2.weight", "fc2.bias"]


# ---------------------------------------------------------------------------- refusals

class _SizeAcross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        n = x.size(0)
        return self.fc2(self.fc1(x)).view(n, -1)


class _NoBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(6))
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        w = self.w * 2
        return self.fc2(self.fc1(x) * w)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mid = nn.Linear(6, 6), nn.Tanh()

    def forward(self, x):
        return self.fc(self.mid(self.fc(x)))[:, :3]


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x), x


class _TrainingFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x), 0.5, self.training))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, mask):
        return self.fc(x * mask)


@pytest.mark.parametrize("model,split,message", [
    (_SizeAcross, ["fc2"], "cannot split _SizeAcross before 'fc2': the value 'size' (a int, made "
                           "by _SizeAcross.forward) would have to cross it, and only tensors can"),
    (_NoBatch, ["fc1"], "cannot split _NoBatch before 'fc1': the tensor 'mul' of shape (6,) (made "
                        "by _NoBatch.forward) would have to cross it, and it has no batch dimension"),
    (_Shared, ["mid"], "cannot split _Shared before 'mid': module 'fc' is used on both sides of "
                       "it (parameters and buffers live in one stage)"),
    (_Pair, ["fc"], "cannot split _Pair: its forward returns tuple, not one tensor of logits"),
    (_TrainingFlag, ["fc2"], "cannot split _TrainingFlag: its forward reads self.training outside "
                             "torch.nn's layers (dropout); use the layer"),
    (_TwoInputs, ["fc"], "cannot split _TwoInputs: its forward takes (x, mask); dpsgs feeds it "
                         "one batch tensor"),
    (ReluNet, ["fc9"], "cannot split ReluNet before 'fc9': no such module (top-level modules: "
                       "fc1, fc2, fc3)"),
    (ReluNet, ["fc1"], "cannot split ReluNet before 'fc1': it is where the forward starts, so "
                       "stage 0 would be empty"),
    (ReluNet, ["fc3", "fc2"], "split ['fc3', 'fc2']: 'fc2' runs before 'fc3' does"),
    (ReluNet, [7], "cannot split ReluNet before top-level module 7: it has 3 (fc1, fc2, fc3)"),
])
def test_what_cannot_be_cut_is_refused(model, split, message):
    torch.manual_seed(0)
    cfg = _config(stages=len(split) + 1, split=split)
    with pytest.raises(SplitError) as e:
        prepare(cfg, model(), _data())
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_balance_skips_what_cannot_be_cut():
    torch.manual_seed(0)
    g = ModelGraph.trace(_SizeAcross(), torch.randn(3, 6))
    assert g.candidates() == []
    with pytest.raises(SplitError, match=r"cannot split _SizeAcross into 2 stages: it can be cut "
                                         r"only in 0 places \(before: none\)"):
        prepare(_config(), _SizeAcross(), _data())


def test_a_refused_model_is_left_as_it_was():
    torch.manual_seed(0)
    m = _Shared()
    before = copy.deepcopy(m.state_dict())
    modes = [mod.training for mod in m.modules()]
    with pytest.raises(SplitError):
        prepare(_config(split=["mid"]), m, _data())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert [mod.training for mod in m.modules()] == modes


# ---------------------------------------------------------------------------- training across cuts

@pytest.mark.parametrize("K,split,beta", [(2, ["block.b"], 1.0), (3, ["block", "block.b"], 0.5)])
def test_skip_connection_across_a_cut_fdg_matches_weight_versions(K, split, beta):
    from test_reference import _fdg_by_versions, _flat

    torch.manual_seed(2)
    model, data = SkipNet(), _data()
    cfg = _config(stages=K, split=split, shrink=beta, max_steps=9)
    ref = reference_for(cfg, copy.deepcopy(model), data)
    assert len(ref.executors[0][0].place.out_specs) == (2 if K == 2 else 1)
    ref.run()
    torch.testing.assert_close(_flat(ref), _fdg_by_versions(cfg, data, model, 9), rtol=0, atol=1e-12)


def _tiny_resnet():
    from dpsgs.job.models import BasicBlock, _head, _stem

    torch.manual_seed(5)
    return nn.Sequential(_stem(1, 4), BasicBlock(4, 4, 1, "A"), BasicBlock(4, 8, 2, "A"),
                         BasicBlock(8, 12, 1, "B"), _head(12, 3))


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Dataset(x, y, 3, "img"), Dataset(x[:24], y[:24], 3, "img")


@pytest.mark.parametrize("split", [["1.conv2"], ["2.bn2"], ["1.bn1", "2.shortcut"],
                                   ["2.conv2", "3.shortcut.1"]])
def test_cuts_inside_resnet_blocks_sync_equals_backprop(split):
    # one replica, one micro-batch: BatchNorm's batch statistics are the whole batch's, as
    # in backprop
    model, data = _tiny_resnet(), _images()
    cfg = _config(schedule="sync", stages=len(split) + 1, split=split, micro_batches=1,
                  max_steps=6)
    ref = reference_for(cfg, copy.deepcopy(model), data)
    if split == ["1.conv2"]:   # inside block 1: its input (the skip) crosses beside conv1's path
        assert len(ref.executors[0][0].place.out_specs) == 2
    ref.run()
    assert _worst(_trained(ref), _backprop(cfg, data, model, 6)) <= 1e-10


def test_balance_cuts_resnet20_inside_a_block_and_is_deterministic():
    from dpsgs.job.models import build_model

    def split_of():
        torch.manual_seed(0)
        model = build_model("resnet20", (3, 32, 32), 10)
        cfg = _config(stages=2, dtype="float32", model="resnet20")
        return prepare(cfg, model, _images_rgb()).choice

    a, b = split_of(), split_of()
    assert a == b and a.how == "flops" and len(a.split) == 1
    assert a.split[0] in [n for n, _ in build_model("resnet20", (3, 32, 32), 10).named_modules()]
    assert "." in a.split[0]                                   # a cut inside a residual block
    costs = a.stage_costs
    assert abs(costs[0] - costs[1]) / sum(costs) < 0.05       # balanced within 5 %


def _images_rgb(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset(x, y, 10, "rgb"), Dataset(x[:8], y[:8], 10, "rgb")
