"""The engine child of `wideep serve`: picks this rank's GPU, then runs engine/proc.py's loop.

Each child sees every GPU of the pod and selects `cuda:<local rank>` (LOCAL_RANK), the same device
the parallel layer's `ParallelConfig.local_rank` names, so CUDA IPC between local ranks keeps working.
With expert parallelism over several DP ranks the engine needs the parallel layer's lockstep
coordinator and EP-aware core; those come from `wideep.parallel` when it provides them.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from wideep.engine.config import EngineArgs

log = logging.getLogger(__name__)

# Module of the parallel layer that builds a DP/EP engine: `engine_hooks(args) -> (core_factory, coordinator)`.
PARALLEL_HOOKS = ("wideep.parallel.engine_hooks", "engine_hooks")


def _select_device(local_rank: int, device: str) -> None:
    if device == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def _parallel_hooks(args: EngineArgs) -> tuple[Any, Any]:
    if args.data_parallel_size == 1 or not args.enable_expert_parallel:
        return None, None  # independent DP ranks: no collectives, the default loop is right
    module, name = PARALLEL_HOOKS
    try:
        hooks = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--enable-expert-parallel with --data-parallel-size {args.data_parallel_size} needs "
                         f"{module}.{name}, which is not available: {e}") from None
    return hooks(args)


def run_engine(payload: dict[str, Any]) -> None:
    from wideep.engine.proc import run_engine_process

    args = EngineArgs.from_dict(payload["engine_args"])
    local_rank = args.data_parallel_rank - args.data_parallel_start_rank
    threads = payload.get("torch_threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    _select_device(local_rank, args.device)
    core_factory, coordinator = _parallel_hooks(args)
    log.info("engine dp rank %d (local %d, pid %d) starting", args.data_parallel_rank, local_rank, os.getpid())
    run_engine_process(args, payload["input_addr"], payload["output_addr"],
                       coordinator=coordinator, core_factory=core_factory)
