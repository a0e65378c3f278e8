"""Precise prefix-cache routing: follow each engine's own KV events over ZMQ.

Every endpoint (DP rank) publishes on its own socket, tcp://<ip>:<socketPort + rank> (or the
endpoint's explicit `kv_events` address). Frames: [topic, seq u64 BE, msgpack [ts, events, dp_rank]].
The engine's block hashes are opaque to us (sha256/xxhash, seeded), so we recompute our own keys
from the event's token_ids (chained xxhash64, full blocks) and keep engine-hash -> our-key per
endpoint, so BlockRemoved/AllBlocksCleared can take exactly those blocks away again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import msgpack

from wideep.router.framework import DataProducer, Scorer
from wideep.router.plugins.prefix import PRECISE_PREFIX_MATCH, PrefixMatch
from wideep.router.prefix_hash import block_hashes, chain_block, root_hash
from wideep.router.registry import PluginParams, register
from wideep.router.types import Endpoint

log = logging.getLogger(__name__)

MEDIUM_WEIGHT = {"GPU": 1.0, "CPU": 0.8}
DEFAULT_MEDIUM_WEIGHT = 0.5


def _check_keys(where: str, d: Any, known: set[str]) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping")
    bad = set(d) - known
    if bad:
        raise ValueError(f"{where}: unknown key(s) {sorted(bad)}; known: {sorted(known)}")
    return d


@dataclass
class PreciseParams(PluginParams):
    token_processor_config: dict = field(default_factory=dict)   # {blockSize, hashSeed}
    kv_events_config: dict = field(default_factory=dict)
    # {topicFilter, discoverPods, replayTimeoutMs, podDiscoveryConfig{socketPort, replayPort}}
    indexer_config: dict = field(default_factory=dict)           # accepted for compatibility

    def validate(self):
        tp = _check_keys("tokenProcessorConfig", self.token_processor_config, {"blockSize", "hashSeed"})
        kv = _check_keys("kvEventsConfig", self.kv_events_config,
                         {"topicFilter", "discoverPods", "podDiscoveryConfig", "zmqEndpoint", "concurrency",
                          "replayTimeoutMs"})
        pd = _check_keys("kvEventsConfig.podDiscoveryConfig", kv.get("podDiscoveryConfig"),
                         {"socketPort", "socketIP", "replayPort"})
        self.block_size = int(tp.get("blockSize", 16))
        self.hash_seed = str(tp.get("hashSeed", ""))
        self.topic_filter = str(kv.get("topicFilter", "kv@"))
        self.discover_pods = bool(kv.get("discoverPods", True))
        self.socket_port = int(pd.get("socketPort", 5557))
        self.replay_port = int(pd.get("replayPort", 0))            # 0 = no replay (vLLM's default)
        self.replay_timeout_s = float(kv.get("replayTimeoutMs", 1000)) / 1000.0
        if self.replay_timeout_s <= 0:
            raise ValueError("kvEventsConfig.replayTimeoutMs must be > 0")
        if self.block_size < 1:
            raise ValueError("tokenProcessorConfig.blockSize must be >= 1")


class KVBlockIndex:
    """Our block key -> {endpoint: medium}, with each endpoint's engine-hash -> our-key map."""

    def __init__(self, block_size: int, hash_seed: str):
        self.block_size = block_size
        self.root = root_hash(hash_seed)
        self.holders: dict[int, dict[str, str]] = {}
        self.engine_keys: dict[str, dict[Any, int]] = {}
        self.warned_block_size = False

    def block_stored(self, ep: str, engine_hashes: list, parent: Any, token_ids: list[int], block_size: int,
                     medium: str | None) -> None:
        if block_size != self.block_size:
            if not self.warned_block_size:
                log.warning("KV event block_size %s != tokenProcessorConfig.blockSize %s: events ignored",
                            block_size, self.block_size)
                self.warned_block_size = True
            return
        emap = self.engine_keys.setdefault(ep, {})
        if parent is None:
            key = self.root
        elif parent in emap:
            key = emap[parent]
        else:
            return  # parent unknown (evicted or missed): cannot chain these blocks
        for j, eh in enumerate(engine_hashes):
            toks = token_ids[j * block_size:(j + 1) * block_size]
            if len(toks) < block_size:
                break
            key = chain_block(key, toks)
            emap[eh] = key
            self.holders.setdefault(key, {})[ep] = medium or "GPU"

    def block_removed(self, ep: str, engine_hashes: list) -> None:
        emap = self.engine_keys.get(ep, {})
        for eh in engine_hashes:
            key = emap.pop(eh, None)
            if key is not None:
                self._drop(key, ep)

    def all_cleared(self, ep: str) -> None:
        for key in self.engine_keys.pop(ep, {}).values():
            self._drop(key, ep)

    def _drop(self, key: int, ep: str) -> None:
        h = self.holders.get(key)
        if h is not None:
            h.pop(ep, None)
            if not h:
                del self.holders[key]

    def apply(self, ep: str, payload: bytes) -> None:
        batch = msgpack.unpackb(payload, strict_map_key=False)
        for ev in batch[1]:
            tag = ev[0]
            if tag == "BlockStored":
                f = list(ev[1:]) + [None] * 8
                self.block_stored(ep, f[0], f[1], f[2], f[3], f[5])
            elif tag == "BlockRemoved":
                self.block_removed(ep, ev[1])
            elif tag == "AllBlocksCleared":
                self.all_cleared(ep)

    def keys_for(self, token_ids: list[int]) -> list[int]:
        return block_hashes(token_ids, self.block_size, self.root)

    def match(self, keys: list[int], names: set[str] | None = None) -> dict[str, float]:
        """Consecutive hits from block 0 per endpoint, each weighted by the medium it sits on."""
        score: dict[str, float] = {}
        active: set[str] | None = None
        for k in keys:
            h = self.holders.get(k)
            if not h:
                break
            active = set(h) if active is None else active & h.keys()
            if not active:
                break
            for n in active:
                score[n] = score.get(n, 0.0) + MEDIUM_WEIGHT.get(h[n], DEFAULT_MEDIUM_WEIGHT)
        if names is not None:
            score = {n: v for n, v in score.items() if n in names}
        return score


