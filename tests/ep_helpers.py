"""Shared pieces of the EP tests (tests/parallel): the EP=1 greedy reference and the dead-rank scenario."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs


def run_to_completion(model_dir, requests: list[EngineRequest], **args) -> dict[str, list[int]]:
    """Every request's tokens from one in-process EngineCore (the EP=1 reference)."""
    from wideep.engine.core import EngineCore

    core = EngineCore(EngineArgs(model=str(model_dir), **args))
    for r in requests:
        core.add_request(r)
    out: dict[str, list[int]] = {}
    while core.has_unfinished():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def kill_a_rank_mid_generation(base: EngineArgs) -> str:
    """Starts ranks 0 and 1 of `base` (DP=2) as engine processes, kills rank 1 with SIGKILL once rank 0 streams a
    long request, and returns the EngineDeadError message rank 0's client raises; checks rank 0 exits too."""
    from wideep.engine.client import AsyncEngineClient, EngineDeadError, ipc_addresses, spawn_engine_process
    from wideep.engine.dp import run_dp_engine_process

    async def scenario() -> str:
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
            assert (await asyncio.wait_for(stream.__anext__(), 60)).new_token_ids
            os.kill(clients[1].process.pid, signal.SIGKILL)  # rank 1 dies mid-wave
            with pytest.raises(EngineDeadError) as err:
                async def drain():
                    async for _ in stream:
                        pass
                await asyncio.wait_for(drain(), 90)  # bounded: gloo sees the closed connection
            clients[0].process.join(timeout=30)
            assert not clients[0].process.is_alive(), "surviving rank did not exit"
            return str(err.value)
        finally:
            for c in clients:
                if c.process is not None and c.process.is_alive():
                    c.process.kill()
                    c.process.join(timeout=5)
                c.close()

    return asyncio.run(scenario())
