"""KV cache events over ZMQ in vLLM's wire format, so llm-d's precise-prefix scorer can follow our cache.

The engine process publishes what its block manager stored and evicted (api.py's BlockStored,
BlockRemoved, AllBlocksCleared). Wire format (docs/protocols.md, "KV events"):

* PUB socket, three frames per message: ``[topic, seq (8-byte big-endian), payload]``.
* payload = msgpack ``EventBatch`` as an array: ``[ts, events, data_parallel_rank]``; each event is
  a tagged array: ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name]``, ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``.
* The tcp port of ``endpoint`` (and ``replay_endpoint``) is offset by the DP rank, so every rank of
  a pod has its own stream; ipc/inproc endpoints get a ``_dp<rank>`` suffix instead.
* Replay (optional ROUTER socket): a DEALER client sends ``[b"", start_seq (8 bytes)]`` and gets
  ``[b"", seq, payload]`` for every buffered batch with seq >= start_seq, then ``[b"", -1, b""]``.
  The buffer holds the last ``buffer_steps`` batches.

Sending happens on a background thread so a slow subscriber or replay never stalls the engine loop.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import msgpack

from wideep.engine.api import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from wideep.errors import ConfigError
from wideep.typed_config import build

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
END_OF_REPLAY = -1


@dataclass
class KVEventsConfig:
    """vLLM's --kv-events-config (vllm/config/kv_events.py), same keys and defaults."""

    enable_kv_cache_events: bool = False
    publisher: Literal["zmq", "null"] = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "KVEventsConfig":
        if d is None:
            return cls()
        cfg = build(cls, d, "kv_events_config")
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            v = getattr(cfg, name)
            if v < 1:
                raise ConfigError(f"kv_events_config.{name}", f"must be a positive integer, got {v!r}")
        return cfg

    @property
    def active(self) -> bool:
        return bool(self.enable_kv_cache_events) and self.publisher == "zmq"


def offset_endpoint(endpoint: str, dp_rank: int) -> str:
    """tcp://host:5557 -> tcp://host:(5557+rank); ipc:///x -> ipc:///x_dp<rank> (vLLM's rule)."""
    if endpoint.startswith("tcp://"):
        m = re.fullmatch(r"(tcp://.*):(\d+)", endpoint)
        if not m:
            raise ValueError(f"kv events endpoint {endpoint!r} has no port")
        return f"{m.group(1)}:{int(m.group(2)) + dp_rank}"
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{dp_rank}"
    raise ValueError(f"kv events endpoint {endpoint!r} must start with tcp://, ipc:// or inproc://")


def _hash(h: int | bytes | None) -> int | bytes | None:
    """msgpack carries at most 64-bit integers; wider hashes keep their low 64 bits (what llm-d reads)."""
    if isinstance(h, int) and not (-(1 << 63) <= h <= _U64):
        return h & _U64
    return h


def encode_event(ev: KVEvent) -> list[Any]:
    if isinstance(ev, BlockStored):
        return ["BlockStored", [_hash(h) for h in ev.block_hashes], _hash(ev.parent_block_hash),
                list(ev.token_ids), ev.block_size, ev.lora_id, ev.medium, None]
    if isinstance(ev, BlockRemoved):
        return ["BlockRemoved", [_hash(h) for h in ev.block_hashes], ev.medium]
    if isinstance(ev, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV event: {ev!r}")


def encode_batch(events: Iterable[KVEvent], dp_rank: int | None, ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, [encode_event(e) for e in events], dp_rank])


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int | None]:
    """Inverse of encode_batch (for subscribers and tests); tolerates vLLM's omitted trailing fields."""
    batch = msgpack.unpackb(payload, strict_map_key=False)
    ts, raw_events = batch[0], batch[1]
    dp_rank = batch[2] if len(batch) > 2 else None
    events: list[KVEvent] = []
    for raw in raw_events:
        tag = raw[0]
        if tag == "BlockStored":
            f = list(raw[1:]) + [None] * 7
            events.append(BlockStored(block_hashes=list(f[0]), parent_block_hash=f[1], token_ids=list(f[2]),
                                      block_size=f[3], lora_id=f[4], medium=f[5] or "GPU"))
        elif tag == "BlockRemoved":
            f = list(raw[1:]) + [None] * 2
            events.append(BlockRemoved(block_hashes=list(f[0]), medium=f[1] or "GPU"))
        elif tag == "AllBlocksCleared":
            events.append(AllBlocksCleared())
        else:
            raise ValueError(f"unknown KV event tag {tag!r}")
    return ts, events, dp_rank


class KVEventPublisher:
    """Owns the PUB (and optional ROUTER replay) socket on one background thread."""

    def __init__(self, config: KVEventsConfig, dp_rank: int):
        import zmq

        self.config = config
        self.dp_rank = dp_rank
        self.endpoint = offset_endpoint(config.endpoint, dp_rank)
        self.replay_endpoint = offset_endpoint(config.replay_endpoint, dp_rank) if config.replay_endpoint else None
        self._topic = config.topic.encode()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._dropped = 0
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.endpoint)
        self._replay = None
        if self.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-dp{dp_rank}", daemon=True)
        self._thread.start()
        log.info("KV events: PUB %s replay %s topic %r", self.endpoint, self.replay_endpoint, config.topic)

    @classmethod
    def create(cls, config: dict[str, Any] | KVEventsConfig | None, dp_rank: int) -> "KVEventPublisher | None":
        """The engine process calls this once; None when events are off."""
        cfg = config if isinstance(config, KVEventsConfig) else KVEventsConfig.from_dict(config)
        return cls(cfg, dp_rank) if cfg.active else None

    def publish(self, events: list[KVEvent]) -> None:
        """Called from the engine loop after each step; never blocks (drops and counts when full)."""
        if not events:
            return
        try:
            self._queue.put_nowait(encode_batch(events, self.dp_rank))
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                log.warning("KV events queue full: %d batches dropped", self._dropped)

    def close(self, timeout: float = 2.0) -> None:
        """Flushes queued batches, then closes the sockets."""
        if self._stopped.is_set():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stopped.set()
        self._ctx.destroy(linger=0)

    # -- background thread -------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            try:
                payload = self._queue.get(timeout=0.02)
            except queue.Empty:
                payload = b""
            if payload is None:
                break
            if payload:
                self._send(payload)
                while True:  # drain whatever else is queued before looking at replays
                    try:
                        payload = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if payload is None:
                        return
                    self._send(payload)
            if self._replay is not None and poller.poll(0):
                self._serve_replay()

    def _send(self, payload: bytes) -> None:
        import zmq

        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # subscriber too slow (HWM); it will see the gap and replay

    def _serve_replay(self) -> None:
        import zmq

        while True:
            try:
                frames = self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, start = frames[0], frames[-1]
            if len(start) != 8:
                log.warning("KV events replay: bad start seq frame of %d bytes", len(start))
                continue
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    self._replay.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            self._replay.send_multipart([ident, b"", END_OF_REPLAY.to_bytes(8, "big", signed=True), b""])


def create_publisher(config: dict[str, Any] | KVEventsConfig | None, data_parallel_rank: int) -> KVEventPublisher | None:
    """What the engine process calls (engine/proc.py): a running publisher, or None when events are off."""
    return KVEventPublisher.create(config, data_parallel_rank)
