"""Faults around the KV side channel: a producer restart behind a kept connection, producers outside
the pool (SSRF through kv_transfer_params), a producer that accepts and never answers (tarpit)."""
from __future__ import annotations

import socket
import threading

import pytest
from test_connector import ToyEngine, pd_run

from wideep.kv_transfer.peers import PeerAllowlist, PeerNotAllowed, check_kv_transfer_params, check_peer
from wideep.kv_transfer.transport import TcpTransport
from wideep.utils.net import free_port


class Listener:
    """A TCP listener that counts connections; silent ones hold them open without a byte (a tarpit)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(c)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def test_allowlist_entries():
    a = PeerAllowlist.parse("10.0.0.7:5600-5603, 10.0.0.8, 192.168.0.0/16, [::1]:7000")
    assert a.allows("10.0.0.7", 5600) and a.allows("10.0.0.7", 5603) and not a.allows("10.0.0.7", 5604)
    assert a.allows("10.0.0.8", 1) and a.allows("192.168.44.1", 22) and a.allows("::1", 7000)
    assert not a.allows("127.0.0.1", 5600) and not a.allows("localhost", 5600) and not a.allows("::1", 7001)
    with pytest.raises(PeerNotAllowed, match="127.0.0.1:5600.*not a member"):
        check_peer(a, "127.0.0.1", 5600)
    with pytest.raises(PeerNotAllowed):
        check_peer(PeerAllowlist.parse(""), "10.0.0.8", 1)           # set but empty: nothing
    check_peer(None, "anything", 1)                                     # unset: no restriction
    check_kv_transfer_params({"do_remote_decode": True, "remote_host": None, "remote_port": None}, a)
    with pytest.raises(PeerNotAllowed):
        check_kv_transfer_params({"remote_host": "127.0.0.1", "remote_port": "5600"}, a)
    with pytest.raises(ValueError, match="port must be"):
        PeerAllowlist.parse("10.0.0.1:http")


def test_producer_restart_costs_no_request():
    """The consumer keeps a connection per producer; after the producer restarts on the same port
    the kept one is dead: it is replaced and the pull retried, so no request fails."""
    port = free_port()
    p = ToyEngine("kv_producer", port=port)
    d = ToyEngine("kv_consumer", policy="fail")
    try:
        pd_run(p, d, [(i * 3 + 1) % 97 for i in range(9)], 3)
        p.settle()
        d.settle()
        p.close()
        p = ToyEngine("kv_producer", port=port)   # same address, its connections gone
        for k in range(5):   # distinct prompts: every one is pulled (none is in decode's prefix cache)
            _, final, _, _ = pd_run(p, d, [(i * 5 + k) % 97 for i in range(9)], 3)
            assert final.finish_reason == "length"
        assert d.conn.stats["loads_failed"] == 0 and d.conn.stats["blocks_received"] == 2 * 6
        assert d.conn.transport.reconnects >= 1
    finally:
        p.close()
        d.close()


@pytest.mark.parametrize("abort_first", [False, True])
def test_producer_outside_the_pool_is_never_dialled(abort_first):
    listener = Listener()
    d = ToyEngine("kv_consumer", policy="recompute", peers=PeerAllowlist.parse("127.0.0.1:1-2"))
    try:
        params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "x_dp0",
                  "remote_block_ids": [0, 1, 2], "remote_request_id": "r", "remote_host": "127.0.0.1",
                  "remote_port": listener.port, "tp_size": 1}
        rid = d.add(list(range(10)), 2, params)
        if abort_first:   # aborted before its pull: the release to the producer is refused too
            d.sched.abort(rid)
        else:
            _, final = d.run(rid)
            assert final.finish_reason == "error" and "not a member of this pool" in (final.error or "")
        d.settle()
        d.conn._pool.shutdown(wait=True)   # every submitted pull/release has run
        assert listener.accepted == 0
        assert d.used_blocks == 0
    finally:
        d.close()
        listener.close()


def test_a_silent_producer_stalls_only_its_own_request():
    tarpit = Listener()
    p = ToyEngine("kv_producer")
    d = ToyEngine("kv_consumer", policy="recompute")
    d.conn.transport = TcpTransport(io_timeout_s=3.0)
    try:
        stuck = d.add(list(range(10)), 2, {"do_remote_prefill": True, "do_remote_decode": False,
                                           "remote_engine_id": "t_dp0", "remote_block_ids": [0, 1, 2],
                                           "remote_request_id": "t", "remote_host": "127.0.0.1",
                                           "remote_port": tarpit.port, "tp_size": 1})
        d.step()
        assert stuck in d.sched.waiting_for_kv
        for k in range(3):   # normal P/D requests finish while the tarpit one is still waiting
            got, final, _, _ = pd_run(p, d, [(i + k) % 97 for i in range(9)], 2)
            assert final.finish_reason == "length"
        assert tarpit.accepted == 1 and stuck in d.sched.waiting_for_kv
        _, final = d.run(stuck, limit_s=60)   # its own I/O timeout ends it: recomputed locally
        assert final.finish_reason == "length"
        assert d.conn.stats["loads_failed"] == 1
    finally:
        p.close()
        d.close()
        tarpit.close()
