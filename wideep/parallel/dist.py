"""Forming the EP group: one process (and one GPU) per rank, torch.distributed over tcp://.

Two groups come out of it: the EP group for the MoE collectives (NCCL on GPU, gloo on CPU) and a
gloo CPU group for the small per-step control all-reduces of DP lockstep (the way vLLM keeps its
DP coordination off the GPU stream). Every collective has a timeout so a dead peer surfaces as an
error, never as a hang.
"""
from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wideep.errors import WideepError
from wideep import envs
from wideep.parallel.config import ParallelConfig
from wideep.utils.device import resolve_device

log = logging.getLogger(__name__)



class EPGroupError(WideepError, RuntimeError):
    """A collective of the EP group failed: a peer rank died, hung or disagreed."""


@dataclass
class EPGroup:
    rank: int
    size: int
    device: torch.device
    backend: str                    # "nccl" or "gloo": the group the MoE collectives use
    group: Any                      # torch ProcessGroup for MoE collectives (None = default/WORLD)
    cpu_group: Any                  # gloo group for control messages
    timeout_s: float

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def pick_device(config: ParallelConfig, device: str = "auto") -> torch.device:
    """cuda:<local rank> when CUDA is asked for or available, else cpu (wideep.utils.device)."""
    return resolve_device(device, config.local_rank)


def init_ep_group(config: ParallelConfig, device: str | torch.device = "auto",
                  timeout_s: float | None = None) -> EPGroup:
    """Join the EP group described by `config` (blocks until all data_parallel_size ranks joined).

    Size 1 forms no process group at all. Backend: NCCL when the device is CUDA, else gloo.
    """
    if timeout_s is None:
        timeout_s = envs.WIDEEP_DIST_TIMEOUT_S
    dev = device if isinstance(device, torch.device) else pick_device(config, device)
    if config.ep_size == 1:
        return EPGroup(0, 1, dev, "none", None, None, timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        log.info("rank %d/%d joining %s via %s", config.ep_rank, config.ep_size, backend, config.init_method)
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev
            # MoE collectives on a high-priority stream: in flight beside the other micro-batch's compute
            # (dual-batch overlap), the comm kernel gets SMs ahead of queued compute blocks
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = True
            kwargs["pg_options"] = opts
        dist.init_process_group(backend=backend, init_method=config.init_method, rank=config.ep_rank,
                                world_size=config.ep_size, timeout=timeout, **kwargs)
    group = None  # WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return EPGroup(config.ep_rank, config.ep_size, dev, backend, group, cpu_group, timeout_s)


def destroy_ep_group(timeout_s: float = 10.0) -> None:
    """Tear down torch.distributed without risking a hang at exit (NCCL teardown can block on a dead peer)."""
    if not dist.is_initialized():
        return
    done = threading.Event()

    def _destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown is best effort
            pass
        done.set()

    t = threading.Thread(target=_destroy, daemon=True)
    t.start()
    if not done.wait(timeout_s):
        log.warning("destroy_process_group did not finish in %.0fs; leaving it to process exit", timeout_s)