class KVEventSubscriber:
    """One ZMQ SUB socket per endpoint, kept in step with the endpoint list.

    Sequence numbers are per publisher and consecutive. A gap (or first contact after the
    publisher already sent batches) means lost events: when the endpoint has a replay address
    (the engine's ROUTER `replay_endpoint`), we ask it for everything from the first missing seq
    (DEALER sends [b"", start u64 BE]; frames [b"", seq, payload] come back, then seq -1) and apply
    the batches we have not applied yet, before the live batch that revealed the gap."""

    def __init__(self, index: KVBlockIndex, params: PreciseParams):
        self.index = index
        self.params = params
        self.sockets: dict[str, tuple[str, Any, asyncio.Task]] = {}
        self.last_seq: dict[str, int] = {}      # last seq applied per endpoint
        self.gaps = 0                            # gaps seen (events possibly lost)
        self.replayed = 0                        # batches recovered by replay
        self._task: asyncio.Task | None = None
        self.ctx = None

    def address_of(self, ep: Endpoint) -> str:
        return ep.kv_events or f"tcp://{ep.host}:{self.params.socket_port + ep.rank}"

    def replay_address_of(self, ep: Endpoint) -> str | None:
        if ep.kv_events_replay:
            return ep.kv_events_replay
        if self.params.replay_port:
            return f"tcp://{ep.host}:{self.params.replay_port + ep.rank}"
        return None

    async def start(self, datastore) -> None:
        import zmq.asyncio

        self.ctx = zmq.asyncio.Context()
        self._task = asyncio.create_task(self._sync_loop(datastore))

    async def _sync_loop(self, datastore) -> None:
        while True:
            self.sync(datastore.all())
            await asyncio.sleep(0.2)

    def sync(self, eps: list[Endpoint]) -> None:
        import zmq

        want = {e.name: (self.address_of(e), self.replay_address_of(e)) for e in eps}
        for name in list(self.sockets):
            if want.get(name) != self.sockets[name][0]:
                addr, sock, task = self.sockets.pop(name)
                task.cancel()
                sock.close(linger=0)
                self.index.all_cleared(name)
                self.last_seq.pop(name, None)
        for name, addrs in want.items():
            if name not in self.sockets:
                sock = self.ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.SUBSCRIBE, self.params.topic_filter.encode())
                sock.connect(addrs[0])
                self.sockets[name] = (addrs, sock, asyncio.create_task(self._reader(name, sock, addrs[1])))

    async def _reader(self, name: str, sock, replay_addr: str | None) -> None:
        while True:
            frames = await sock.recv_multipart()
            await self.on_message(name, frames, replay_addr)

    async def on_message(self, name: str, frames: list[bytes], replay_addr: str | None) -> None:
        """One live message: replay what is missing before it, then apply it (unless replay did)."""
        if len(frames) != 3 or len(frames[1]) != 8:
            log.warning("KV events from %s: expected [topic, seq(8 bytes), payload], got %d frames", name, len(frames))
            return
        seq = int.from_bytes(frames[1], "big")
        prev = self.last_seq.get(name)
        if prev is not None and seq <= prev:
            return                                   # already applied (through a replay)
        expected = 0 if prev is None else prev + 1
        if seq != expected:
            if prev is not None:
                self.gaps += 1
                log.warning("KV events from %s: sequence gap %s -> %s%s", name, prev, seq,
                            "; replaying" if replay_addr else " (events lost: no replay endpoint)")
            if replay_addr:
                await self.replay(name, replay_addr, expected)
        if seq > self.last_seq.get(name, -1):
            self._apply(name, seq, frames[2])

    def _apply(self, name: str, seq: int, payload: bytes) -> None:
        self.last_seq[name] = seq
        try:
            self.index.apply(name, payload)
        except Exception:  # a malformed batch must not kill the subscriber
            log.exception("KV events from %s: bad batch", name)

    async def replay(self, name: str, addr: str, start_seq: int) -> int:
        """Ask the engine's replay socket for batches from start_seq on; returns how many applied."""
        import zmq

        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        applied = 0
        try:
            sock.connect(addr)
            await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.params.replay_timeout_s
            while True:
                left = deadline - loop.time()
                if left <= 0 or not await sock.poll(timeout=int(left * 1000) + 1):
                    log.warning("KV events from %s: replay at %s timed out after %d batches", name, addr, applied)
                    break
                frames = await sock.recv_multipart()
                if len(frames) < 3 or len(frames[-2]) != 8:
                    log.warning("KV events from %s: bad replay frame", name)
                    continue
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq < 0:
                    break                              # end of replay
                if seq > self.last_seq.get(name, -1):
                    self._apply(name, seq, frames[-1])
                    applied += 1
        finally:
            sock.close(linger=0)
        self.replayed += applied
        return applied

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for _, sock, task in self.sockets.values():
            task.cancel()
            sock.close(linger=0)
        self.sockets.clear()
        if self.ctx is not None:
            self.ctx.term()


