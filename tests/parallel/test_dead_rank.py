"""A rank killed mid-generation makes the other ranks stop with a clear error, within a bounded time."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs


@pytest.mark.timeout(240)
def test_killing_a_rank_stops_the_others(tiny_model_dir):
    from wideep.engine.client import AsyncEngineClient, EngineDeadError, ipc_addresses, spawn_engine_process
    from wideep.engine.dp import run_dp_engine_process
    from wideep.utils.net import free_port

    base = EngineArgs(model=str(tiny_model_dir), data_parallel_size=2, data_parallel_size_local=2,
                      data_parallel_rpc_port=free_port(), kv_cache_memory_bytes=4 << 20, max_model_len=512,
                      block_size=16, enforce_eager=True)

    async def scenario():
        clients = []
        try:
            for rank in range(2):
                inp, out = ipc_addresses()
                c = AsyncEngineClient(inp, out)
                c.process = spawn_engine_process(dataclasses.replace(base, data_parallel_rank=rank), inp, out,
                                                 target=run_dp_engine_process)
                clients.append(c)
            await asyncio.wait_for(asyncio.gather(*(c.wait_ready(180) for c in clients)), 180)
            sp = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            stream = clients[0].generate(EngineRequest("long", [5, 6, 7], sp))
            first = await asyncio.wait_for(stream.__anext__(), 60)
            assert first.new_token_ids
            os.kill(clients[1].process.pid, signal.SIGKILL)  # rank 1 dies mid-wave (it runs dummy batches)
            with pytest.raises(EngineDeadError) as err:
                async def drain():
                    async for _ in stream:
                        pass
                await asyncio.wait_for(drain(), 90)  # bounded: gloo sees the closed connection
            assert "lost the EP group" in str(err.value) or "rank" in str(err.value)
            clients[0].process.join(timeout=30)
            assert not clients[0].process.is_alive(), "surviving rank did not exit"
            return str(err.value)
        finally:
            for c in clients:
                if c.process is not None and c.process.is_alive():
                    c.process.kill()
                    c.process.join(timeout=5)
                c.close()

    message = asyncio.run(scenario())
    assert "EP group" in message, message
