"""`--simulate`: a K x N run in one process (the pipeline's reference over the job's setup).

With config.run_dir it writes what a distributed run writes there — config.json, one
metrics.jsonl line per step (the replicas' mean loss and accuracy) and an evaluation line,
summary.json — in a folder that belongs to it (dpsgs.job.run_folder), so `python -m dpsgs
plot RUN_DIR` works on it too.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from dpsgs.comm.device import CudaView, DeviceDecision, probe_cuda, resolve_device
from dpsgs.config import TrainConfig
from dpsgs.job.metrics import MetricsLog
from dpsgs.job.progress import start_line
from dpsgs.job.run_folder import RunFolder
from dpsgs.job.run_setup import prepare
from dpsgs.pipeline.hooks import StepHooks
from dpsgs.pipeline.reference import Reference

__all__ = ["reference_for", "simulate"]


class _Bar(StepHooks):
    """A progress bar over the plan steps of one virtual rank."""

    def __init__(self, total: int, config: TrainConfig) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"dpsgs --simulate {config.schedule} K={config.stages} "
                        f"N={config.replicas}", unit="step", dynamic_ncols=True)

    def step_done(self, step: int) -> bool:
        self.bar.update(1)
        return False


def reference_for(config: TrainConfig, model: nn.Module | None = None, data: Any = None,
                  progress: StepHooks | None = None) -> Reference:
    """The single-process reference of `config` (model/data override config.model/dataset),
    on the device --device resolves to here (every virtual rank on the current GPU)."""
    return Reference(prepare(config, model, data), progress, _torch_device(_device(config)))


def _device(config: TrainConfig, view: CudaView | None = None) -> DeviceDecision:
    """One process, no NCCL: a GPU and a CUDA torch are all --device cuda needs here."""
    return resolve_device(config.device, [view or probe_cuda()] if config.device != "cpu" else [],
                          nccl=False)


def _torch_device(decision: DeviceDecision) -> torch.device:
    # sim: the reference of a --device sim run computes on the CPU, as the simulator does
    return torch.device("cuda") if decision.device == "cuda" else torch.device("cpu")


def simulate(config: TrainConfig, model: nn.Module | None = None, data: Any = None,
             progress: bool = False, cuda_view: CudaView | None = None) -> dict[str, Any]:
    """Train per `config` on K x N virtual ranks in this process; the summary dict. A progress
    bar when `progress`; the run folder's files when config.run_dir is set. `cuda_view`: what
    this process sees of CUDA (default: probed; tests pass a made-up one)."""
    if config.resume:
        raise ValueError("--simulate runs in one go and writes no checkpoints: there is nothing "
                         "to --resume (choose a new --run-dir)")
    decision = _device(config, cuda_view)     # a setting's error before any file is made
    if decision.device == "sim":
        raise ValueError("--simulate runs in one process, without NCCL: --device sim (the GPU path "
                         "on the CPU simulator) needs mpirun ranks; use --device cpu here")
    device = _torch_device(decision)
    folder = RunFolder.open(config) if config.run_dir else None
    try:
        torch.manual_seed(config.seed)
        setup = prepare(config, model, data)
        ran = {"model": config.model if model is None else f"{type(model).__name__} (given)",
               "dataset": config.dataset if data is None else f"{setup.train.name} (given)",
               "device": decision.device, **({"device_why": decision.why} if decision.why else {})}
        print(start_line(config, ran, decision, simulate=True), flush=True)
        label = config.model if model is None else type(model).__name__
        print(f"dpsgs: {setup.choice.describe(label, config.stages)}", file=sys.stderr, flush=True)
        bar = None
        if progress:
            from dpsgs.pipeline.schedule import fdg_steps

            segs = setup.segments()
            total = sum(len(s) if config.schedule == "sync" else fdg_steps(config.stages, len(s), config.overlap)
                        for s in segs)
            bar = _Bar(total, config)
        ref = Reference(setup, bar, device)
        summary = ref.run()
        if bar is not None:
            bar.bar.close()
        summary["split"] = setup.split
        summary.update(ran)
        if folder is not None:
            summary["run_dir"] = config.run_dir
            _write(folder, config, ref, summary, ran, setup.choice.record())
        return summary
    finally:
        if folder is not None:
            folder.close()


def _write(folder: RunFolder, config: TrainConfig, ref: Reference, summary: dict[str, Any],
           ran: dict[str, Any], split: dict[str, Any]) -> None:
    folder.start(config, None, ran=ran, split=split)
    B, N = config.batch_size, config.replicas
    with MetricsLog(folder.path / "metrics.jsonl") as log:
        for h in ref.history:
            log.write(h)
        log.write({"step": ref.step - 1, "test_loss": summary["test_loss"],
                   "test_accuracy": summary["test_accuracy"],
                   "samples_per_s": summary["samples_per_s"], "global_batch": B * N})
    folder.write_summary(summary)
    folder.finish(summary)
