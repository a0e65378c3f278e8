"""Engine test helpers: build EngineCores on the tiny checkpoint and check they end clean."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP threads spin against other jobs and a tiny
# model's step gets ~25x slower. Spawned engine processes inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from wideep.engine.config import EngineArgs

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(script: str, name: str):
    """benchmarks/<script> imported as module `name` (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rank():
    """benchmarks/rank.py, loaded once per test module."""
    return load_benchmark("rank.py", "rank_bench")


@pytest.fixture(scope="module")
def host_step():
    """benchmarks/host_step.py, loaded once per test module."""
    return load_benchmark("host_step.py", "host_step_bench")


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
