"""KV event publisher: vLLM's three-frame wire format over a real ZMQ PUB socket, port + rank, replay."""
from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from wideep.engine.api import AllBlocksCleared, BlockRemoved, BlockStored
from wideep.engine.kv_events import (KVEventPublisher, KVEventsConfig, decode_batch, offset_endpoint)
from wideep.utils.net import free_port_range


def _sub(ctx: zmq.Context, port: int, topic: bytes = b"") -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, topic)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def test_offset_endpoint():
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://10.0.0.1:5557", 0) == "tcp://10.0.0.1:5557"
    assert offset_endpoint("ipc:///tmp/kv", 2) == "ipc:///tmp/kv_dp2"
    with pytest.raises(ValueError, match="no port"):
        offset_endpoint("tcp://host", 1)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        KVEventsConfig.from_dict({"enable_kv_cache_events": True, "endpont": "tcp://*:1"})
    assert KVEventPublisher.create({"enable_kv_cache_events": False}, 0) is None
    assert KVEventPublisher.create(None, 0) is None


def test_publish_wire_format_and_replay():
    base = free_port_range(4)
    rank = 1
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{base}",
           "replay_endpoint": f"tcp://127.0.0.1:{base + 2}", "buffer_steps": 3, "topic": "kv@pod@tiny"}
    pub = KVEventPublisher.create(cfg, rank)
    ctx = zmq.Context()
    try:
        assert pub.endpoint.endswith(f":{base + rank}")
        sub = _sub(ctx, base + rank, b"kv@")
        stored = BlockStored(block_hashes=[1, (1 << 70) + 5], parent_block_hash=None, token_ids=list(range(8)),
                             block_size=4)
        # PUB drops messages until the subscription has propagated: publish until one arrives.
        deadline = time.time() + 10
        got = None
        while got is None and time.time() < deadline:
            pub.publish([stored])
            try:
                got = sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.05)
        assert got is not None, "no KV event batch received"
        topic, seq, payload = got
        assert topic == b"kv@pod@tiny"
        assert len(seq) == 8
        raw = msgpack.unpackb(payload)
        assert isinstance(raw[0], float) and raw[2] == rank
        assert raw[1][0] == ["BlockStored", [1, 5], None, list(range(8)), 4, None, "GPU", None]

        pub.publish([BlockRemoved(block_hashes=[1]), AllBlocksCleared()])
        prev = int.from_bytes(seq, "big")
        while True:  # the probe loop above may have queued more BlockStored batches: skip them
            _, s2, p2 = sub.recv_multipart()
            n = int.from_bytes(s2, "big")
            assert n == prev + 1, "sequence numbers must be consecutive"
            prev = n
            _, events, dp = decode_batch(p2)
            if not isinstance(events[0], BlockStored):
                break
        assert dp == rank
        assert events == [BlockRemoved(block_hashes=[1]), AllBlocksCleared()]
        last_seq = prev

        # Replay: DEALER asks from seq 0; the buffer holds only the last 3 batches.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, 5000)
        dealer.connect(f"tcp://127.0.0.1:{base + 2 + rank}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while True:
            _, s, p = dealer.recv_multipart()
            n = int.from_bytes(s, "big", signed=True)
            if n == -1:
                assert p == b""
                break
            seqs.append(n)
            decode_batch(p)
        assert seqs == list(range(max(0, last_seq - 2), last_seq + 1))
    finally:
        pub.close()
        ctx.destroy(linger=0)
