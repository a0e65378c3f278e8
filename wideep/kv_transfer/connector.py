"""The P/D KV connector of one engine rank (the scheduler's `SchedulerConnector`).

Producer (kv_producer / kv_both): a request with kv_transfer_params.do_remote_decode finishes as
usual (one token), but its blocks stay allocated ("held") and its final output carries the
NixlConnector-shaped params telling a consumer where to read them. The blocks are freed when the
consumer has read them, when it says it will not (release), or after VLLM_NIXL_ABORT_REQUEST_TIMEOUT.

Consumer (kv_consumer / kv_both): a request with do_remote_prefill gets its blocks allocated, waits
in WAITING_FOR_REMOTE_KV while a worker thread pulls the producer's blocks over the side channel
into them, then computes only the prompt's last token locally (vLLM does the same), so its first
sampled token comes from this engine exactly as in an aggregated run. A failed read either
recomputes the prompt locally or fails the request (kv_load_failure_policy).

Every method except the worker's is called on the engine thread; shared sets are guarded by a lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from wideep import envs
from wideep.kv_transfer import nixl as nixl_mod
from wideep.kv_transfer.base import KVConnectorBase
from wideep.kv_transfer.kv_cache import PagedKVCaches
from wideep.kv_transfer.params import (KVTransferConfig, RemotePrefillParams, abort_timeout_s, engine_id_for_rank,
                                       side_channel_base_port, side_channel_host, wants_remote_decode,
                                       wants_remote_prefill)
from wideep.kv_transfer.peers import PeerAllowlist, PeerNotAllowed, check_peer, kv_peer_allowlist_from_env
from wideep.kv_transfer.protocol import KVHandshakeError, KVTransferError
from wideep.kv_transfer.transport import BlockServer, KVTransport, TcpTransport

log = logging.getLogger("wideep.kv_transfer")



def model_fingerprint(model: str) -> str:
    """Identifies the weights, not the path: P and D may mount the same checkpoint at different paths."""
    cfg = os.path.join(model, "config.json")
    if not os.path.isfile(cfg):
        return model
    h = hashlib.sha256()
    with open(cfg) as f:
        conf = json.load(f)
    conf.pop("_name_or_path", None)
    h.update(json.dumps(conf, sort_keys=True).encode())
    for name in sorted(os.listdir(model)):
        if name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(os.path.join(model, name))}".encode())
    return f"{conf.get('model_type', 'model')}-{h.hexdigest()[:16]}"


@dataclass
class _Held:
    block_ids: list[int]
    deadline: float
    readers: int = 0     # reads in flight: the timeout must not free blocks while they are being sent


@dataclass
class _Load:
    """One consumer pull: local blocks to fill from the producer's blocks."""
    request: Any
    remote: RemotePrefillParams | None
    local_block_ids: list[int]
    remote_block_ids: list[int]
    num_local_tokens: int           # computed before the pull (local prefix-cache hit)
    error: str | None = None        # set up front when the params are unusable


