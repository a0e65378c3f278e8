"""NIXL (UCX) KV transport that speaks vLLM's NixlConnector handshake.

Followed: vLLM main at commit 002a1057 (the v0.12 line, connector version 2), file
vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py. The wire contract:

* Side channel: a ZMQ ROUTER bound on VLLM_NIXL_SIDE_CHANNEL_HOST:VLLM_NIXL_SIDE_CHANNEL_PORT + dp rank.
  A consumer connects a REQ socket and sends msgpack([b"get_meta_msg", tp_rank]); the producer answers
  (identity, b"", payload) where payload is the msgspec encoding of the dataclass
  NixlHandshakePayload(compatibility_hash: str, agent_metadata_bytes: bytes), and agent_metadata_bytes
  is the msgspec encoding of NixlAgentMetadata(engine_id, agent_metadata, kv_caches_base_addr,
  device_id, num_blocks, block_lens, kv_cache_layout, block_size). msgspec encodes a dataclass as a
  msgpack map keyed by field name in declaration order, bytes as bin: encoded here with msgpack.
* Memory: one NIXL region per KV cache tensor (one per layer for MLA), registered whole. Block b of
  region r starts at kv_caches_base_addr[r] + b * block_lens[r] and is block_lens[r] bytes long.
  Both sides prepare one descriptor per (region, block), region-major, so descriptor index =
  r * num_blocks + b; a READ names the same indices on both sides (NIXL merges adjacent ones).
* Completion: the READ carries the notification b"<remote_request_id>:<consumer tp size>"; a
  consumer that will not read sends the same message alone (send_notif). The producer frees the
  request's blocks on it, or after VLLM_NIXL_ABORT_REQUEST_TIMEOUT.

Cross-layer blocks (vLLM PR #33339, kv_connector_extra_config.enable_cross_layers_blocks; checked
against vLLM's nixl/connector.py at commit 01e4fce0, where the worker registers the one block-major
tensor through the same path as a layer's cache): no new field. The handshake carries ONE region,
kv_caches_base_addr = [backing tensor], block_lens = [num_layers * block bytes of one layer], so
descriptor index = block id and a run of adjacent blocks is one descriptor for all layers. A reader
tells the layouts apart only by the region count and block length; wideep refuses a mismatch at the
handshake with a message naming both layouts (and hashes the choice into its compatibility hash).
vLLM enables it only for FLASH_ATTN / FLASHINFER / TRITON_ATTN with the HND layout, never for MLA,
so a vLLM MLA engine is always per-layer: pair it with enable_cross_layers_blocks=false here.

wideep's MLA cache is one [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim] view per layer:
per layer (enable_cross_layers_blocks=false), the same per-layer layout vLLM's MLA backends register,
block_lens[r] = block_size * 576 * dtype bytes; cross-layer (opt-in, vLLM's enable_cross_layers_blocks), views [:, i] of one
[num_blocks, num_layers, block_size, 576] tensor, one region with block_len = num_layers * block_size *
576 * dtype bytes. The handshake refuses any difference in region count, block length or block size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack
import numpy as np

from wideep.kv_transfer.protocol import KVHandshakeError, KVTransferError

log = logging.getLogger("wideep.kv_transfer")

NIXL_CONNECTOR_VERSION = 2
# vLLM's NixlPromMetrics buckets: transfer seconds, bytes per transfer, descriptors per transfer.
XFER_TIME_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0]
BYTES_BUCKETS = [2 ** (10 + i) for i in range(1, 25, 2)]
DESCRIPTOR_BUCKETS = [10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000]
GET_META_MSG = b"get_meta_msg"
KV_CACHE_LAYOUT = "NHD"        # what vLLM reports by default; MLA caches have no head axis to permute

_import_error: str | None = None
_warned = False


def nixl_available() -> bool:
    """Whether the NIXL Python bindings import (pip install 'wideep[nixl]')."""
    global _import_error
    try:
        import nixl._api  # noqa: F401
        import zmq  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure (missing .so, wrong CUDA) means no NIXL
        _import_error = f"{type(exc).__name__}: {exc}"
        return False
    return True


def warn_fallback_once(cross_layers: bool = False) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("kv_transfer: NIXL is not importable (%s); NixlConnector falls back to the TCP side channel%s",
                    _import_error or "not installed",
                    " (enable_cross_layers_blocks, a NIXL layout, does not apply: the cache stays per layer)"
                    if cross_layers else "")


# ------------------------------------------------------------------------------------ wire format
@dataclass
class NixlAgentMetadata:
    engine_id: str
    agent_metadata: bytes
    kv_caches_base_addr: list[int]
    device_id: int
    num_blocks: int
    block_lens: list[int]
    kv_cache_layout: str
    block_size: int


@dataclass
class NixlHandshakePayload:
    compatibility_hash: str
    agent_metadata_bytes: bytes


def encode(obj: Any) -> bytes:
    """msgspec.msgpack.encode of a dataclass: a map of its fields in declaration order."""
    return msgpack.packb(asdict(obj), use_bin_type=True)


def decode(data: bytes, cls: type) -> Any:
    """Strict decode of `encode`'s output (unknown fields ignored, as msgspec does; types checked)."""
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001
        raise KVHandshakeError(f"undecodable {cls.__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise KVHandshakeError(f"{cls.__name__} is not a map: {type(d).__name__}")
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            raise KVHandshakeError(f"{cls.__name__} lacks field {f.name!r}")
        v = d[f.name]
        want = {"str": str, "bytes": bytes, "int": int, "list[int]": list}[str(f.type)]
        if not isinstance(v, want) or isinstance(v, bool) or (
                want is list and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise KVHandshakeError(f"{cls.__name__}.{f.name} must be {f.type}, got {v!r:.80}")
        kw[f.name] = v
    return cls(**kw)


def compatibility_hash(model: str, layout: list[dict[str, Any]], cross_layers: bool = False) -> str:
    """Hash of what decides whether two engines' KV bytes mean the same thing (model, per-layer
    block shape and dtype, cross-layer registration, connector version). vLLM hashes its own factors
    (vLLM version, attention backend); mixing the two needs enforce_handshake_compat=false on both
    sides, which leaves the explicit region/block-length checks."""
    blob = json.dumps({"nixl_connector_version": NIXL_CONNECTOR_VERSION, "model": model, "layout": layout,
                       "cross_layers": cross_layers}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Histogram:
    """Cumulative bucket counts, sum and count: a Prometheus histogram that crosses processes as a dict."""

    def __init__(self, buckets: list[float]):
        self.buckets = list(buckets)
        self.counts = [0] * (len(buckets) + 1)   # last: +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": self.buckets, "counts": list(self.counts), "sum": self.sum}


@dataclass
class Region:
    addr: int
    nbytes: int
    block_len: int


@dataclass
class _Remote:
    agent_name: str
    meta: NixlAgentMetadata
    dlist: Any
    refused: KVHandshakeError | None = None   # incompatible: notifications only, every read refused


# ------------------------------------------------------------------------------------ transport
class NixlTransport:
    """One NIXL agent per engine rank: producer (registered cache + side channel + notifications)
    and consumer (handshake, prepared READs) roles on the same agent. The agent is not thread-safe
    (sync mode NONE, as vLLM uses it), so every call into it holds `_lock`."""

    def __init__(self, *, engine_id: str, regions: list[Region], num_blocks: int, block_size: int,
                 device_id: int, mem_type: str, compat_hash: str, enforce_compat: bool = True,
                 tp_size: int = 1, handshake_timeout_s: float = 5.0, transfer_timeout_s: float = 60.0,
                 num_threads: int = 4, progress_thread: bool = False, num_layers: int | None = None):
        from nixl._api import nixl_agent, nixl_agent_config
        if mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"NIXL memory type must be DRAM or VRAM, got {mem_type!r}")
        self.engine_id = engine_id
        self.regions = regions
        # layers behind the regions: one region for all of them is the cross-layer registration
        self.num_layers = len(regions) if num_layers is None else num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device_id = device_id
        self.mem_type = mem_type
        self.compat_hash = compat_hash
        self.enforce_compat = enforce_compat
        self.tp_size = tp_size
        self.handshake_timeout_s = handshake_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._lock = threading.Lock()
        self._hs_lock = threading.Lock()      # one handshake at a time (vLLM: a 1-thread executor)
        # num_threads: UCX worker threads, vLLM's default of 4 (more would exhaust NIC UAR space).
        # progress_thread: NIXL's own thread, spinning on the agent's workers (the Python API sets no
        # delay). A producer on GPU wants it: a consumer's READ completes only as fast as the producer's
        # agent progresses. A consumer does not: its reader polls the READ back to back (which
        # progresses the agent), and a second spinning thread slows posting (docs/perf.md). Without
        # it, a thread of ours polls every POLL_S for notifications and connection set-up.
        self.agent = nixl_agent(f"{engine_id}-{uuid.uuid4().hex[:8]}",
                                nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"],
                                                  num_threads=num_threads))
        self._reg = self.agent.register_memory([(r.addr, r.nbytes, device_id, "") for r in regions], mem_type)
        self._local_dlist = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._block_descs(
            [r.addr for r in regions], [r.block_len for r in regions], num_blocks, device_id), mem_type)
        self._remotes: dict[str, _Remote] = {}
        meta = NixlAgentMetadata(engine_id=engine_id, agent_metadata=self.agent.get_agent_metadata(),
                                 kv_caches_base_addr=[r.addr for r in regions], device_id=device_id,
                                 num_blocks=num_blocks, block_lens=[r.block_len for r in regions],
                                 kv_cache_layout=KV_CACHE_LAYOUT, block_size=block_size)
        self.payload = encode(NixlHandshakePayload(compatibility_hash=compat_hash, agent_metadata_bytes=encode(meta)))
        self._listener: _Listener | None = None
        self._notifs: list[bytes] = []
        self._stop = threading.Event()
        self._poller = None
        if not progress_thread:
            self._poller = threading.Thread(target=self._poll, name=f"nixl-progress-{engine_id}", daemon=True)
            self._poller.start()
        self.stats = {"num_failed_transfers": 0, "num_failed_notifications": 0, "transfers": 0,
                      "bytes_transferred": 0, "num_descriptors": 0, "transfer_seconds": 0.0}
        # Where a READ's time goes (successful READs, cumulative): make_prepped_xfer, posting, until DONE,
        # releasing the handle. benchmarks/pd.py reports it.
        self.phase_seconds = {"prepare": 0.0, "post": 0.0, "wait": 0.0, "release": 0.0}
        self.hists = {"xfer_time_seconds": Histogram(XFER_TIME_BUCKETS), "bytes_transferred": Histogram(BYTES_BUCKETS),
                      "num_descriptors": Histogram(DESCRIPTOR_BUCKETS)}

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters and histograms for the engine's metrics (vLLM's vllm:nixl_* names)."""
        with self._lock:
            return {"num_failed_transfers": self.stats["num_failed_transfers"],
                    "num_failed_notifications": self.stats["num_failed_notifications"],
                    "histograms": {k: h.to_dict() for k, h in self.hists.items()}}

    POLL_S = 0.001

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            with self._lock:
                try:
                    got = self.agent.get_new_notifs()
                except Exception:  # noqa: BLE001 - keep polling; a broken agent shows up in transfers
                    continue
                for msgs in got.values():
                    self._notifs.extend(msgs)

    @staticmethod
    def _block_descs(bases: list[int], block_lens: list[int], num_blocks: int, dev: int) -> np.ndarray:
        """(address, length, device) of every block, region-major: row r * num_blocks + b."""
        blocks = np.arange(num_blocks, dtype=np.uint64)
        out = np.empty((len(bases) * num_blocks, 3), dtype=np.uint64)
        for r, (base, bl) in enumerate(zip(bases, block_lens)):
            rows = out[r * num_blocks:(r + 1) * num_blocks]
            rows[:, 0] = np.uint64(base) + blocks * np.uint64(bl)
            rows[:, 1] = bl
            rows[:, 2] = dev
        return out

    # ---------------------------------------------------------------- producer
    def serve(self, host: str, port: int) -> int:
        """Starts the ZMQ ROUTER side channel; returns the bound port (port 0: an ephemeral one)."""
        self._listener = _Listener(self.payload, host, port)
        return self._listener.port

    def take_notifications(self) -> list[str]:
        """Request ids whose blocks consumers are done with (b"<request_id>:<tp_size>")."""
        with self._lock:
            msgs = [m for ms in self.agent.get_new_notifs().values() for m in ms]
            msgs, self._notifs = self._notifs + msgs, []
        out = []
        for m in msgs:
            rid, sep, tp = m.decode("utf-8", "replace").rpartition(":")
            if not sep or not tp.isdigit():
                log.warning("kv_transfer: ignoring malformed NIXL notification %r", m[:80])
                continue
            if int(tp) != 1:   # MLA: every consumer rank reads the whole cache and notifies once
                log.debug("kv_transfer: notification for %s from a TP-%s consumer", rid, tp)
            out.append(rid)
        return out

    # ---------------------------------------------------------------- consumer
    def _handshake(self, host: str, port: int, expected_engine_id: str) -> _Remote:
        import zmq
        try:   # a refused connection fails now; ZMQ alone would retry silently until the timeout
            socket.create_connection((host, port), timeout=self.handshake_timeout_s).close()
        except (OSError, UnicodeError, ValueError) as exc:
            raise KVTransferError(f"cannot reach NIXL side channel {host}:{port}: {exc}") from None
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(self.handshake_timeout_s * 1000))
            sock.setsockopt(zmq.SNDTIMEO, int(self.handshake_timeout_s * 1000))
            sock.connect(f"tcp://{_zmq_host(host)}:{port}")
            sock.send(msgpack.packb([GET_META_MSG, 0], use_bin_type=True))
            try:
                reply = sock.recv()
            except zmq.Again:
                raise KVTransferError(f"no NIXL handshake reply from {host}:{port} within "
                                      f"{self.handshake_timeout_s:.0f} s (producer down?)") from None
        except zmq.ZMQError as exc:
            raise KVTransferError(f"NIXL side channel {host}:{port}: {exc}") from None
        finally:
            ctx.destroy(linger=0)
        payload = decode(reply, NixlHandshakePayload)
        meta = decode(payload.agent_metadata_bytes, NixlAgentMetadata)
        if meta.engine_id != expected_engine_id:
            raise KVTransferError(f"producer {host}:{port} is engine {meta.engine_id!r}, the request names "
                                  f"{expected_engine_id!r} (the prefill server restarted since the prefill?)")
        refused = None
        if self.enforce_compat and payload.compatibility_hash != self.compat_hash:
            refused = KVHandshakeError(
                f"NIXL handshake with {host}:{port} failed: compatibility hash mismatch (producer "
                f"{payload.compatibility_hash[:12]}, here {self.compat_hash[:12]}): different model or KV cache "
                "layout; kv_connector_extra_config.enforce_handshake_compat=false only to pair with another "
                "implementation")
        why = self.layout_mismatch(meta)
        if why:
            refused = KVHandshakeError(f"NIXL handshake with {host}:{port} failed: {why}")
        with self._lock:
            # Added even when refused: a notification still lets the producer free the request's blocks.
            name = self.agent.add_remote_agent(meta.agent_metadata)
            if isinstance(name, bytes):
                name = name.decode()
            if refused is not None:
                return _Remote(name, meta, None, refused)
            try:
                dlist = self.agent.prep_xfer_dlist(name, self._block_descs(
                    meta.kv_caches_base_addr, meta.block_lens, meta.num_blocks, meta.device_id), self.mem_type)
            except Exception:
                self.agent.remove_remote_agent(name)
                raise
        return _Remote(name, meta, dlist)

    def layout_mismatch(self, meta: NixlAgentMetadata) -> str | None:
        if meta.block_size != self.block_size:
            return (f"block size {meta.block_size} on the producer != {self.block_size} here "
                    "(start both roles with the same --block-size)")
        if len(meta.kv_caches_base_addr) != len(meta.block_lens):
            return f"{len(meta.kv_caches_base_addr)} region addresses but {len(meta.block_lens)} block lengths"
        cross = len(self.regions) == 1 and self.num_layers > 1
        fix = "set kv_connector_extra_config.enable_cross_layers_blocks the same on both roles"
        if len(meta.block_lens) != len(self.regions):
            if cross:
                return (f"KV cache layout: the producer registers {len(meta.block_lens)} per-layer regions, this engine "
                        f"one cross-layer region (all {self.num_layers} layers of a block contiguous): {fix}")
            if len(meta.block_lens) == 1 and len(self.regions) > 1:
                return (f"KV cache layout: the producer registers one cross-layer region (blocks of "
                        f"{meta.block_lens[0]} bytes holding every layer), this engine {len(self.regions)} "
                        f"per-layer regions: {fix}")
            return f"{len(meta.block_lens)} KV cache regions (layers) on the producer != {len(self.regions)} here"
        for i, (theirs, r) in enumerate(zip(meta.block_lens, self.regions)):
            if theirs != r.block_len:
                what = f" (cross-layer: all {self.num_layers} layers of a block here)" if cross else ""
                return f"KV cache region {i}: producer block of {theirs} bytes != {r.block_len} here{what}"
        if meta.num_blocks <= 0:
            return f"producer reports {meta.num_blocks} blocks"
        return None

    def remote(self, host: str, port: int, engine_id: str) -> _Remote:
        with self._hs_lock:
            r = self._remotes.get(engine_id)
            if r is None:
                r = self._remotes[engine_id] = self._handshake(host, port, engine_id)
            return r

    def knows(self, engine_id: str) -> bool:
        with self._hs_lock:
            return engine_id in self._remotes

    def forget(self, engine_id: str) -> None:
        """Drops a producer after a failed transfer: the next request re-handshakes (it may have restarted)."""
        with self._hs_lock:
            r = self._remotes.pop(engine_id, None)
        if r is not None:
            with self._lock:
                for call in (lambda: r.dlist is not None and self.agent.release_dlist_handle(r.dlist),
                             lambda: self.agent.remove_remote_agent(r.agent_name)):
                    try:
                        call()
                    except Exception:  # noqa: BLE001 - best effort on a peer that is already gone
                        pass

    def read(self, host: str, port: int, engine_id: str, remote_request_id: str, local_block_ids: list[int],
             remote_block_ids: list[int]) -> int:
        """READs the producer's blocks into ours and notifies it; returns the bytes moved."""
        if len(local_block_ids) != len(remote_block_ids):
            raise ValueError(f"{len(local_block_ids)} local blocks for {len(remote_block_ids)} remote blocks")
        r = self.remote(host, port, engine_id)
        if r.refused is not None:
            raise r.refused
        bad = [b for b in remote_block_ids if not 0 <= b < r.meta.num_blocks]
        if bad:
            raise KVTransferError(f"remote block ids {bad[:5]} out of the producer's range 0..{r.meta.num_blocks - 1}")
        bad = [b for b in local_block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"local block ids {bad[:5]} out of range 0..{self.num_blocks - 1}")
        n = len(self.regions)
        regions = np.arange(n, dtype=np.int64)[:, None]
        local_idx = (regions * self.num_blocks + np.asarray(local_block_ids, dtype=np.int64)).ravel()
        remote_idx = (regions * r.meta.num_blocks + np.asarray(remote_block_ids, dtype=np.int64)).ravel()
        local_idx, remote_idx = local_idx.astype(np.int32), remote_idx.astype(np.int32)   # NIXL's index type
        notif = f"{remote_request_id}:{self.tp_size}".encode()
        t0 = time.perf_counter()
        handle = None
        try:
            with self._lock:
                handle = self.agent.make_prepped_xfer("READ", self._local_dlist, local_idx, r.dlist, remote_idx,
                                                      notif_msg=notif)
                t1 = time.perf_counter()
                state = self.agent.transfer(handle)
            t2 = time.perf_counter()
            deadline = time.monotonic() + self.transfer_timeout_s
            # GPU: poll back to back (sleep(0) only yields the GIL) for the first 2 ms, which covers a READ
            # of up to ~8k tokens of R1 KV (a 100 us sleep is really 60-150 us and adds that to every READ);
            # then 100 us naps, so several long pulls in flight do not spin against the engine's thread. A
            # small CPU host naps from the start (spinning steals a core).
            spin_until = time.monotonic() + (0.002 if self.mem_type == "VRAM" else 0.0)
            while state == "PROC":
                now = time.monotonic()
                if now > deadline:
                    raise KVTransferError(f"NIXL READ from {host}:{port} not done after {self.transfer_timeout_s:.0f} s")
                time.sleep(0.0 if now < spin_until else 0.0001)
                with self._lock:
                    state = self.agent.check_xfer_state(handle)
            t3 = time.perf_counter()
            if state != "DONE":
                raise KVTransferError(f"NIXL READ from {host}:{port} failed (state {state})")
        except Exception as exc:
            with self._lock:
                self.stats["num_failed_transfers"] += 1
            self._release_handle(handle)
            try:   # a producer that is still there frees the blocks now instead of at its timeout
                with self._lock:
                    self.agent.send_notif(r.agent_name, notif)
            except Exception:  # noqa: BLE001
                pass
            self.forget(engine_id)
            if isinstance(exc, (KVTransferError, ValueError)):
                raise
            raise KVTransferError(f"NIXL READ from {host}:{port} failed: {type(exc).__name__}: {exc}") from exc
        self._release_handle(handle)
        nbytes = sum(rg.block_len for rg in self.regions) * len(local_block_ids)
        t4 = time.perf_counter()
        dt = t4 - t0
        with self._lock:
            for k, v in (("prepare", t1 - t0), ("post", t2 - t1), ("wait", t3 - t2), ("release", t4 - t3)):
                self.phase_seconds[k] += v
            self.stats["transfers"] += 1
            self.stats["bytes_transferred"] += nbytes
            self.stats["num_descriptors"] += len(local_idx)
            self.stats["transfer_seconds"] += dt
            self.hists["xfer_time_seconds"].observe(dt)
            self.hists["bytes_transferred"].observe(nbytes)
            self.hists["num_descriptors"].observe(len(local_idx))
        return nbytes

    def notify(self, host: str, port: int, engine_id: str, remote_request_id: str) -> None:
        """Tells the producer we will not read (abort, full local hit): it frees the blocks now."""
        r = self.remote(host, port, engine_id)
        try:
            with self._lock:
                self.agent.send_notif(r.agent_name, f"{remote_request_id}:{self.tp_size}".encode())
        except Exception as exc:
            with self._lock:
                self.stats["num_failed_notifications"] += 1
            self.forget(engine_id)
            raise KVTransferError(f"NIXL notification to {host}:{port} failed: {exc}") from exc

    def _release_handle(self, handle) -> None:
        if handle is None:
            return
        try:
            with self._lock:
                self.agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001 - a handle of a dead peer may refuse release; the agent reaps it
            pass

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(2)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for eid in list(self._remotes):
            self.forget(eid)
        with self._lock:
            try:
                self.agent.release_dlist_handle(self._local_dlist)
                self.agent.deregister_memory(self._reg)
            except Exception:  # noqa: BLE001
                pass


