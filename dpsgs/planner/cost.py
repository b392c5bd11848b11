"""Step-time model of one K x N configuration: compute, channel and all-reduce exposure, memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dpsgs.pipeline.partition import balance, stage_bounds
from .cluster import Cluster
from .profile import ModelProfile

__all__ = ["Config", "StagePrediction", "Prediction", "predict", "SCHEDULES"]

SCHEDULES = ("fdg", "gpipe", "1f1b", "ddp")


@dataclass(frozen=True)
class Config:
    stages: int                      # K
    replicas: int                    # N
    schedule: str = "fdg"            # fdg | gpipe | 1f1b | ddp (ddp: K = 1, same as fdg K = 1)
    stash: str = "weights"           # fdg: weights | recompute
    overlap: str = "backward"        # none | backward | step
    micro_batches: int = 4           # gpipe / 1f1b
    splits: tuple[int, ...] | None = None   # explicit split points, else balanced by compute

    @property
    def label(self) -> str:
        if self.schedule == "ddp" or (self.stages == 1 and self.schedule == "fdg"):
            return f"ddp N={self.replicas}" if self.replicas > 1 else "backprop N=1"
        extra = (f" {self.stash}" if self.schedule == "fdg" else f" M={self.micro_batches}")
        return f"{self.schedule} K={self.stages} N={self.replicas}{extra}"


@dataclass
class StagePrediction:
    layers: tuple[int, int]          # [start, end)
    compute: float                   # seconds of forward+backward (+recompute) per step
    update: float                    # seconds of the optimizer step (once per step)
    backward: float                  # the part the all-reduce can hide behind
    channel: float                   # seconds of incoming channel messages per step (exposed)
    allreduce: float                 # seconds of this stage group's all-reduce
    exposed_allreduce: float
    param_bytes: int
    activation_bytes: int            # saved-for-backward tensors held at the peak
    stash_bytes: int                 # memory beyond plain backprop (old graphs, inputs, weights)


@dataclass
class Prediction:
    config: Config
    batch: int                       # global samples per step
    step_time: float
    samples_per_s: float
    bubble: float                    # idle fraction of the pipeline (sync schedules)
    stages: list[StagePrediction] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["label"] = self.config.label
        return d


def _staleness(k: int, K: int) -> int:
    return 2 * (K - 1 - k)


def _concurrent_rings(cluster: Cluster, K: int, N: int) -> int:
    """Largest number of stage groups that cross one node's boundary at once (they share its
    NICs): for each node, the spanning groups with a member on it."""
    spanning = [k for k in range(K)
                if len({cluster.node(r * K + k) for r in range(N)}) > 1]
    worst = 1
    for node in range(-(-K * N // cluster.gpus_per_node)):
        here = sum(1 for k in spanning
                   if any(cluster.node(r * K + k) == node for r in range(N)))
        worst = max(worst, here)
    return worst


def predict(profile: ModelProfile, cluster: Cluster, config: Config, batch: int) -> Prediction:
    """Predict one step of `config` at global batch `batch` (= N x per-replica batch)."""
    K, N, sched = config.stages, config.replicas, config.schedule
    if sched not in SCHEDULES:
        raise ValueError(f"unknown schedule {sched!r}; known: {SCHEDULES}")
    if sched == "ddp" and K != 1:
        raise ValueError(f"ddp means K = 1, got K = {K}")
    if K * N > cluster.gpus:
        raise ValueError(f"K x N = {K * N} exceeds the cluster's {cluster.gpus} devices")
    if batch % N:
        raise ValueError(f"global batch {batch} does not split over N = {N} replicas")
    b = batch // N
    sync = sched in ("gpipe", "1f1b")
    M = max(1, config.micro_batches) if sync else 1
    unit = b / M                                   # samples per forward/backward call
    lays = profile.layers
    fb = [lay.seconds(unit) for lay in lays]
    cost = [f + g for f, g in fb]
    splits = list(config.splits) if config.splits is not None else balance(cost, K)
    ranges = stage_bounds(splits, len(lays))
    rings = _concurrent_rings(cluster, K, N)

    stages: list[StagePrediction] = []
    for k, (s, e) in enumerate(ranges):
        fwd = sum(fb[i][0] for i in range(s, e))
        bwd = sum(fb[i][1] for i in range(s, e))
        tau = _staleness(k, K) if sched in ("fdg", "ddp") else 0
        recompute = sched == "fdg" and config.stash == "recompute" and tau > 0
        compute = fwd + bwd + (fwd if recompute else 0.0)
        if sched == "fdg" and config.stash == "weights" and tau > 0:
            compute += sum(lays[i].snapshot for i in range(s, e))   # weight copy per forward
        update = sum(lays[i].update for i in range(s, e))
        if sync:    # micro-batches 2..M add into the gradients the first one wrote
            compute += sum(lays[i].accumulate for i in range(s, e)) * (M - 1) / M
        # Channel messages this stage receives per forward/backward call: the activation
        # from stage k-1 and the gradient from stage k+1 (a link carries both directions at
        # once, so a receiver's count covers the sender's cost). Replica 0's ranks stand for
        # all replicas (every replica has the same placement up to a shift).
        chan = 0.0
        if k > 0:
            chan += cluster.p2p(k - 1, k, lays[s - 1].out_bytes_per_sample * unit)
        if k < K - 1:
            chan += cluster.p2p(k + 1, k, lays[e - 1].out_bytes_per_sample * unit)
        pbytes = sum(lays[i].param_bytes for i in range(s, e))
        ar = cluster.allreduce([r * K + k for r in range(N)], pbytes, concurrent=rings)
        saved = sum(lays[i].saved_bytes_per_sample for i in range(s, e)) * unit
        in_bytes = (lays[s - 1].out_bytes_per_sample if s > 0 else profile.in_bytes_per_sample)
        if sched == "fdg" and K > 1:
            graphs = max(tau, 1)
            if config.stash == "weights":
                act, stash = graphs * saved, (graphs - 1) * saved + tau * pbytes
            else:   # inputs of the tau batches in flight, one graph alive at a time
                act, stash = saved, tau * in_bytes * unit
        elif sched == "1f1b":
            act = min(M, K - k) * saved
            stash = act - saved
        else:       # gpipe keeps all M micro-batch graphs; ddp/backprop one graph
            act = (M if sync else 1) * saved
            stash = act - saved
        stages.append(StagePrediction((s, e), compute, update, bwd, chan,
                                      ar, 0.0, pbytes, int(act), int(stash)))

    if sync:
        # (M + K - 1) slots of the slowest stage's forward+backward per micro-batch, channel
        # transfers on the critical path at every slot; then each stage's all-reduce, which
        # can hide behind its last backward and the k slots stage 0 still works after it.
        slot = max(st.compute + st.channel for st in stages)
        slot_bwd = max(st.backward for st in stages)
        pipe = (M + K - 1) * slot
        for k, st in enumerate(stages):
            hide = {"none": 0.0}.get(config.overlap, st.backward + k * slot_bwd)
            st.exposed_allreduce = max(0.0, st.allreduce - hide)
        step = pipe + max(st.exposed_allreduce + st.update for st in stages)
        bubble = (K - 1) / (M + K - 1)
        for st in stages:   # report per-step totals like the fdg case
            st.compute *= M
            st.backward *= M
            st.channel *= M
    else:
        # Fully decoupled: every stage computes at once, no bubble; the slowest stage, with
        # its channel waits and unhidden all-reduce, sets the step.
        for st in stages:
            hide = {"none": 0.0, "backward": st.backward,
                    "step": st.compute + st.update + st.channel}.get(config.overlap)
            if hide is None:
                raise ValueError(f"unknown overlap {config.overlap!r}: none|backward|step")
            st.exposed_allreduce = max(0.0, st.allreduce - hide)
        step = max(st.compute + st.update + st.channel + st.exposed_allreduce
                   for st in stages)
        bubble = 0.0
    return Prediction(config, batch, step, batch / step if step > 0 else float("inf"),
                      bubble, stages)