class KVConnector(KVConnectorBase):
    def __init__(self, cfg: KVTransferConfig, *, model: str, block_size: int, dp_rank: int = 0,
                 tp_size: int = 1, transport: KVTransport | None = None, host: str | None = None,
                 port: int | None = None, listen_host: str = "0.0.0.0", timeout_s: float | None = None,
                 transfer_timeout_s: float = 60.0, handshake_timeout_s: float = 5.0,
                 peers: PeerAllowlist | None = None):
        self.cfg = cfg
        self.model = model_fingerprint(model)
        self.block_size = block_size
        self.dp_rank = dp_rank
        self.tp_size = tp_size
        self.engine_id = engine_id_for_rank(cfg.engine_id or str(uuid.uuid4()), dp_rank)
        self.host = host or side_channel_host()
        self.port = port if port is not None else side_channel_base_port() + dp_rank * tp_size
        self.listen_host = listen_host
        self.timeout_s = abort_timeout_s() if timeout_s is None else timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.transport: KVTransport = transport or TcpTransport()
        self.peers = peers   # producers this consumer may dial (None: any); checked before every connection
        self.use_nixl = transport is None and self._wants_nixl(cfg)
        self.nixl: nixl_mod.NixlTransport | None = None
        self.caches: PagedKVCaches | None = None
        self.server: BlockServer | None = None
        self._lock = threading.Lock()
        # producer
        self._held: dict[str, _Held] = {}
        self._to_free: set[str] = set()
        # consumer
        # Pulls to different producers (and to one) run side by side: a stalled producer holds a worker
        # for its own requests only, bounded by the transport's I/O timeout.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-pull") if cfg.is_consumer else None
        self._loading: set[str] = set()
        self._loaded: set[str] = set()
        self._fallback: dict[str, tuple[Any, int]] = {}   # id → (request, tokens to resume from) after a failed pull
        self._failed: dict[str, str] = {}      # request id → error (policy fail)
        self._handshaken: set[tuple[str, int, str]] = set()
        # A finished pull writes a byte here, so an engine loop waiting on input wakes at once (it drains
        # the pipe in finished_loading); a timer would add up to its period to the request's TTFT.
        self._wake_r, self._wake_w = os.pipe() if cfg.is_consumer else (-1, -1)
        if cfg.is_consumer:
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        self.stats = {"blocks_sent": 0, "bytes_sent": 0, "blocks_received": 0, "bytes_received": 0,
                      "loads_failed": 0, "held_expired": 0}

    # ---------------------------------------------------------------- setup
    @staticmethod
    def _wants_nixl(cfg: KVTransferConfig) -> bool:
        if cfg.transport == "tcp":
            return False
        if nixl_mod.nixl_available():
            return True
        if cfg.transport == "nixl":
            raise RuntimeError("kv_connector_extra_config.transport=nixl but NIXL is not importable "
                               "(pip install 'wideep[nixl]')")
        nixl_mod.warn_fallback_once(cfg.cross_layers_blocks)
        return False

    @property
    def _serving(self) -> bool:
        return self.server is not None or (self.nixl is not None and self.cfg.is_producer)

    @property
    def transport_name(self) -> str:
        return "nixl" if self.use_nixl else "tcp"

    def wants_cross_layer_kv(self) -> bool:
        return self.use_nixl and self.cfg.cross_layers_blocks

    def register_kv_caches(self, caches: list[torch.Tensor]) -> None:
        """Called once the runner has allocated its paged cache; starts the side channel (producer)."""
        self.caches = PagedKVCaches(caches)
        if self.use_nixl and self.nixl is None:
            self._start_nixl(caches)
            return
        if self.cfg.is_producer and self.server is None:
            self.server = BlockServer(self, self.listen_host, self.port)
            self.port = self.server.port
            log.info("kv_transfer: %s (%s) serving KV on %s:%d", self.engine_id, self.cfg.kv_role, self.host, self.port)

    def _start_nixl(self, caches: list[torch.Tensor]) -> None:
        """Registers the cache with a NIXL agent (VRAM on GPU, DRAM on CPU): cross-layer, the block-major
        backing tensor as one region whose block is all layers' bytes; else every layer's cache whole."""
        assert self.caches is not None
        nb = caches[0].shape[0]
        # (one layer: both layouts are the same bytes, and both peers detect it alike)
        if len(caches) > 1 and self.cfg.cross_layers_blocks != self.caches.block_major:
            raise ValueError(
                "kv_connector_extra_config.enable_cross_layers_blocks is "
                f"{str(self.cfg.cross_layers_blocks).lower()} but the KV caches are "
                + ("per-layer tensors" if self.cfg.cross_layers_blocks else "views of one block-major tensor")
                + " (allocate them with engine.kv_cache.allocate_kv_caches(cross_layer=wants_cross_layer_kv()))")
        if self.caches.block_major:
            per_block = sum(c[0].numel() * c.element_size() for c in caches)
            regions = [nixl_mod.Region(caches[0].data_ptr(), nb * per_block, per_block)]
        else:
            for i, c in enumerate(caches):
                if not c.is_contiguous():
                    raise ValueError(f"KV cache region {i} is not contiguous; NIXL needs one address range per region")
            regions = [nixl_mod.Region(c.data_ptr(), c.numel() * c.element_size(), c.numel() * c.element_size() // nb)
                       for c in caches]
        dev = caches[0].device
        self.nixl = nixl_mod.NixlTransport(
            engine_id=self.engine_id, regions=regions, num_blocks=nb, block_size=self.block_size,
            device_id=max(dev.index or 0, 0) if dev.type == "cuda" else 0,
            mem_type="VRAM" if dev.type == "cuda" else "DRAM",
            compat_hash=nixl_mod.compatibility_hash(self.model, self.caches.layout(), self.caches.block_major),
            num_layers=len(caches),
            enforce_compat=self.cfg.enforce_handshake_compat, tp_size=self.tp_size, num_threads=self.cfg.nixl_threads,
            # a spinning progress thread: for a producer on a GPU server (its reads finish sooner), not on
            # a CPU host (it would take a core) and not for a consumer (its reader polls; posting slows)
            progress_thread=dev.type == "cuda" and self.cfg.is_producer,
            transfer_timeout_s=self.transfer_timeout_s, handshake_timeout_s=self.handshake_timeout_s)
        if self.cfg.is_producer:
            self.port = self.nixl.serve(self.listen_host, self.port)
            log.info("kv_transfer: %s (%s) serving KV over NIXL, side channel %s:%d", self.engine_id,
                     self.cfg.kv_role, self.host, self.port)

    def metadata(self) -> dict[str, Any]:
        assert self.caches is not None
        return {"engine_id": self.engine_id, "model": self.model, "block_size": self.block_size,
                "layout": self.caches.layout()}

    def shutdown(self) -> None:
        if self.server:
            self.server.close()
            self.server = None
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        self.transport.close()
        if self.nixl is not None:
            self.nixl.close()
            self.nixl = None

    # ---------------------------------------------------------------- producer (BlockSource)
    def read(self, engine_id: str, request_id: str, block_ids: list[int]) -> tuple[list[int], Iterator[memoryview]]:
        if engine_id != self.engine_id:
            raise KVTransferError(f"engine id {engine_id!r} is not this producer ({self.engine_id!r}); "
                                  "the prefill server restarted since the prefill?")
        with self._lock:
            held = self._held.get(request_id)
        if held is None:
            raise KVTransferError(f"no KV held for request {request_id!r} (unknown, already read or expired)")
        stray = set(block_ids) - set(held.block_ids)
        if stray:
            raise KVTransferError(f"blocks {sorted(stray)[:8]} do not belong to request {request_id!r}")
        assert self.caches is not None
        sizes = self.caches.region_nbytes(len(block_ids))
        return sizes, self._stream_blocks(request_id, block_ids)

    def _stream_blocks(self, request_id: str, block_ids: list[int]) -> Iterator[memoryview]:
        with self._lock:
            held = self._held.get(request_id)
            if held is None:   # expired between the request and the send: drop the connection
                raise ConnectionError(f"KV of {request_id!r} expired while being read")
            held.readers += 1
        try:
            yield from self.caches.gather(block_ids)
            with self._lock:
                self.stats["blocks_sent"] += len(block_ids)
                self.stats["bytes_sent"] += sum(self.caches.region_nbytes(len(block_ids)))
        finally:
            with self._lock:
                held.readers -= 1

    def release(self, engine_id: str, request_id: str, after_read: bool) -> None:
        if engine_id != self.engine_id:
            raise KVTransferError(f"engine id {engine_id!r} is not this producer ({self.engine_id!r})")
        with self._lock:
            if self._held.pop(request_id, None) is not None:
                self._to_free.add(request_id)

    def request_finished(self, request) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        with self._lock:
            if rid in self._loading:
                # Aborted while its KV is still arriving: the worker owns the blocks until it is done.
                self._loading.discard(rid)
                self._held[rid] = _Held([], float("inf"))   # freed by the worker via _to_free
                return True, None
            self._loaded.discard(rid)
            self._fallback.pop(rid, None)
            self._failed.pop(rid, None)
        if (self.cfg.is_consumer and wants_remote_prefill(request.kv_transfer_params)
                and not request.kv_remote_done):
            # Aborted before its pull started: tell the producer now instead of letting it wait the timeout.
            request.kv_remote_done = True
            self._release_async(request)
            return False, None
        if not (self.cfg.is_producer and wants_remote_decode(request.kv_transfer_params)):
            return False, None
        if request.finish_reason not in ("length", "stop") or not request.block_ids or not self._serving:
            return False, None
        with self._lock:
            if rid in self._held:
                log.warning("kv_transfer: request id %r is still held from an earlier request; not holding "
                            "this one (use unique request ids)", rid)
                return False, None
            self._held[rid] = _Held(list(request.block_ids), time.monotonic() + self.timeout_s)
        params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(request.block_ids),
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": self.tp_size,
        }
        return True, params

    def finished_sending(self) -> set[str]:
        if self.nixl is not None and self.cfg.is_producer:
            for rid in self.nixl.take_notifications():
                with self._lock:
                    if self._held.pop(rid, None) is not None:
                        self._to_free.add(rid)
                        continue
                log.error("kv_transfer: a consumer read or released the KV of %r, which is not held "
                          "(expired after %.0f s?); its blocks may have been reused", rid, self.timeout_s)
        now = time.monotonic()
        with self._lock:
            for rid, h in list(self._held.items()):
                if h.deadline <= now and h.readers == 0:
                    log.warning("kv_transfer: nobody read the KV of %s within %.0f s; freeing its %d blocks",
                                rid, self.timeout_s, len(h.block_ids))
                    del self._held[rid]
                    self._to_free.add(rid)
                    self.stats["held_expired"] += 1
            done, self._to_free = self._to_free, set()
        return done

    def transfer_stats(self) -> dict[str, Any]:
        """What the engine's metrics export: {} on the TCP path, the NIXL counters/histograms otherwise."""
        return self.nixl.snapshot() if self.nixl is not None else {}

    @property
    def num_held(self) -> int:
        with self._lock:
            return len(self._held)

    # ---------------------------------------------------------------- consumer
    def get_num_remote_tokens(self, request, num_local_tokens: int) -> tuple[int, bool]:
        if (not self.cfg.is_consumer or not wants_remote_prefill(request.kv_transfer_params)
                or request.kv_remote_done):
            return 0, False
        # The last prompt token is always computed here: its logits give the first output token.
        n = request.num_prompt_tokens - 1 - num_local_tokens
        if n <= 0:
            request.kv_remote_done = True
            self._release_async(request)   # nothing to read: let the producer free now, not at timeout
            return 0, False
        return n, True

    def on_blocks_allocated(self, request, num_remote_tokens: int) -> None:
        request.kv_remote_done = True
        bs = self.block_size
        first = request.num_computed_tokens // bs
        last = -(-(request.num_computed_tokens + num_remote_tokens) // bs)
        load = _Load(request, None, list(request.block_ids[first:last]), [], request.num_computed_tokens)
        try:
            load.remote = RemotePrefillParams.parse(request.kv_transfer_params)
            if len(load.remote.remote_block_ids) < last:
                raise ValueError(f"producer returned {len(load.remote.remote_block_ids)} blocks, "
                                 f"the prompt needs {last}")
            load.remote_block_ids = load.remote.remote_block_ids[first:last]
        except ValueError as exc:
            load.error = str(exc)
        with self._lock:
            self._loading.add(request.request_id)
        assert self._pool is not None
        self._pool.submit(self._pull, load)

    def wakeup_fd(self) -> int | None:
        return self._wake_r if self._wake_r >= 0 else None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):   # full: a wakeup is already pending; closed: shutting down
            pass

    def _pull(self, load: _Load) -> None:
        try:
            self._finish_pull(load)
        finally:
            self._wake()

    def _finish_pull(self, load: _Load) -> None:
        rid = load.request.request_id
        error = load.error
        misconfigured = False   # a handshake mismatch fails the request whatever the policy: recomputing
        if error is None:       # would hide a broken deployment (P/D silently running decode-only)
            try:
                self._read_blocks(load)
            except (KVHandshakeError, PeerNotAllowed) as exc:
                error, misconfigured = str(exc), True
            except (KVTransferError, ValueError, RuntimeError) as exc:
                error = f"KV read from {load.remote.remote_host}:{load.remote.remote_port} failed: {exc}"
            except Exception as exc:  # never leave a request parked forever
                log.exception("kv_transfer: unexpected error pulling KV of %s", rid)
                error = f"KV read failed: {type(exc).__name__}: {exc}"
        if error is not None and load.remote is not None and self._pool is not None:
            # Not inline: a silent producer would stall this pull twice. NIXL: only a producer still
            # known gets told (re-handshaking a dead one would delay the fallback).
            self._pool.submit(self._release_quietly, load.remote, False)
        with self._lock:
            if rid not in self._loading:   # aborted meanwhile: hand the blocks back
                self._held.pop(rid, None)
                self._to_free.add(rid)
                return
            self._loading.discard(rid)
            if error is None:
                self._loaded.add(rid)
                return
            self.stats["loads_failed"] += 1
            if self.cfg.kv_load_failure_policy == "recompute" and not misconfigured:
                log.warning("kv_transfer: %s; recomputing the prompt of %s locally", error, rid)
                self._fallback[rid] = (load.request, load.num_local_tokens)
                self._loaded.add(rid)
            else:
                log.error("kv_transfer: %s; failing %s (kv_load_failure_policy=fail)", error, rid)
                self._failed[rid] = error

    def _read_blocks(self, load: _Load) -> None:
        r = load.remote
        assert r is not None and self.caches is not None
        check_peer(self.peers, r.remote_host, r.remote_port)
        if self.nixl is not None:
            nbytes = self.nixl.read(r.remote_host, r.remote_port, r.remote_engine_id, r.remote_request_id,
                                    load.local_block_ids, load.remote_block_ids)
            with self._lock:
                self.stats["blocks_received"] += len(load.local_block_ids)
                self.stats["bytes_received"] += nbytes
            return
        key = (r.remote_host, r.remote_port, r.remote_engine_id)
        if key not in self._handshaken:
            self.transport.handshake(r.remote_host, r.remote_port, self.metadata())
            self._handshaken.add(key)
        scatter = self.caches.scatterer(load.local_block_ids)
        try:
            nbytes = self.transport.read_into(r.remote_host, r.remote_port, r.remote_engine_id,
                                              r.remote_request_id, load.remote_block_ids, scatter.buffers(),
                                              release=True, on_region=scatter.region)
        finally:
            scatter.finish()   # no copy may still be in flight into blocks the scheduler might free
        with self._lock:
            self.stats["blocks_received"] += len(load.local_block_ids)
            self.stats["bytes_received"] += nbytes

    def _release_quietly(self, r: RemotePrefillParams, handshake: bool = True) -> None:
        try:
            check_peer(self.peers, r.remote_host, r.remote_port)
            if self.nixl is not None:
                if handshake or self.nixl.knows(r.remote_engine_id):
                    self.nixl.notify(r.remote_host, r.remote_port, r.remote_engine_id, r.remote_request_id)
                return
            self.transport.release(r.remote_host, r.remote_port, r.remote_engine_id, r.remote_request_id)
        except Exception:  # noqa: BLE001 - e.g. UnicodeError for a bad host: it must not kill the pull's cleanup
            pass   # the producer's timeout frees the blocks

    def _release_async(self, request) -> None:
        try:
            r = RemotePrefillParams.parse(request.kv_transfer_params)
        except ValueError:
            return
        if self._pool is not None:
            self._pool.submit(self._release_quietly, r)

    def finished_loading(self) -> set[str]:
        if self._wake_r >= 0:   # drained before the sets are read: a pull finishing after this wakes again
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        with self._lock:
            done, self._loaded = self._loaded, set()
            fallback, self._fallback = self._fallback, {}
        for req, n in fallback.values():
            # The scheduler resumes from num_remote_tokens_total; point it back at the local prefix.
            req.num_remote_tokens_total = n
            req.num_cached_tokens = n
        return done

    def failed_loading(self) -> dict[str, str]:
        """Requests whose pull failed under kv_load_failure_policy=fail: the scheduler fails them."""
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed


def make_connector(args) -> KVConnector:
    """The connector an EngineCore builds from EngineArgs.kv_transfer_config (`--kv-transfer-config`)."""
    cfg = KVTransferConfig.from_dict(args.kv_transfer_config)
    assert cfg is not None
    advertised = side_channel_host()
    explicit = envs.WIDEEP_KV_SIDE_CHANNEL_HOST or envs.VLLM_NIXL_SIDE_CHANNEL_HOST
    listen = envs.WIDEEP_KV_SIDE_CHANNEL_LISTEN_HOST or ("0.0.0.0" if explicit else "127.0.0.1")
    return KVConnector(cfg, model=args.model, block_size=args.block_size, dp_rank=args.data_parallel_rank,
                       host=advertised, listen_host=listen, peers=kv_peer_allowlist_from_env())
