"""Engine process + AsyncEngineClient over real ZMQ sockets: round trip, rejects, abort, stats, death."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from wideep.engine.api import EngineRequest, InvalidRequest, SamplingParams
from wideep.engine.client import EngineDeadError, start_engine
from wideep.engine.config import EngineArgs


def engine_args(model_dir) -> EngineArgs:
    return EngineArgs(model=str(model_dir), block_size=16, kv_cache_memory_bytes=8 << 20, max_model_len=512)


async def collect(client, req: EngineRequest):
    outs = []
    async for out in client.generate(req):
        outs.append(out)
    return outs


def test_round_trip_reject_abort_stats(tiny_model_dir):
    async def main():
        client = await start_engine(engine_args(tiny_model_dir), timeout=240)
        try:
            assert client.is_alive() and client.info["block_size"] == 16 and client.info["max_model_len"] == 512
            num_blocks = client.info["num_blocks"]
            sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            a, b = await asyncio.wait_for(asyncio.gather(
                collect(client, EngineRequest("a", [5, 6, 7, 8, 9], sp)),
                collect(client, EngineRequest("b", list(range(100, 140)), sp))), 120)
            for outs in (a, b):
                assert outs[-1].finished and outs[-1].finish_reason == "length"
                assert sum(len(o.new_token_ids) for o in outs) == 8
                assert not any(o.finished for o in outs[:-1])
            assert b[-1].num_prompt_tokens == 40

            with pytest.raises(InvalidRequest) as err:
                await asyncio.wait_for(collect(client, EngineRequest("long", list(range(2, 600)), sp)), 60)
            assert err.value.param == "prompt"

            # abort mid-stream: the stream ends with finish_reason "abort"
            long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            seen = []
            async for out in client.generate(EngineRequest("c", [3, 4, 5], long)):
                seen.append(out)
                if len(seen) == 2:
                    await client.abort("c")
            assert seen[-1].finished and seen[-1].finish_reason == "abort"
            assert sum(len(o.new_token_ids) for o in seen) < 400

            stats = await client.stats()
            assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks == num_blocks
            assert stats.kv_cache_usage == 0.0 and stats.generation_tokens >= 16 and stats.prompt_tokens >= 45
        finally:
            await client.shutdown()
        assert not client.is_alive()

    asyncio.run(main())


def test_killed_engine_fails_inflight_requests(tiny_model_dir):
    async def main():
        client = await start_engine(engine_args(tiny_model_dir), timeout=240)
        try:
            sp = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
            got_first = asyncio.Event()

            async def consume():
                async for _ in client.generate(EngineRequest("k", [5, 6, 7], sp)):
                    got_first.set()

            task = asyncio.ensure_future(consume())
            await asyncio.wait_for(got_first.wait(), 120)
            os.kill(client.process.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(task, 30)      # fails promptly instead of hanging
            assert not client.is_alive()
            with pytest.raises(EngineDeadError):
                await collect(client, EngineRequest("after", [5], sp))
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_loop_wakes_on_a_finished_kv_pull():
    """The engine loop's wait on input also ends when the KV connector's wakeup fd turns readable
    (a pull landed): it then polls the transfers, instead of sleeping out its timeout."""
    import zmq

    from wideep.engine.proc import EngineLoop, SingleRankCoordinator

    class Core:
        polled = 0

        def __init__(self, fd):
            self.fd = fd

        def kv_wakeup_fd(self):
            return self.fd

        def poll_kv_transfers(self):
            self.polled += 1
            os.read(self.fd, 64)    # the connector drains its pipe here

    r, w = os.pipe()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.bind("inproc://loop-wake")
    try:
        core = Core(r)
        loop = EngineLoop(core, inp, None, SingleRankCoordinator())
        os.write(w, b"\0")
        assert loop._drain_inputs(60_000) is False   # no input message; woken by the fd at once
        assert core.polled == 1
    finally:
        inp.close(linger=0)
        ctx.term()
        os.close(r)
        os.close(w)
