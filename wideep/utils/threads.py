"""Thread policy of engine processes: the one place that decides torch's intra-op thread count.

In order: $WIDEEP_THREADS_PER_RANK; else $OMP_NUM_THREADS; else one thread on CPU (several engine
processes, DP ranks and both P/D roles, share the host: OpenMP workers spinning against each other
made tiny-model steps ~25x slower on a 2-core machine) and torch's default on GPU (the CPU only
feeds the device there).
"""
from __future__ import annotations

from wideep import envs
from wideep.utils.device import resolve_device


def engine_threads(on_cpu: bool) -> int | None:
    """Intra-op threads one engine process should use (None: leave torch's default)."""
    for n in (envs.WIDEEP_THREADS_PER_RANK, envs.OMP_NUM_THREADS):
        if n is not None:
            if n < 1:
                raise ValueError(f"thread count must be >= 1, got {n}")
            return n
    return 1 if on_cpu else None


def apply_engine_threads(device: str) -> int:
    """Applies the policy in this process (device: the engine's --device, 'auto' resolved here);
    returns the thread count torch now uses."""
    import torch

    n = engine_threads(resolve_device(device).type == "cpu")
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
