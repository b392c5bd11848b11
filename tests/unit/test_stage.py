"""StageCompute: stash modes give the documented gradients; shrink; loss; stash accounting;
stages of several inputs and outputs (a skip connection across the cut)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpsgs.pipeline.stage import StageCompute



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _stage():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _grads(module, x, g):
    """Reference: input gradient and parameter gradients of a fresh graph."""
    m = copy.deepcopy(module)
    x = x.clone().requires_grad_(True)
    m(x).backward(g)
    return x.grad, [p.grad for p in m.parameters()]


def _bump(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)


@pytest.mark.parametrize("stash", ["weights", "recompute"])
def test_delayed_backward(stash):
    m = _stage()
    c = StageCompute(m, stage=1, stages=3, stash=stash)
    x, g = torch.randn(6, 4), torch.randn(6, 3)
    old = copy.deepcopy(m)
    (out,) = c.forward(7, (x,))
    torch.testing.assert_close(out, old(x), rtol=0, atol=0)
    assert not out.requires_grad
    _bump(m)                                  # an update between forward and backward
    (gi,) = c.backward(7, (g,))
    # weights: the gradient at the forward-time weights; recompute: at the current ones
    want_x, want_p = _grads(old if stash == "weights" else m, x, g)
    torch.testing.assert_close(gi, want_x, rtol=0, atol=1e-15)
    for p, w in zip(m.parameters(), want_p):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-15)
    assert c.in_flight == [] and c.stash_bytes == 0


@pytest.mark.parametrize("accumulate", [True, False])
def test_shrink_and_accumulate(accumulate):
    m = _stage()
    c = StageCompute(m, stage=0, stages=3, stash="weights", shrink=0.5)
    x, g = torch.randn(6, 4), torch.randn(6, 3)
    hooks = []
    for p in m.parameters():
        p.register_post_accumulate_grad_hook(lambda p: hooks.append(p))
    c.forward(0, (x,))
    assert c.backward(0, (g,), accumulate=accumulate) is None   # stage 0: no input grad
    _, want = _grads(m, x, 0.5 * g)
    for p, w in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-15)
    assert len(hooks) == (4 if accumulate else 0)


def test_last_stage_loss():
    m = _stage()
    c = StageCompute(m, stage=1, stages=2)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    c.forward("b", (x,), live=True)
    loss, correct = c.loss("b", y, scale=0.25)
    logits = m(x)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, y).detach()), abs=1e-14)
    assert correct == int((logits.argmax(1) == y).sum())
    (gi,) = c.backward("b")
    xr = x.clone().requires_grad_(True)
    (0.25 * nn.functional.cross_entropy(m(xr), y)).backward()
    torch.testing.assert_close(gi, xr.grad, rtol=0, atol=1e-15)


def test_batchnorm_stats_updated_once():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    c = StageCompute(m, stage=0, stages=2, stash="recompute")
    x = torch.randn(10, 4)
    c.forward(0, (x,))
    after_forward = m[1].running_mean.clone()
    assert int(m[1].num_batches_tracked) == 1
    c.backward(0, (torch.randn(10, 3),))
    assert torch.equal(m[1].running_mean, after_forward)
    assert int(m[1].num_batches_tracked) == 1


def test_recompute_replays_dropout():
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    ref = copy.deepcopy(m)
    c = StageCompute(m, stage=1, stages=2 + 1, stash="recompute")
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    torch.manual_seed(3)
    c.forward(0, (x,))
    torch.randn(100)                          # RNG moves on before the backward
    (gi,) = c.backward(0, (g,))
    torch.manual_seed(3)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(g)
    torch.testing.assert_close(gi, xr.grad, rtol=0, atol=1e-15)


def test_stash_accounting():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
    w = StageCompute(m, stage=1, stages=3, stash="weights")
    r = StageCompute(copy.deepcopy(m), stage=1, stages=3, stash="recompute")
    x = torch.randn(16, 64)
    for k in range(3):
        w.forward(k, (x,))
        r.forward(k, (x,))
    # weights: input 16x64, weight copy 128x64, ReLU output 16x128 (= the held output)
    per_batch = 8 * (16 * 64 + 128 * 64 + 16 * 128)
    assert w.stash_bytes == w.peak_stash_bytes == 3 * per_batch
    assert r.stash_bytes == 3 * 8 * 16 * 64            # input only (no dropout: no RNG state)
    w.backward(0, (torch.randn(16, 128),))
    assert w.stash_bytes == 2 * per_batch and w.peak_stash_bytes == 3 * per_batch


def test_errors():
    c = StageCompute(_stage(), stage=0, stages=2)
    c.forward(1, (torch.randn(2, 4),))
    with pytest.raises(ValueError, match="stage 0: batch 1 forwarded twice"):
        c.forward(1, (torch.randn(2, 4),))
    with pytest.raises(ValueError, match=r"stage 0: batch 2 is not in flight \(in flight: \[1\]\)"):
        c.backward(2, (torch.randn(2, 3),))
    with pytest.raises(ValueError, match=r"output 0 has shape \(2, 3\), its gradient has \(3, 3\)"):
        c.backward(1, (torch.randn(3, 3),))
    with pytest.raises(ValueError, match="has 1 floating outputs, got 2 gradients"):
        c.backward(1, (torch.randn(2, 3), torch.randn(2, 3)))
    with pytest.raises(ValueError, match="loss\\(\\) belongs to the last stage"):
        c.loss(1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="stash must be one of"):
        StageCompute(_stage(), 0, 2, stash="none")


def test_a_stage_without_parameters_runs_on_the_device_it_is_given():
    # regression: a parameterless stage took "cpu", so on CUDA its autocast was a CPU one and
    # a recompute would not replay the GPU's random state
    assert StageCompute(nn.Sequential(nn.ReLU()), 1, 2).device == torch.device("cpu")
    from dpsgs.comm.accelerator import accelerator

    lone = StageCompute(nn.Sequential(nn.ReLU()), 1, 2, accel=accelerator("cuda", 0))
    assert lone.device == torch.device("cuda:0")
    assert lone.autocast().device == "cuda"


class _TwoInTwoOut(nn.Module):
    """A stage inside a residual block: takes (skip, h), returns (skip, relu(lin(h)))."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, skip, h):
        return skip, torch.relu(self.lin(h)) + 0 * skip.sum()


