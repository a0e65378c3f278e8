"""The engine child of `wideep serve`: picks this rank's GPU, then runs engine/proc.py's loop.

Each child sees every GPU of the pod and selects `cuda:<local rank>` (LOCAL_RANK), the same device
the parallel layer's `ParallelConfig.local_rank` names, so CUDA IPC between local ranks keeps working.
With expert parallelism over several DP ranks the engine needs the parallel layer's lockstep
coordinator and EP-aware core: `wideep.engine.dp.run_dp_engine_process` is that entry.
Without --enable-expert-parallel, DP ranks are independent replicas (no collectives between them).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from wideep.engine.config import EngineArgs
from wideep.utils.device import resolve_device

log = logging.getLogger(__name__)

def _select_device(local_rank: int, device: str) -> None:
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        import torch

        torch.cuda.set_device(dev)


def run_engine(payload: dict[str, Any]) -> None:
    from wideep.engine.proc import run_engine_process

    args = EngineArgs.from_dict(payload["engine_args"])
    local_rank = args.data_parallel_rank - args.data_parallel_start_rank
    _select_device(local_rank, args.device)
    log.info("engine dp rank %d (local %d, pid %d) starting", args.data_parallel_rank, local_rank, os.getpid())
    if args.data_parallel_size > 1 and args.enable_expert_parallel:
        from wideep.engine.dp import run_dp_engine_process

        run_dp_engine_process(args.to_dict(), payload["input_addr"], payload["output_addr"])
    else:
        run_engine_process(args, payload["input_addr"], payload["output_addr"])