class _PreciseCore(DataProducer):
    Params = PreciseParams
    DATA_KEY = PRECISE_PREFIX_MATCH

    def __init__(self, name, params):
        super().__init__(name, params)
        self.index = KVBlockIndex(params.block_size, params.hash_seed)
        self.subscriber = KVEventSubscriber(self.index, params)

    async def start(self, ctx):
        await self.subscriber.start(ctx.datastore)

    async def stop(self):
        await self.subscriber.stop()

    def produce(self, req, eps):
        keys = self.index.keys_for(req.token_ids or [])
        weighted = self.index.match(keys)   # holders outside `eps` are never read
        m = PrefixMatch(hashes=keys, block_size=self.index.block_size,
                        matched_blocks={k: int(round(v)) for k, v in weighted.items()}, weighted=weighted)
        req.data.put(self.DATA_KEY, m)


@register("precise-prefix-cache-producer")
class PrecisePrefixCacheProducer(_PreciseCore):
    pass


@register("precise-prefix-cache-scorer")
class PrecisePrefixCacheScorer(_PreciseCore, Scorer):
    """Weighted consecutive hits / total blocks, from the engines' own cache state."""

    category = "affinity"

    def __init__(self, name, params):
        super().__init__(name, params)
        self.producer: _PreciseCore | None = None

    def wire(self, plugins):
        for p in plugins.values():
            if isinstance(p, PrecisePrefixCacheProducer):
                self.producer = p

    async def start(self, ctx):
        if self.producer is None:
            await super().start(ctx)

    async def stop(self):
        if self.producer is None:
            await super().stop()

    def produce(self, req, eps):
        if self.producer is None:
            super().produce(req, eps)

    def score_values(self, req, eps):
        m = req.data.get(self.DATA_KEY)
        if m is None or not m.hashes or not m.weighted:
            return [0.0] * len(eps)
        total = len(m.hashes)
        w = m.weighted
        return [w.get(e.name, 0.0) / total for e in eps]
