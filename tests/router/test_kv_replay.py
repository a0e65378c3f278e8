"""Precise prefix routing recovers lost KV events through the engine's replay socket, against the
engine's real publisher (wideep.engine.kv_events.create_publisher: PUB + ROUTER over tcp loopback)."""
from __future__ import annotations

import asyncio
import time

import zmq

from wideep.engine.api import AllBlocksCleared, BlockRemoved, BlockStored
from wideep.engine.kv_events import create_publisher
from wideep.router.datastore import Datastore, parse_endpoint_flag
from wideep.router.registry import create
from wideep.utils.net import free_port_range

from router_helpers import ep, request, until

BS = 4
TOKENS = list(range(100, 100 + 8 * BS))        # 8 full blocks


def stored(j, parent):
    return BlockStored(block_hashes=[5000 + j], parent_block_hash=parent, token_ids=TOKENS[j * BS:(j + 1) * BS],
                       block_size=BS)


def recv(sock, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return sock.recv_multipart()
        except zmq.Again:
            if time.monotonic() > deadline:
                raise


def setup(base, replay=True):
    pub = create_publisher({"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{base}",
                            "replay_endpoint": f"tcp://127.0.0.1:{base + 1}" if replay else None,
                            "topic": "kv@127.0.0.1@m", "buffer_steps": 100}, 0)
    scorer = create("precise-prefix-cache-scorer", "pp", {
        "tokenProcessorConfig": {"blockSize": BS},
        "kvEventsConfig": {"replayTimeoutMs": 3000,
                           "podDiscoveryConfig": {"socketPort": base, "replayPort": base + 1 if replay else 0}}})
    e = ep("pod-rank-0", address="127.0.0.1:18000")
    return pub, scorer, e


def matched(scorer, e):
    req = request("x")
    req.token_ids = TOKENS
    scorer.produce(req, [e])
    return req.data["precise-prefix-match"].matched_blocks.get(e.name, 0)


def test_late_subscriber_catches_up_through_replay():
    """Blocks stored before the router connected (ZMQ slow joiner) come back by replay from seq 0."""
    base = free_port_range(2)
    pub, scorer, e = setup(base)
    ds = Datastore()
    ds.set_endpoints([e])

    class Ctx:
        datastore = ds

    async def main():
        for j in range(4):                                # seq 0..3: nobody listens yet
            pub.publish([stored(j, None if j == 0 else 5000 + j - 1)])
        await asyncio.sleep(0.1)
        await scorer.start(Ctx)
        try:
            await until(lambda: "pod-rank-0" in scorer.subscriber.sockets)
            j = 4
            while matched(scorer, e) < 5:                  # live batches until one arrives -> replay
                pub.publish([stored(j, 5000 + j - 1)] if j < 8 else [stored(3, 5002)])
                j += 1
                await asyncio.sleep(0.05)
                assert j < 200, "no live batch arrived"
            assert scorer.subscriber.replayed >= 4 and scorer.subscriber.last_seq["pod-rank-0"] >= 4
        finally:
            await scorer.stop()

    try:
        asyncio.run(main())
    finally:
        pub.close()


def test_gap_mid_stream_is_filled_by_replay_before_the_live_batch():
    """Live seq 0, 1, then 4 (2 and 3 lost): the subscriber replays 2.. from the ROUTER socket, applies
    2 and 3 (and 4), skips the live 4 it already has, and the removal in 3 is honoured."""
    base = free_port_range(2)
    pub, scorer, e = setup(base)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.connect(f"tcp://127.0.0.1:{base}")

    batches = [[stored(0, None)], [stored(1, 5000)], [stored(2, 5001), stored(3, 5002)],
               [BlockRemoved(block_hashes=[5003])], [stored(4, 5003)]]

    async def main():
        sc = scorer.subscriber
        sc.ctx = __import__("zmq.asyncio").asyncio.Context()
        try:
            got, probes = {}, 0
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:   # slow joiner: probe until our SUB is in
                pub.publish([AllBlocksCleared()])
                probes += 1
                try:
                    f = sub.recv_multipart()
                    got[int.from_bytes(f[1], "big")] = f
                except zmq.Again:
                    pass
            for b in batches:                                   # seq probes .. probes+4
                pub.publish(b)
            while not set(range(probes - 1, probes + 5)) <= set(got):
                f = recv(sub)
                got[int.from_bytes(f[1], "big")] = f
            live = [got[probes + i] for i in range(5)]
            replay = f"tcp://127.0.0.1:{base + 1}"
            await sc.on_message(e.name, got[probes - 1], None)   # the last probe: where our stream starts
            await sc.on_message(e.name, live[0], replay)
            await sc.on_message(e.name, live[1], replay)
            assert matched(scorer, e) == 2 and sc.gaps == 0
            before = sc.replayed
            await sc.on_message(e.name, live[4], replay)          # 2 and 3 never arrived live
            assert sc.gaps == 1 and sc.replayed - before == 3      # seq of batches 2, 3, 4 from the buffer
            assert matched(scorer, e) == 3                         # blocks 0-2; block 3 removed, so 4 cannot chain
            await sc.on_message(e.name, live[2], replay)          # a late duplicate is ignored
            assert sc.last_seq[e.name] == probes + 4
        finally:
            sc.ctx.term()

    try:
        asyncio.run(main())
    finally:
        sub.close(linger=0)
        ctx.term()
        pub.close()


def test_gap_without_replay_endpoint_is_counted_and_applied():
    base = free_port_range(2)
    pub, scorer, e = setup(base, replay=False)
    pub.close()
    sc = scorer.subscriber
    import msgpack

    def frames(seq, events):
        return [b"kv@", seq.to_bytes(8, "big"), msgpack.packb([0.0, events, 0])]

    async def main():
        await sc.on_message(e.name, frames(0, [["BlockStored", [1], None, TOKENS[:BS], BS, None, "GPU", None]]), None)
        await sc.on_message(e.name, frames(5, [["BlockStored", [2], 1, TOKENS[BS:2 * BS], BS, None, "GPU", None]]), None)

    asyncio.run(main())
    assert sc.gaps == 1 and matched(scorer, e) == 2


def test_replay_address_from_flag_and_port():
    e = parse_endpoint_flag("10.0.0.1:8003,name=p-rank-3,kv-events-replay=tcp://10.0.0.1:6000")
    scorer = create("precise-prefix-cache-scorer", "pp", {"kvEventsConfig": {"podDiscoveryConfig": {"replayPort": 5600}}})
    assert scorer.subscriber.replay_address_of(e) == "tcp://10.0.0.1:6000"
    e.kv_events_replay = None
    assert scorer.subscriber.replay_address_of(e) == "tcp://10.0.0.1:5603"      # replayPort + rank
    assert create("precise-prefix-cache-scorer", "pp", None).subscriber.replay_address_of(e) is None
