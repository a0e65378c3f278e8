"""The thread policy (wideep.utils.threads) is what an engine process actually runs with:
$WIDEEP_THREADS_PER_RANK wins over $OMP_NUM_THREADS, which wins over the CPU default of one thread."""
from __future__ import annotations

import asyncio

import pytest

from wideep.engine.client import start_engine
from wideep.engine.config import EngineArgs
from wideep.utils.threads import engine_threads


def test_policy_order(monkeypatch):
    monkeypatch.delenv("WIDEEP_THREADS_PER_RANK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert engine_threads(on_cpu=True) == 1 and engine_threads(on_cpu=False) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads(on_cpu=True) == 3 and engine_threads(on_cpu=False) == 3
    monkeypatch.setenv("WIDEEP_THREADS_PER_RANK", "2")
    assert engine_threads(on_cpu=True) == 2
    monkeypatch.setenv("WIDEEP_THREADS_PER_RANK", "two")
    with pytest.raises(ValueError, match=r"\$WIDEEP_THREADS_PER_RANK: must be int, got 'two'"):
        engine_threads(on_cpu=True)


def test_threads_per_rank_is_honored_in_the_engine_process(tiny_model_dir):
    """OMP_NUM_THREADS=1 is set for the test session (tests/engine/conftest.py): the rank variable wins."""
    args = EngineArgs(model=str(tiny_model_dir), device="cpu", block_size=16, kv_cache_memory_bytes=4 << 20,
                      max_model_len=256)

    async def threads_of(env):
        client = await start_engine(args, timeout=240, env=env)
        try:
            return client.info["torch_threads"]
        finally:
            await client.shutdown()

    assert asyncio.run(threads_of({"WIDEEP_THREADS_PER_RANK": "2"})) == 2
    assert asyncio.run(threads_of({"OMP_NUM_THREADS": "1"})) == 1
