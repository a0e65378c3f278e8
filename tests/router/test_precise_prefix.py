"""precise-prefix-cache-scorer fed by a real ZMQ PUB in vLLM's KV-event wire format."""
from __future__ import annotations

import asyncio
import time

import msgpack
import zmq

from wideep.router.datastore import Datastore
from wideep.router.registry import create
from wideep.router.tokenize import estimate_token_ids
from wideep.utils.net import free_port_range

from router_helpers import ep, request

BS = 4


def batch(events, rank):
    return msgpack.packb([time.time(), events, rank])


def test_precise_scorer_follows_block_stored_and_removed():
    base = free_port_range(2)
    scorer = create("precise-prefix-cache-scorer", "pp", {
        "tokenProcessorConfig": {"blockSize": BS},
        "kvEventsConfig": {"topicFilter": "kv@", "podDiscoveryConfig": {"socketPort": base}}})
    a, b = ep("a-rank-0", address="127.0.0.1:18000"), ep("b-rank-1", address="127.0.0.1:18001")
    a.rank, b.rank = 0, 1   # a subscribes to base+0, b to base+1
    ds = Datastore()
    ds.set_endpoints([a, b])
    prompt = "a shared system prompt, long enough for several blocks"
    tokens = estimate_token_ids(prompt.encode())
    nblocks = len(tokens) // BS

    class Ctx:
        datastore = ds

    ctx = zmq.Context()
    pubs = []
    for i in range(2):
        s = ctx.socket(zmq.PUB)
        s.bind(f"tcp://127.0.0.1:{base + i}")
        pubs.append(s)
    seq = [0, 0]

    def publish(i, events):
        seq[i] += 1
        pubs[i].send_multipart(["kv@127.0.0.1@m".encode(), seq[i].to_bytes(8, "big"), batch(events, i)])

    def score():
        req = request(prompt)
        req.token_ids = tokens
        scorer.produce(req, [a, b])
        return {e.name: s for e, s in scorer.score(req, [a, b]).items()}

    async def main():
        await scorer.start(Ctx)
        try:
            engine_hashes = [1000 + j for j in range(nblocks)]   # opaque engine hashes
            stored = ["BlockStored", engine_hashes[:2], None, tokens[:2 * BS], BS, None, "GPU", None]
            stored2 = ["BlockStored", engine_hashes[2:], engine_hashes[1], tokens[2 * BS:nblocks * BS], BS, None,
                       "GPU", None]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:       # PUB/SUB joins asynchronously: repeat until seen
                publish(1, [stored, stored2])
                await asyncio.sleep(0.05)
                if score()["b-rank-1"] == 1.0:
                    break
            assert score() == {"a-rank-0": 0.0, "b-rank-1": 1.0}
            # the engine evicts block 1 -> only block 0 still matches consecutively
            publish(1, [["BlockRemoved", [engine_hashes[1]], "GPU"]])
            deadline = time.monotonic() + 10
            while score()["b-rank-1"] > 1 / nblocks and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert score()["b-rank-1"] == 1 / nblocks
            # the other rank's socket is separate: its events land on endpoint a
            publish(0, [["BlockStored", [7], None, tokens[:BS], BS, None, "CPU", None]])
            deadline = time.monotonic() + 10
            while score()["a-rank-0"] == 0 and time.monotonic() < deadline:
                publish(0, [["BlockStored", [7], None, tokens[:BS], BS, None, "CPU", None]])
                await asyncio.sleep(0.05)
            assert score()["a-rank-0"] == 0.8 / nblocks   # CPU tier weighs less
            publish(1, [["AllBlocksCleared"]])
            deadline = time.monotonic() + 10
            while score()["b-rank-1"] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert score()["b-rank-1"] == 0.0         # evicted: it stops preferring b
        finally:
            await scorer.stop()

    try:
        asyncio.run(main())
    finally:
        for s in pubs:
            s.close(linger=0)
        ctx.term()


def test_local_tokenizer_token_ids(tmp_path):
    """token-producer with a local tokenizer dir gives the engine's ids (no torch)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3, "user": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"}')
    tp = create("token-producer", "tp", {"mode": "tokenizer", "tokenizer": str(tmp_path)})
    r = request("hello world")
    tp.produce(r, [])
    assert r.token_ids == [2, 3]
    c = request("hello", chat=True)
    tp.produce(c, [])
    assert c.token_ids == [1, 4, 2]
