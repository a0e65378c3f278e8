"""A rank killed mid-generation makes the other ranks stop with a clear error, within a bounded time."""
from __future__ import annotations

import pytest
from ep_helpers import kill_a_rank_mid_generation

from wideep.engine.config import EngineArgs


@pytest.mark.timeout(240)
def test_killing_a_rank_stops_the_others(tiny_model_dir):
    from wideep.utils.net import free_port

    base = EngineArgs(model=str(tiny_model_dir), data_parallel_size=2, data_parallel_size_local=2,
                      data_parallel_rpc_port=free_port(), kv_cache_memory_bytes=4 << 20, max_model_len=512,
                      block_size=16, enforce_eager=True)

    message = kill_a_rank_mid_generation(base)
    assert "lost the EP group" in message or "rank" in message
    assert "EP group" in message, message
