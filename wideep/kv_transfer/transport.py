"""KV block transport: the producer's block server and the consumer's block client (TCP).

The engine-facing side is two small interfaces, so NIXL/UCX (RDMA reads) or NCCL (send/recv
between ranks) can replace TCP without touching the connector:

  BlockSource (producer): metadata(), read(engine_id, request_id, block_ids) -> region byte views,
                          release(engine_id, request_id, after_read)
  KVTransport (consumer): handshake(host, port, mine) -> theirs; read_into(host, port, engine_id,
                          request_id, block_ids, buffers); release(host, port, engine_id, request_id)

Everything here is torch-free; tensors are seen as flat byte buffers (memoryviews).
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Any, Callable, Iterable, Protocol

from wideep.kv_transfer.protocol import (PROTOCOL_VERSION, KVHandshakeError, KVTransferError, layout_mismatch,
                                         recv_header, recv_into_exact, send_frame)

log = logging.getLogger("wideep.kv_transfer")


class BlockSource(Protocol):
    def metadata(self) -> dict[str, Any]:
        """{"engine_id", "model", "block_size", "layout"}"""
        ...

    def read(self, engine_id: str, request_id: str, block_ids: list[int]) -> tuple[list[int], Iterable[memoryview]]:
        """(bytes of each region, the regions' bytes in turn with the blocks in order); raises
        KVTransferError before anything is sent. The iterable may produce lazily (pipelined copies)."""
        ...

    def release(self, engine_id: str, request_id: str, after_read: bool) -> None:
        """The consumer is done with (or gives up on) the request's blocks: free them."""
        ...


class KVTransport(Protocol):
    def handshake(self, host: str, port: int, mine: dict[str, Any]) -> dict[str, Any]: ...

    def read_into(self, host: str, port: int, engine_id: str, request_id: str, block_ids: list[int],
                  buffers: list[memoryview], release: bool = True,
                  on_region: Callable[[int], None] | None = None) -> int:
        """Fills buffers[i] with region i (on_region(i) right after, to overlap the next receive)."""
        ...

    def release(self, host: str, port: int, engine_id: str, request_id: str) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------- server
class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        source: BlockSource = self.server.source  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns: set = self.server.conns  # type: ignore[attr-defined]
        conns.add(sock)
        try:
            self._serve(sock, source)
        finally:
            conns.discard(sock)

    def _serve(self, sock: socket.socket, source: BlockSource) -> None:
        while True:
            try:
                msg = recv_header(sock)
            except (ConnectionError, OSError):
                return
            if msg is None:
                return
            try:
                self._serve_one(sock, source, msg)
            except (ConnectionError, OSError):
                return

    @staticmethod
    def _serve_one(sock: socket.socket, source: BlockSource, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "hello":
                send_frame(sock, {"ok": True, "version": PROTOCOL_VERSION, **source.metadata()})
            elif op == "read":
                sizes, views = source.read(str(msg.get("engine_id")), str(msg.get("request_id")),
                                           [int(b) for b in msg.get("block_ids") or []])
                send_frame(sock, {"ok": True, "nbytes": sum(sizes), "region_nbytes": sizes})
                for size, view in zip(sizes, views):
                    if view.nbytes != size:   # cannot happen unless the cache changed shape: drop the line
                        raise ConnectionError(f"region of {view.nbytes} bytes, announced {size}")
                    sock.sendall(view)
                if msg.get("release", True):
                    source.release(str(msg.get("engine_id")), str(msg.get("request_id")), after_read=True)
            elif op == "release":
                source.release(str(msg.get("engine_id")), str(msg.get("request_id")), after_read=False)
                send_frame(sock, {"ok": True})
            else:
                send_frame(sock, {"ok": False, "error": f"unknown op {op!r}"})
        except KVTransferError as exc:
            send_frame(sock, {"ok": False, "error": str(exc)})


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class BlockServer:
    """Serves a BlockSource on host:port from background threads (one per consumer connection)."""

    def __init__(self, source: BlockSource, host: str, port: int):
        self.source = source
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"cannot listen on KV side channel {host}:{port} ({exc}); set "
                          "VLLM_NIXL_SIDE_CHANNEL_PORT / WIDEEP_KV_SIDE_CHANNEL_PORT to a free base port") from exc
        self._server.source = source  # type: ignore[attr-defined]
        self._server.conns = set()    # type: ignore[attr-defined]   # consumer connections being served
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"kv-side-channel-{self.port}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops listening and drops every consumer connection (as the process exiting would)."""
        self._server.shutdown()
        self._server.server_close()
        for sock in list(self._server.conns):  # type: ignore[attr-defined]
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------- client
class TcpTransport:
    """Consumer side: a few idle connections per producer, one per call in flight.

    Calls to one producer run side by side, so a producer that stops answering stalls only the
    calls made to it, each for at most io_timeout_s of silence. A kept connection the producer has
    closed since (it restarted) fails on reuse before any reply arrived: it is replaced by a fresh
    one and the call retried once, so a restart costs no request."""

    def __init__(self, connect_timeout_s: float = 5.0, io_timeout_s: float = 15.0, max_idle: int = 4):
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self.reconnects = 0   # stale kept connections replaced (a test and the log can read it)

    def _take(self, host: str, port: int) -> tuple[socket.socket, bool]:
        """(a connection, whether it is a kept one); dials when none is idle."""
        with self._lock:
            idle = self._idle.get((host, port))
            if idle:
                return idle.pop(), True
        try:
            s = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as exc:
            raise KVTransferError(f"cannot reach KV side channel {host}:{port}: {exc}") from exc
        s.settimeout(self.io_timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s, False

    def _give(self, host: str, port: int, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < self.max_idle:
                idle.append(sock)
                return
        _close(sock)

    def _call(self, host: str, port: int, msg: dict[str, Any], buffers: list[memoryview] | None = None,
              on_region: Callable[[int], None] | None = None) -> dict[str, Any]:
        for attempt in (0, 1):
            sock, kept = self._take(host, port)
            replied = False
            try:
                send_frame(sock, msg)
                reply = recv_header(sock)
                if reply is None:
                    raise ConnectionError("producer closed the side channel")
                replied = True
                if reply.get("ok") and reply.get("nbytes"):
                    sizes = reply.get("region_nbytes") or []
                    want = [b.nbytes for b in buffers or []]
                    if sizes != want:
                        # Drain so the connection stays in sync, then refuse.
                        recv_into_exact(sock, memoryview(bytearray(reply["nbytes"])))
                        self._give(host, port, sock)
                        raise KVTransferError(f"producer sent regions of {sizes} bytes, expected {want}")
                    for i, b in enumerate(buffers or []):
                        recv_into_exact(sock, b.cast("B"))
                        if on_region is not None:
                            on_region(i)
            except KVTransferError:
                raise
            except (ConnectionError, OSError) as exc:
                _close(sock)
                # Retry only what cannot have been served: a kept connection that failed before any
                # reply (not a timeout: a silent producer gets no second wait).
                if kept and not replied and attempt == 0 and not isinstance(exc, TimeoutError):
                    self.reconnects += 1
                    log.info("kv_transfer: kept connection to %s:%d was stale (%s); reconnecting", host, port, exc)
                    continue
                raise KVTransferError(f"KV side channel {host}:{port} failed: {exc}") from exc
            self._give(host, port, sock)
            if not reply.get("ok"):
                raise KVTransferError(f"producer {host}:{port} refused {msg['op']}: {reply.get('error')}")
            return reply
        raise AssertionError("unreachable")

    def handshake(self, host: str, port: int, mine: dict[str, Any]) -> dict[str, Any]:
        theirs = self._call(host, port, {"op": "hello", "version": PROTOCOL_VERSION, **mine})
        why = layout_mismatch(mine, theirs)
        if why:
            raise KVHandshakeError(f"P/D handshake with {host}:{port} failed: {why}")
        return theirs

    def read_into(self, host: str, port: int, engine_id: str, request_id: str, block_ids: list[int],
                  buffers: list[memoryview], release: bool = True,
                  on_region: Callable[[int], None] | None = None) -> int:
        reply = self._call(host, port, {"op": "read", "engine_id": engine_id, "request_id": request_id,
                                        "block_ids": list(block_ids), "release": release}, buffers, on_region)
        return int(reply.get("nbytes") or 0)

    def release(self, host: str, port: int, engine_id: str, request_id: str) -> None:
        self._call(host, port, {"op": "release", "engine_id": engine_id, "request_id": request_id})

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for s in socks:
                _close(s)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
