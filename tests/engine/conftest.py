"""Engine test helpers: build EngineCores on the tiny checkpoint and check they end clean."""
from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin against other jobs and a tiny
# model's step gets ~25x slower. Spawned engine processes inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from wideep.engine.config import EngineArgs


@pytest.fixture
def make_core(tiny_model_dir):
    """make_core(**engine_args) -> EngineCore; after the test every core must have no requests left
    and all its blocks free again (aborts included)."""
    from wideep.engine.core import EngineCore

    cores = []

    def factory(**kwargs):
        kwargs.setdefault("block_size", 16)
        kwargs.setdefault("kv_cache_memory_bytes", 8 << 20)   # ~400 blocks: plenty, and cheap to allocate
        core = EngineCore(EngineArgs(model=str(tiny_model_dir), **kwargs))
        cores.append(core)
        return core

    yield factory
    for core in cores:
        assert not core.has_unfinished(), "requests left in the engine"
        assert core.num_free_blocks == core.num_blocks, "blocks leaked"
