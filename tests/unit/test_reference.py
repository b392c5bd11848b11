"""The single-process reference against independent formulations of DESIGN §1."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dpsgs.job.run_setup import prepare
from dpsgs.config import TrainConfig
from dpsgs.job.data import Dataset, get_batch
from dpsgs.job.simulate import reference_for, simulate
from dpsgs.pipeline.hooks import StepHooks


def _data(n=96, f=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, classes, "toy"), Dataset(x[:40], y[:40], classes, "toy")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _config(**kw):
    base = dict(stages=2, replicas=1, dtype="float64", batch_size=8, epochs=1, lr=0.1,
                momentum=0.9, weight_decay=1e-3, lr_schedule="cosine", split=[2],
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _flat(ref, replica=0):
    return torch.cat([p.reshape(-1) for ps in ref.parameters(replica) for p in ps])


def _single_process(cfg, data, model, steps):
    """Plain backprop of the full model on each global batch (N replicas' shares joined)."""
    setup = prepare(cfg, copy.deepcopy(model), data)
    m = setup.model
    opt = torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, foreach=False)
    from dpsgs.job.optim import lr_at, set_lr

    nb = setup.batches_per_epoch
    for g in range(steps):
        e, b = divmod(g, nb)
        xs, ys = zip(*(get_batch(setup.train, setup.sampler, e, b, r)
                       for r in range(cfg.replicas)))
        x, y = torch.cat(xs).double(), torch.cat(ys)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        set_lr(opt, lr_at(g, setup.total_iterations, cfg, nb))
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("replicas", [1, 2])
def test_one_stage_is_data_parallel_sgd(replicas):
    cfg = _config(stages=1, replicas=replicas, split=None, balance="layers", epochs=2)
    data, model = _data(), _model()
    ref = reference_for(cfg, copy.deepcopy(model), data)
    ref.run()
    want = _single_process(cfg, data, model, ref.iterations)
    assert ref.iterations == 2 * (96 // (8 * replicas))
    torch.testing.assert_close(_flat(ref), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_sync_equals_backprop(kind):
    cfg = _config(schedule="sync", stages=3, replicas=2, split=[2, 4], micro_batches=4,
                  sync_kind=kind, max_steps=10)
    data, model = _data(), _model()
    ref = reference_for(cfg, copy.deepcopy(model), data)
    ref.run()
    want = _single_process(cfg, data, model, 10)
    torch.testing.assert_close(_flat(ref), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(_flat(ref, 1), _flat(ref, 0), rtol=0, atol=0)


def _fdg_by_versions(cfg, data, model, num_batches):
    """DESIGN §1 written as weight versions, stash=weights, N=1, independent of the executor:
    batch j meets stage k at step j+k and uses the weights stage k has then (after that
    step's update, except the last stage, which forwards before updating); its gradient
    is the exact gradient of the composite with those weights, stage k's scaled by
    beta^(K-1-k), and stage k applies it at step j+k+2(K-1-k), one step later with
    overlap=step."""
    from dpsgs.job.optim import lr_at, set_lr

    setup = prepare(cfg, copy.deepcopy(model), data)
    K, beta = cfg.stages, cfg.shrink
    stages = [setup.stage_layers(setup.model, k) for k in range(K)]
    opts = [torch.optim.SGD(s.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, foreach=False)
            if list(s.parameters()) else None for s in stages]
    late = 1 if cfg.overlap == "step" else 0
    used = {}   # (k, j) -> weights stage k used for batch j
    grads = {}  # (k, j) -> gradient for stage k of batch j
    for t in range(num_batches + 2 * K - 2 + late):
        for k in range(K):
            j = t - 2 * K + 2 + k - late   # the batch stage k applies at step t
            if k == K - 1 and 0 <= t - k < num_batches:
                used[(k, t - k)] = [p.detach().clone() for p in stages[k].parameters()]
                jj = t - k                  # all weights of batch jj are known: its gradient
                ws = [[w.clone().requires_grad_(True) for w in used[(kk, jj)]]
                      for kk in range(K)]
                x, y = get_batch(setup.train, setup.sampler, 0, jj, 0)
                hs = (x.double(),)
                for kk in range(K):
                    names = [n for n, _ in stages[kk].named_parameters()]
                    hs = functional_call(stages[kk], dict(zip(names, ws[kk])), hs)
                    hs = hs if isinstance(hs, tuple) else (hs,)
                    if kk < K - 1:          # shrink: scale every gradient crossing the boundary
                        hs = tuple(_Scale.apply(h, beta) for h in hs)
                nn.functional.cross_entropy(hs[0], y).backward()
                for kk in range(K):
                    grads[(kk, jj)] = [w.grad for w in ws[kk]]
            if 0 <= j < num_batches:
                for p, g in zip(stages[k].parameters(), grads.pop((k, j))):
                    p.grad = g
                if opts[k] is not None:
                    set_lr(opts[k], lr_at(j, setup.total_iterations, cfg,
                                          setup.batches_per_epoch))
                    opts[k].step()
            if k < K - 1 and 0 <= t - k < num_batches:
                used[(k, t - k)] = [p.detach().clone() for p in stages[k].parameters()]
    return torch.cat([p.detach().reshape(-1) for p in setup.model.parameters()])


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        ctx.beta = beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.beta, None


@pytest.mark.parametrize("K,split,beta,overlap", [(2, [2], 1.0, "backward"), (3, [2, 4], 0.5, "backward"),
                                                   (4, [1, 2, 4], 0.7, "backward"), (2, [2], 1.0, "step"),
                                                   (3, [2, 4], 0.5, "step")])
def test_fdg_matches_weight_versions(K, split, beta, overlap):
    cfg = _config(stages=K, split=split, shrink=beta, max_steps=9, overlap=overlap)
    data, model = _data(), _model()
    ref = reference_for(cfg, copy.deepcopy(model), data)
    summary = ref.run()
    late = overlap == "step"
    assert summary["iterations"] == 9 and summary["steps"] == 9 + 2 * K - 2 + late
    assert summary["staleness"] == {k: [2 * (K - 1 - k) + late] for k in range(K)}
    want = _fdg_by_versions(cfg, data, model, 9)
    torch.testing.assert_close(_flat(ref), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overlap", ["backward", "step"])
@pytest.mark.parametrize("stash", ["weights", "recompute"])
def test_staleness_and_replicas(overlap, stash):
    cfg = _config(stages=3, replicas=2, split=[2, 4], overlap=overlap, stash=stash, epochs=2)
    ref = reference_for(cfg, _model(), _data())
    s = ref.run()
    extra = overlap == "step"
    assert s["staleness"] == {0: [4 + extra], 1: [2 + extra], 2: [0 + extra]}
    assert len(ref.staleness) == 3 * ref.iterations
    torch.testing.assert_close(_flat(ref, 1), _flat(ref, 0), rtol=0, atol=0)
    assert set(ref.losses) == {(g, r) for g in range(ref.iterations) for r in range(2)}
    if stash == "weights":   # stage 0 holds up to 4 batches, the middle stage 2, the last 1
        assert s["stash_peak_bytes"][0] > 0
    assert 0.0 <= s["test_accuracy"] <= 1.0


def test_stash_modes_differ_only_with_updates():
    data = _data()
    runs = {stash: reference_for(_config(stages=2, stash=stash, max_steps=6), _model(), data)
            for stash in ("weights", "recompute")}
    for r in runs.values():
        r.run()
    # the last stage has no delay, but stage 0 backpropagates with other weights
    assert not torch.equal(_flat(runs["weights"]), _flat(runs["recompute"]))


def test_evaluate_equals_full_model():
    cfg = _config(stages=2, replicas=2, max_steps=4)
    data = _data()
    ref = reference_for(cfg, _model(), data)
    s = ref.run()
    # the stages' state_dicts, keyed by module path, make up the whole model's
    m = _model().double()
    m.load_state_dict({k: v for u in ref.executors[0] for k, v in u.compute.module.state_dict().items()})
    with torch.no_grad():
        logits = m(data[1].x.double())
    acc = float((logits.argmax(1) == data[1].y).double().mean())
    loss = float(nn.functional.cross_entropy(logits, data[1].y))
    assert s["test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert s["test_loss"] == pytest.approx(loss, abs=1e-12)


def test_simulate_digits_smoke():
    s = simulate(TrainConfig(stages=2, replicas=2, max_steps=8, batch_size=16,
                             balance="params", progress=False))
    assert s["iterations"] == 8 and s["staleness"] == {0: [2], 1: [0]}
    assert 0.0 <= s["test_accuracy"] <= 1.0


def test_sync_needs_divisible_batch():
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by micro_batches 3"):
        reference_for(_config(schedule="sync", micro_batches=3), _model(), _data())


def test_no_flush_runs_one_pipeline_over_all_epochs():
    data = _data()
    flushed = reference_for(_config(stages=3, split=[2, 4], epochs=2), _model(), data)
    one = reference_for(_config(stages=3, split=[2, 4], epochs=2, flush_every_epoch=False),
                    _model(), data)
    a, b = flushed.run(), one.run()
    assert a["iterations"] == b["iterations"] == 2 * 12
    assert a["steps"] == 24 + 2 * 4 and b["steps"] == 24 + 4     # one flush instead of two
    assert b["staleness"] == {0: [4], 1: [2], 2: [0]}
    assert not torch.equal(_flat(flushed), _flat(one))            # no drain between epochs


def test_prepare_errors():
    with pytest.raises(ValueError, match=r"cannot split Sequential into 6 stages: it can be cut "
                                         r"only in 4 places \(before: 1, 2, 3, 4\)"):
        prepare(_config(stages=6, split=None, balance="layers"), _model(), _data())
    with pytest.raises(ValueError, match=r"split \[4, 2\]: '2' runs before '4' does; split points "
                                         r"must follow the order the forward runs them in"):
        prepare(_config(stages=3, split=[4, 2]), _model(), _data())
    with pytest.raises(ValueError, match="dtype must be one of"):
        prepare(_config(dtype="float16"), _model(), _data())
    with pytest.raises(ValueError, match="smaller than one global batch"):
        prepare(_config(batch_size=64, replicas=2), _model(), _data())


def test_balance_by_params_on_setup():
    s = prepare(_config(stages=2, split=None, balance="params"), _model(), _data())
    assert s.split == ["2"] and s.positions == [2]            # 56+1 | 72+1+27
    assert s.choice.stage_costs == [57.0, 100.0] and s.choice.how == "params"
    assert [s.place(k).out_specs for k in range(2)] == [((torch.float64, (8,)),),
                                                        ((torch.float64, (3,)),)]


def test_labels_without_inputs():
    s = prepare(_config(replicas=2), _model(), _data())
    want = [s.batch(1, b, r)[1] for b in range(3) for r in range(2)]
    original = s.train
    s.drop_inputs()
    assert s.train.x.shape == (0, 6) and s.test.x.shape == (0, 6)
    assert original.x.shape == (96, 6)                       # the caller's data is untouched
    got = [s.labels(1, b, r) for b in range(3) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class _GradSpy(StepHooks):
    """Records, per update_ok call, whether each named tensor is its parameter's .grad."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.calls: list[list[bool]] = []

    def update_ok(self, step, named_grads):
        self.calls.append([t is not None and t is self.params[n].grad and t is not self.params[n]
                           for n, t in named_grads])
        return True


@pytest.mark.parametrize("overlap", ["backward", "step"])
def test_update_guard_sees_the_gradients_not_the_weights(overlap):
    # regression: the executor handed the NaN/Inf guard (name, parameter) pairs, so a
    # non-finite gradient was applied and caught only once the weights had gone bad
    spy = _GradSpy()
    ref = reference_for(_config(replicas=2, overlap=overlap), _model(), _data(), progress=spy)
    spy.params = dict(ref.executors[0][1]._named)
    # named as in the whole model: stage 1 holds blocks 2..4 (its own Sequential says 0..2)
    assert list(spy.params) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    ref.run()
    assert len(spy.calls) == 6 and all(c and all(c) for c in spy.calls), spy.calls


class _Veto(StepHooks):
    def __init__(self) -> None:
        self.updates = 0

    def update_ok(self, step, named_grads):
        return False

    def updated(self, stage, batch, staleness):
        self.updates += 1


def test_a_vetoed_update_is_not_reported_as_applied():
    # regression: hooks.updated fired (and staleness was counted) for skipped updates
    veto = _Veto()
    ref = reference_for(_config(), _model(), _data(), progress=veto)
    before = [p.clone() for p in ref.parameters(0)[1]]
    ref.run()
    assert veto.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters(0)[1]))


class _Drop(nn.Dropout):
    """Dropout that checks each recompute replays its forward's mask (keyed by its input)."""

    masks: dict[float, torch.Tensor] = {}
    replays = [0, 0]         # (masks that differ, recomputes)

    def forward(self, x):
        m = (torch.rand_like(x) > self.p).to(x.dtype)
        key = round(float(x.detach().sum()), 9)
        with _LOCK:
            if not torch.is_grad_enabled():          # the forward (no_grad under recompute)
                self.masks[key] = m.clone()
            elif key in self.masks:                  # its recompute
                self.replays[1] += 1
                self.replays[0] += not torch.equal(self.masks.pop(key), m)
        return x * m / (1 - self.p)


_LOCK = threading.Lock()


def test_recompute_replays_its_own_dropout_mask_among_threads():
    # regression: the reference's virtual ranks are threads sharing torch's generator; a draw
    # of another stage between a recorded RNG state and its forward made the recompute replay
    # another mask (a few of 252 per run), so the gradient was of a mask that never ran
    _Drop.masks.clear()
    _Drop.replays[:] = [0, 0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1024), nn.Tanh(), _Drop(0.5), nn.Linear(1024, 1024), nn.Tanh(),
                          nn.Linear(1024, 3))
    cfg = _config(stages=3, replicas=3, batch_size=8, epochs=4, split=[2, 5], stash="recompute",
                  momentum=0.0, weight_decay=0.0, lr_schedule="constant")
    reference_for(cfg, model, _data(n=512)).run()
    assert _Drop.replays[1] == 4 * 21 * 3 and _Drop.replays[0] == 0, _Drop.replays


class _Phases(StepHooks):
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def phase(self, name, step):
        self.seen.add(name)


@pytest.mark.parametrize("schedule", ["fdg", "sync"])
def test_only_fdg_has_warmup_steps(schedule):
    # regression: sync's first 2K-2 steps fired the fault phase "warmup" (it has none)
    phases = _Phases()
    extra = {"micro_batches": 2} if schedule == "sync" else {}
    reference_for(_config(schedule=schedule, max_steps=4, **extra), _model(), _data(), progress=phases).run()
    assert ("warmup" in phases.seen) == (schedule == "fdg"), phases.seen