@pytest.mark.parametrize("stash", ["weights", "recompute"])
def test_several_tensors_cross(stash):
    # a passthrough tensor (the skip) and a computed one; integer outputs carry no gradient
    torch.manual_seed(4)
    m = _TwoInTwoOut()
    c = StageCompute(m, stage=1, stages=3, stash=stash, shrink=0.5)
    skip, h = torch.randn(3, 4), torch.randn(3, 4)
    gs, gh = torch.randn(3, 4), torch.randn(3, 4)
    outs = c.forward(0, (skip, h))
    torch.testing.assert_close(outs[0], skip, rtol=0, atol=0)
    gi = c.backward(0, (gs, gh))
    ref = copy.deepcopy(m)
    sr, hr = skip.clone().requires_grad_(True), h.clone().requires_grad_(True)
    a, b = ref(sr, hr)
    torch.autograd.backward([a, b], [0.5 * gs, 0.5 * gh])     # shrink scales every gradient
    assert len(gi) == 2
    torch.testing.assert_close(gi[0], sr.grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(gi[1], hr.grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(m.lin.weight.grad, ref.lin.weight.grad, rtol=0, atol=1e-15)


def test_unused_floating_input_gets_a_zero_gradient():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, unused, index):
            return self.lin(x), index + 1

    c = StageCompute(Drop(), stage=1, stages=3)
    x, u, i = torch.randn(3, 2), torch.randn(3, 5), torch.arange(3)
    y, j = c.forward(0, (x, u, i))
    assert torch.equal(j, i + 1)
    gx, gu = c.backward(0, (torch.ones(3, 2),))   # one gradient: the floating output only
    assert gu.shape == (3, 5) and not gu.any() and gx.shape == (3, 2)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_warm_up_leaves_no_trace(stage):
    # warm_up runs before a GPU stage's communicators connect (lazy kernel loading): it must
    # not move a BatchNorm statistic, a .grad, the RNG or the stash, nor fire the reducer's
    # post-accumulate-grad hooks
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    c = StageCompute(m, stage=stage, stages=3, stash="weights")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    fired = []
    for p in m.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    m[0].weight.grad = torch.full_like(m[0].weight, 7.0)
    torch.manual_seed(6)
    rng = torch.get_rng_state()
    y = torch.zeros(8, dtype=torch.long) if stage == 2 else None
    c.warm_up((torch.randn(8, 4).clone(),), y)     # randn moves the RNG: restore it first
    torch.set_rng_state(rng)
    c.warm_up((torch.zeros(8, 4),), y)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(m[0].weight.grad, torch.full_like(m[0].weight, 7.0))
    assert all(p.grad is None for p in list(m.parameters())[1:])
    assert fired == [] and c.in_flight == [] and c.stash_bytes == 0
