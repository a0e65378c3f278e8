"""The NIXL transport with the real library (nixl 1.5.1, UCX over loopback), the real Scheduler and
BlockManager, and the toy model of test_connector (sampling reads the cache, so a wrong byte changes
the tokens). Plus vLLM's side of the wire: the handshake reply decoded with msgspec into vLLM's
dataclasses, and a separate NIXL agent reading blocks at the addresses vLLM would compute.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import msgpack
import pytest
import torch

from wideep.engine.kv_cache import allocate_kv_caches
from wideep.kv_transfer import nixl as nixl_mod
from wideep.kv_transfer.params import KVTransferConfig
from wideep.utils.net import free_port

from test_connector import VOCAB, ToyEngine, pd_run

os.environ.setdefault("UCX_NET_DEVICES", "lo")   # loopback only: no lanes on the host's other addresses

pytestmark = pytest.mark.skipif(not nixl_mod.nixl_available(), reason="NIXL not installed (pip install 'wideep[nixl]')")


def nixl_engine(role, **kw) -> ToyEngine:
    return ToyEngine(role, transport="nixl", **kw)


@pytest.fixture(params=[True, False], ids=["cross-layer", "per-layer"])
def trio(request):
    cross = request.param
    engines = {"agg": ToyEngine(None), "p": nixl_engine("kv_producer", cross_layers=cross),
               "d": nixl_engine("kv_consumer", cross_layers=cross)}
    assert engines["p"].conn.nixl is not None and engines["d"].conn.nixl is not None
    # cross-layer: one registered region (the block-major backing tensor), else one per layer
    assert len(engines["d"].conn.nixl.regions) == (1 if cross else 2) and engines["p"].conn.caches.block_major == cross
    yield engines
    for e in engines.values():
        e.close()


def test_pd_over_nixl_equals_aggregated_short_and_long_prompts(trio):
    agg, p, d = trio["agg"], trio["p"], trio["d"]
    for plen in (1, 2, 4, 5, 9, 17, 30):
        prompt = [(i * 31 + plen) % VOCAB for i in range(plen)]
        want, _ = agg.run(agg.add(prompt, 6))
        got, dfinal, params, _ = pd_run(p, d, prompt, 6)
        assert got == want, plen
        if plen > 1:
            assert dfinal.num_cached_tokens == plen - 1
        p.settle()
        d.settle()
        assert p.used_blocks == 0 and d.used_blocks == 0 and p.conn.num_held == 0
    st = d.conn.nixl.stats
    assert st["transfers"] == 6 and st["num_failed_transfers"] == 0   # plen 1 reads nothing
    assert d.conn.stats["blocks_received"] == sum(-(-(n - 1) // 4) for n in (2, 4, 5, 9, 17, 30))


def _render_metrics(e: ToyEngine) -> bytes:
    from wideep.engine.api import EngineStats
    from wideep.server.metrics import FrontendMetrics
    m = FrontendMetrics("toy", 1)
    m.update_engine_stats(EngineStats.from_dict(EngineStats(kv_transfer=e.conn.transfer_stats()).to_dict()))
    return m.render()


def test_transfers_show_in_vllm_nixl_metrics(trio):
    p, d = trio["p"], trio["d"]
    pd_run(p, d, list(range(1, 10)), 2)
    text = _render_metrics(d).decode()
    assert 'vllm:nixl_xfer_time_seconds_count{engine="1",model_name="toy"} 1.0' in text
    assert 'vllm:nixl_bytes_transferred_sum{engine="1",model_name="toy"} 192.0' in text   # 2 blocks x 2 layers x 48 B
    assert 'vllm:nixl_num_descriptors_bucket{engine="1",le="10.0",model_name="toy"} 1.0' in text
    assert 'vllm:nixl_num_failed_transfers_total{engine="1",model_name="toy"} 0.0' in text
    tcp = ToyEngine("kv_consumer")
    assert b"vllm:nixl" not in _render_metrics(tcp)   # TCP: no NIXL series
    tcp.close()
    p.settle()


def test_partial_prefix_hit_reads_only_the_missing_tail(trio):
    agg, p, d = trio["agg"], trio["p"], trio["d"]
    prompt = [(i * 5 + 1) % VOCAB for i in range(14)]
    want, _ = agg.run(agg.add(prompt, 4))
    d.run(d.add(prompt[:9], 1))          # 2 full blocks of the prompt cached on the decode side
    got, _, _, _ = pd_run(p, d, prompt, 4)
    assert got == want
    assert d.conn.stats["blocks_received"] == 2
    p.settle()
    d.settle()
    assert p.used_blocks == 0 and p.conn.num_held == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_producer_unreachable_follows_policy_and_frees_blocks(policy):
    p, d, agg = nixl_engine("kv_producer"), nixl_engine("kv_consumer", policy=policy), ToyEngine(None)
    try:
        prompt = list(range(3, 14))
        want, _ = agg.run(agg.add(prompt, 5))
        _, final = p.run(p.add(prompt, 1, {"do_remote_decode": True}))
        params = dict(final.kv_transfer_params)
        p.close()                                    # the producer goes away before the read
        toks, dfinal = d.run(d.add(prompt, 5, params))
        if policy == "recompute":
            assert toks == want and dfinal.finish_reason == "length"
        else:
            assert toks == [] and dfinal.finish_reason == "error"
            assert "cannot reach NIXL side channel" in dfinal.error
        assert d.conn.stats["loads_failed"] == 1
        d.settle()
        assert d.used_blocks == 0
    finally:
        for e in (p, d, agg):
            e.close()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_producer_restart_between_handshake_and_read(policy):
    """Same engine id and port after the restart (a fixed engine_id): the consumer's cached agent and
    descriptors are stale; the read fails, goes through the policy, and the next request re-handshakes."""
    port = free_port()
    agg = ToyEngine(None)
    p = nixl_engine("kv_producer", engine_id="fixed", port=port)
    d = nixl_engine("kv_consumer", policy=policy)
    try:
        first = list(range(5, 15))
        assert pd_run(p, d, first, 3)[0] == agg.run(agg.add(first, 3))[0]   # handshake done, agent cached
        prompt = list(range(20, 33))
        want, _ = agg.run(agg.add(prompt, 4))
        _, final = p.run(p.add(prompt, 1, {"do_remote_decode": True}))
        params = dict(final.kv_transfer_params)
        p.close()
        p = nixl_engine("kv_producer", engine_id="fixed", port=port)     # restarted: new agent, empty cache
        toks, dfinal = d.run(d.add(prompt, 4, params))
        if policy == "recompute":
            assert toks == want
        else:
            assert dfinal.finish_reason == "error" and "NIXL READ" in dfinal.error
        assert d.conn.nixl.stats["num_failed_transfers"] == 1
        text = _render_metrics(d).decode()
        assert 'vllm:nixl_num_failed_transfers_total{engine="1",model_name="toy"} 1.0' in text
        d.settle()
        assert d.used_blocks == 0
        again = list(range(40, 52))
        assert pd_run(p, d, again, 3)[0] == agg.run(agg.add(again, 3))[0]
        p.settle()
        d.settle()
        assert p.used_blocks == 0 and d.used_blocks == 0
    finally:
        for e in (p, d, agg):
            e.close()


@pytest.mark.parametrize("mismatch", ["block_size", "model", "dim", "dtype", "layers", "per-layer reader",
                                      "cross-layer reader"])
def test_metadata_mismatch_is_a_clear_error_and_frees_both_sides(mismatch):
    kw = {"block_size": dict(block_size=8), "model": dict(model="other-model"), "dim": dict(dim=2),
          "dtype": dict(dtype=torch.float64), "layers": dict(layers=3), "per-layer reader": dict(cross_layers=False),
          "cross-layer reader": {}}[mismatch]
    p = nixl_engine("kv_producer", cross_layers=mismatch != "cross-layer reader")
    d = nixl_engine("kv_consumer", policy="recompute", **kw)
    try:
        _, final = p.run(p.add(list(range(10)), 1, {"do_remote_decode": True}))
        _, dfinal = d.run(d.add(list(range(10)), 3, final.kv_transfer_params))
        assert dfinal.finish_reason == "error" and "NIXL handshake" in dfinal.error
        assert {"block_size": "block size", "model": "compatibility hash", "dim": "region 0",
                "dtype": "region 0", "layers": "producer block of 96 bytes != 144 here (cross-layer: all 3 layers",
                "per-layer reader": "the producer registers one cross-layer region (blocks of 96 bytes holding "
                                    "every layer), this engine 2 per-layer regions: set kv_connector_extra_config."
                                    "enable_cross_layers_blocks the same on both roles",
                "cross-layer reader": "the producer registers 2 per-layer regions, this engine one cross-layer "
                                      "region"}[mismatch] in dfinal.error
        d.settle()
        p.settle()
        assert p.used_blocks == 0 and d.used_blocks == 0   # the refusal still notified the producer
    finally:
        p.close()
        d.close()


def test_layout_checks_hold_without_the_compatibility_hash():
    """enforce_handshake_compat=false (pairing with vLLM): region/block-length checks still refuse."""
    p = nixl_engine("kv_producer", cross_layers=False)
    d = ToyEngine(None, dim=2)
    from wideep.kv_transfer.connector import KVConnector
    cfg = KVTransferConfig(kv_role="kv_consumer", kv_connector_extra_config={"transport": "nixl",
                                                                             "enforce_handshake_compat": False,
                                                                             "enable_cross_layers_blocks": False})
    conn = KVConnector(cfg, model="toy", block_size=4, host="127.0.0.1", port=0, handshake_timeout_s=1.0)
    conn.register_kv_caches(d.caches)
    try:
        _, final = p.run(p.add(list(range(10)), 1, {"do_remote_decode": True}))
        prm = final.kv_transfer_params
        with pytest.raises(nixl_mod.KVHandshakeError, match="region 0: producer block of 48 bytes != 32 here"):
            conn.nixl.read("127.0.0.1", prm["remote_port"], prm["remote_engine_id"], prm["remote_request_id"],
                           [0, 1], prm["remote_block_ids"][:2])
    finally:
        conn.shutdown()
        p.close()
        d.close()


def test_abort_while_loading_and_before_the_pull_free_both_sides(trio):
    p, d = trio["p"], trio["d"]
    prompt = list(range(20))
    _, final = p.run(p.add(prompt, 1, {"do_remote_decode": True}))
    drid = d.add(prompt, 5, final.kv_transfer_params)
    d.sched.schedule()
    d.sched.abort(drid)
    _, final = p.run(p.add(list(range(12)), 1, {"do_remote_decode": True}))
    d.sched.abort(d.add(list(range(12)), 4, final.kv_transfer_params))   # never scheduled
    d.settle()
    p.settle()
    assert d.used_blocks == 0 and p.used_blocks == 0 and p.conn.stats["held_expired"] == 0


def test_unread_blocks_expire_on_the_producer():
    p = nixl_engine("kv_producer", timeout_s=0.2)
    try:
        _, final = p.run(p.add(list(range(10)), 1, {"do_remote_decode": True}))
        assert final.kv_transfer_params and p.used_blocks == 3
        time.sleep(0.3)
        p.settle()
        assert p.used_blocks == 0 and p.conn.stats["held_expired"] == 1
    finally:
        p.close()


# ------------------------------------------------------------------------------------ vLLM's view
# Written down from vLLM's nixl_connector.py (commit 002a1057): plain dataclasses that vLLM encodes and
# decodes with msgspec.msgpack. Cross-layer blocks (vLLM #33339, kv_connector_extra_config
# enable_cross_layers_blocks) add no field: the block-major tensor is registered like a layer's cache,
# so the same structure carries one base address and one block length (the whole per-block stride).
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


def _vllm_handshake(port: int) -> tuple[NixlHandshakePayload, NixlAgentMetadata]:
    msgspec = pytest.importorskip("msgspec")
    import zmq
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(msgspec.msgpack.encode((b"get_meta_msg", 0)))
        raw = sock.recv()
    finally:
        ctx.destroy(linger=0)
    payload = msgspec.msgpack.Decoder(NixlHandshakePayload).decode(raw)
    return payload, msgspec.msgpack.Decoder(NixlAgentMetadata).decode(payload.agent_metadata_bytes)


@pytest.mark.parametrize("cross", [True, False], ids=["cross-layer", "per-layer"])
def test_handshake_decodes_as_vllm_and_vllm_descriptors_address_the_right_bytes(cross):
    p = nixl_engine("kv_producer", layers=3, cross_layers=cross)
    reader = None
    try:
        prompt = list(range(1, 15))
        _, final = p.run(p.add(prompt, 1, {"do_remote_decode": True}))
        prm = final.kv_transfer_params
        assert set(prm) >= {"remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids",
                            "tp_size"}
        payload, meta = _vllm_handshake(prm["remote_port"])
        assert meta.engine_id == prm["remote_engine_id"] and meta.block_size == 4 and meta.num_blocks == 64
        if cross:   # vLLM's cross-layer registration: one region, its block = every layer's block (3 x 48 B)
            assert meta.block_lens == [3 * 4 * 3 * 4] and meta.kv_caches_base_addr == [p.caches[0].data_ptr()]
            regions = 1
        else:
            assert meta.block_lens == [4 * 3 * 4] * 3 and len(meta.kv_caches_base_addr) == 3
            regions = 3
        assert meta.kv_cache_layout == "NHD" and meta.device_id == 0 and len(payload.compatibility_hash) == 64

        # A vLLM-style reader: its own agent, remote descriptors exactly as vLLM's add_remote_agent
        # builds them, descriptor ids region * num_blocks + block id, notification "<id>:<tp>".
        from nixl._api import nixl_agent, nixl_agent_config
        reader = nixl_agent("vllm-reader", nixl_agent_config(backends=["UCX"]))
        name = reader.add_remote_agent(meta.agent_metadata)
        remote = [(base + b * meta.block_lens[i], meta.block_lens[i], meta.device_id)
                  for i, base in enumerate(meta.kv_caches_base_addr) for b in range(meta.num_blocks)]
        rdl = reader.prep_xfer_dlist(name, remote, "DRAM")
        blocks = prm["remote_block_ids"]
        local = torch.zeros(regions, len(blocks), meta.block_lens[0], dtype=torch.uint8)
        reader.register_memory([(local.data_ptr(), local.numel(), 0, "")], "DRAM")
        ldl = reader.prep_xfer_dlist("NIXL_INIT_AGENT", [(local.data_ptr() + (i * len(blocks) + j) * meta.block_lens[0],
                                                          meta.block_lens[0], 0)
                                                         for i in range(regions) for j in range(len(blocks))], "DRAM")
        rids = [i * meta.num_blocks + b for i in range(regions) for b in blocks]
        h = reader.make_prepped_xfer("READ", ldl, list(range(len(rids))), rdl, rids,
                                     notif_msg=f"{prm['remote_request_id']}:1".encode())
        state = reader.transfer(h)
        deadline = time.monotonic() + 20
        while state == "PROC" and time.monotonic() < deadline:
            state = reader.check_xfer_state(h)
        assert state == "DONE"
        if cross:   # block b = layer 0's rows of b, then layer 1's, then layer 2's
            want = torch.stack([c[blocks] for c in p.caches], dim=1).contiguous().view(torch.uint8)
            assert torch.equal(local[0], want.reshape(len(blocks), -1)) and want.any()
        for i, cache in enumerate(p.caches if not cross else []):
            want = cache[blocks].contiguous().view(torch.uint8).reshape(len(blocks), -1)
            assert torch.equal(local[i], want), f"region {i}"
            assert want.any()
        p.settle()              # the READ's notification frees the held blocks
        assert p.used_blocks == 0 and p.conn.stats["held_expired"] == 0
    finally:
        p.close()
        del reader


def test_side_channel_survives_garbage_and_answers_unknown_ranks_empty():
    import zmq
    p = nixl_engine("kv_producer")
    port = p.conn.port
    ctx = zmq.Context()
    try:
        for msg in (b"\xc1junk", msgpack.packb([b"get_meta_msg", 3]), msgpack.packb({"x": 1})):
            s = ctx.socket(zmq.REQ)
            s.setsockopt(zmq.RCVTIMEO, 5000)
            s.connect(f"tcp://127.0.0.1:{port}")
            s.send(msg)
            assert s.recv() == b""
            s.close(0)
        payload, meta = _vllm_handshake(port)
        assert meta.engine_id == p.conn.engine_id
    finally:
        ctx.destroy(linger=0)
        p.close()


def test_wire_encoding_matches_msgspec():
    msgspec = pytest.importorskip("msgspec")
    meta = nixl_mod.NixlAgentMetadata("e_dp0", b"\x00md", [1 << 40, 7], 1, 64, [73728, 73728], "NHD", 64)
    ours = nixl_mod.encode(meta)
    theirs = msgspec.msgpack.encode(NixlAgentMetadata(**vars(meta)))
    assert ours == theirs
    assert nixl_mod.decode(theirs, nixl_mod.NixlAgentMetadata) == meta
    with pytest.raises(nixl_mod.KVHandshakeError, match="block_lens"):
        nixl_mod.decode(msgpack.packb(dict(vars(meta), block_lens=["x"]), use_bin_type=True), nixl_mod.NixlAgentMetadata)


def test_transport_selection(monkeypatch, caplog):
    from wideep.kv_transfer.connector import KVConnector
    with pytest.raises(ValueError, match="transport"):
        KVTransferConfig(kv_connector_extra_config={"transport": "rdma"})
    assert KVConnector(KVTransferConfig(kv_role="kv_consumer"), model="m", block_size=4, port=0).use_nixl
    monkeypatch.setattr(nixl_mod, "nixl_available", lambda: False)
    monkeypatch.setattr(nixl_mod, "_warned", False)
    with pytest.raises(RuntimeError, match="not importable"):
        KVConnector(KVTransferConfig(kv_role="kv_consumer", kv_connector_extra_config={"transport": "nixl"}),
                    model="m", block_size=4, port=0)
    with caplog.at_level(logging.WARNING, logger="wideep.kv_transfer"):
        for _ in range(2):
            c = KVConnector(KVTransferConfig(kv_role="kv_consumer"), model="m", block_size=4, port=0)
            assert not c.use_nixl and c.transport_name == "tcp"
    assert sum("falls back to the TCP" in r.getMessage() for r in caplog.records) == 1


def test_cross_layer_knob_is_typed_and_must_match_the_caches():
    from wideep.errors import ConfigError
    from wideep.kv_transfer.connector import KVConnector
    mk = lambda v: KVTransferConfig(kv_role="kv_consumer",  # noqa: E731
                                    kv_connector_extra_config={"transport": "nixl", "enable_cross_layers_blocks": v})
    assert mk("True").cross_layers_blocks is True and mk("false").cross_layers_blocks is False   # vLLM's strings
    assert KVTransferConfig().cross_layers_blocks is False   # vLLM's default
    with pytest.raises(ConfigError, match="enable_cross_layers_blocks"):
        mk("yes")
    for flag in (True, False):   # caches in the other layout than the knob asks for: refused at registration
        conn = KVConnector(mk(flag), model="toy", block_size=4, host="127.0.0.1", port=0)
        try:
            assert conn.wants_cross_layer_kv() is flag
            caches = allocate_kv_caches(2, 8, 4, 3, torch.float32, torch.device("cpu"), cross_layer=not flag)
            with pytest.raises(ValueError, match="enable_cross_layers_blocks is " + str(flag).lower()):
                conn.register_kv_caches(caches)
        finally:
            conn.shutdown()