def _zmq_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Listener:
    """The producer's ZMQ ROUTER: answers every get_meta_msg with the handshake payload."""

    def __init__(self, payload: bytes, host: str, port: int):
        import zmq
        self.payload = payload
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            if port == 0:
                self.port = self._sock.bind_to_random_port(f"tcp://{_zmq_host(host)}")
            else:
                self._sock.bind(f"tcp://{_zmq_host(host)}:{port}")
                self.port = port
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise OSError(f"cannot listen on NIXL side channel {host}:{port} ({exc}); set "
                          "VLLM_NIXL_SIDE_CHANNEL_PORT / WIDEEP_KV_SIDE_CHANNEL_PORT to a free base port") from exc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"nixl-side-channel-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq
        while not self._stop.is_set():
            try:
                frames = self._sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            if len(frames) != 3:
                continue   # not a REQ peer: nothing sensible to answer
            identity, _, msg = frames
            reply = b""
            try:
                what, tp_rank = msgpack.unpackb(msg, raw=False)
                if what == GET_META_MSG and tp_rank == 0:
                    reply = self.payload
                else:
                    log.warning("kv_transfer: side channel got %r for tp rank %r; answering empty", what, tp_rank)
            except Exception:  # noqa: BLE001 - garbage must not kill the listener
                log.warning("kv_transfer: undecodable side-channel message (%d bytes)", len(msg))
            try:
                self._sock.send_multipart((identity, b"", reply))
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._ctx.destroy(linger=0)
