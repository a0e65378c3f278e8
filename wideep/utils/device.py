"""Device resolution, one rule for every process: "auto" is CUDA when a GPU is visible, else CPU;
a rank with a local rank index takes cuda:<local rank mod visible GPUs> (with CUDA_VISIBLE_DEVICES
narrowed to one GPU per process that is cuda:0). torch is imported only when called."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto", local_rank: int | None = None) -> "torch.device":
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError("device=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank % n) if local_rank is not None else torch.device("cuda")
    return torch.device(name)


def host_to_device(values: list, dtype: "torch.dtype", device: "torch.device") -> "torch.Tensor":
    """A host list as a tensor on `device` without blocking the host: copied from pinned memory with
    non_blocking (a pageable source makes the copy wait for the stream, i.e. for the step still running,
    which would undo async scheduling's overlap)."""
    import torch

    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
