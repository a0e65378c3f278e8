"""Side-channel wire format between a consumer (decode) and a producer (prefill) engine rank.

One TCP connection per (consumer rank, producer rank), reused. Every message is a frame:

    [4-byte big-endian header length][msgpack header][payload: header["nbytes"] raw bytes, if any]

Requests (consumer → producer) and replies:

  {"op": "hello", "version": 1, "engine_id", "model", "block_size", "layout"}
      → {"ok": true, "version", "engine_id", "model", "block_size", "layout"}
        The consumer compares model / block_size / layout (incl. the cache dtype, fp8 or not) and refuses a
        mismatch (KVHandshakeError).
  {"op": "read", "engine_id": <producer id from remote_engine_id>, "request_id": <remote_request_id>,
   "block_ids": [...], "release": true}
      → {"ok": true, "nbytes": N, "region_nbytes": [n_0, ...]} + N bytes: region (layer cache) 0's
        blocks in the requested order, then region 1's, ... (each block = one row of dim 0, C order).
        With release the producer frees the request's blocks once the bytes are on the wire.
  {"op": "release", "engine_id", "request_id"}   (consumer will not read: abort / local recompute)
      → {"ok": true}
  Any failure → {"ok": false, "error": "<why>"} (the connection stays usable).

`layout` = [{"shape": [block_size, ...per-block dims], "dtype": "float32"}, ...], one per region.
"""
from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from wideep.errors import WideepError

PROTOCOL_VERSION = 1
_LEN = struct.Struct(">I")
MAX_HEADER = 64 * 1024 * 1024


class KVTransferError(WideepError, RuntimeError):
    """A KV read failed (producer gone, request unknown or expired, connection broken)."""


class KVHandshakeError(KVTransferError):
    """Producer and consumer disagree on model, block size or cache layout: P/D cannot work."""


def send_frame(sock: socket.socket, header: dict[str, Any], payload: list[memoryview] | None = None) -> None:
    head = msgpack.packb(header, use_bin_type=True)
    sock.sendall(_LEN.pack(len(head)) + head)
    for part in payload or ():
        sock.sendall(part)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("side channel closed mid-frame")
        got += k


def recv_header(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame's header, or None on a clean close between frames."""
    first = sock.recv(_LEN.size, socket.MSG_WAITALL)
    if not first:
        return None
    if len(first) < _LEN.size:
        first += recv_exact(sock, _LEN.size - len(first))
    (n,) = _LEN.unpack(first)
    if n > MAX_HEADER:
        raise ConnectionError(f"side-channel header of {n} bytes is too large")
    return msgpack.unpackb(recv_exact(sock, n), raw=False)


def layout_mismatch(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """Why two engines' KV caches are incompatible, or None."""
    if theirs.get("version") != PROTOCOL_VERSION:
        return f"side-channel protocol version {theirs.get('version')} != {PROTOCOL_VERSION}"
    if mine["model"] != theirs.get("model"):
        return f"model {theirs.get('model')!r} on the producer != {mine['model']!r} here"
    if mine["block_size"] != theirs.get("block_size"):
        return (f"block size {theirs.get('block_size')} on the producer != {mine['block_size']} here "
                "(start both roles with the same --block-size)")
    ml, tl = mine["layout"], theirs.get("layout") or []
    if ml and tl and ml[0].get("dtype") != tl[0].get("dtype"):
        return (f"KV cache dtype {tl[0].get('dtype')} on the producer != {ml[0].get('dtype')} here: the blocks "
                "cannot be copied between them (start both roles with the same --kv-cache-dtype and --dtype)")
    if len(ml) != len(tl):
        return f"{len(tl)} KV cache regions (layers) on the producer != {len(ml)} here"
    for i, (a, b) in enumerate(zip(ml, tl)):
        if list(a["shape"]) != list(b["shape"]) or a["dtype"] != b["dtype"]:
            return f"KV cache region {i}: producer {b['shape']} {b['dtype']} != {a['shape']} {a['dtype']} here"
    return None
