"""KVConnector with the real Scheduler and BlockManager, real side-channel sockets, and a toy "model".

The toy model writes a value derived from (token, position, layer) into each computed slot and
samples the next token from the *cache contents* of all earlier positions, so a consumer whose
pulled KV is wrong (or misplaced) produces different tokens than the aggregated run.
"""
from __future__ import annotations

import time

import pytest
import torch

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.block_manager import BlockManager
from wideep.engine.kv_cache import allocate_kv_caches
from wideep.engine.request import Request
from wideep.engine.scheduler import Scheduler
from wideep.kv_transfer.connector import KVConnector
from wideep.kv_transfer.params import KVTransferConfig
from wideep.kv_transfer.protocol import KVTransferError
from wideep.utils.net import free_port

VOCAB = 97


class ToyEngine:
    def __init__(self, role: str | None, block_size: int = 4, num_blocks: int = 64, layers: int = 2, dim: int = 3,
                 policy: str = "fail", timeout_s: float = 30.0, model: str = "toy", dtype=torch.float32,
                 transport: str = "tcp", engine_id: str | None = None, port: int | None = None, peers=None,
                 cross_layers: bool = True):
        self.bs = block_size
        self.conn = None
        if role:
            cfg = KVTransferConfig(kv_role=role, kv_load_failure_policy=policy, engine_id=engine_id or f"toy-{role}",
                                   kv_connector_extra_config={"transport": transport,
                                                              "enable_cross_layers_blocks": cross_layers})
            self.conn = KVConnector(cfg, model=model, block_size=block_size, dp_rank=1, host="127.0.0.1",
                                    port=port or free_port(), listen_host="127.0.0.1", timeout_s=timeout_s,
                                    transfer_timeout_s=10.0, handshake_timeout_s=1.0, peers=peers)
        # the layout the connector asks for, as EngineCore allocates it
        self.caches = allocate_kv_caches(layers, num_blocks, block_size, dim, dtype, torch.device("cpu"),
                                         self.conn is not None and self.conn.wants_cross_layer_kv())
        if self.conn is not None:
            self.conn.register_kv_caches(self.caches)
        self.bm = BlockManager(num_blocks, block_size, True)
        self.sched = Scheduler(self.bm, 8, 64, 512, self.conn)
        self.n = 0

    def close(self):
        if self.conn:
            self.conn.shutdown()

    def add(self, prompt, max_tokens, params=None) -> str:
        self.n += 1
        rid = f"r{self.n}"
        self.sched.add(Request(EngineRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0),
                                             params), set(), max_tokens))
        return rid

    def step(self):
        out = self.sched.schedule()
        sampled = []
        for s in out.seqs:
            req = s.request
            for p in range(s.start, s.start + s.num_new_tokens):
                b, o = req.block_ids[p // self.bs], p % self.bs
                for layer, c in enumerate(self.caches):
                    c[b, o] = torch.tensor([req.all_token_ids[p] * 1.0, p * 0.5 + layer, (p * 7 + layer) % 5],
                                           dtype=c.dtype)[: c.shape[-1]]
            if s.samples:
                end = s.start + s.num_new_tokens
                acc = 0.0
                for p in range(end):
                    b, o = req.block_ids[p // self.bs], p % self.bs
                    acc += float(sum(c[b, o].float().sum() * (p + 1) for c in self.caches))
                sampled.append(int(acc * 13) % VOCAB)
        return self.sched.update(out, sampled)

    def run(self, rid, limit_s: float = 20.0):
        """Steps until `rid` finishes; returns (tokens, final output)."""
        toks, deadline = [], time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for o in self.step():
                if o.request_id == rid:
                    toks += o.new_token_ids
                    if o.finished:
                        return toks, o
            time.sleep(0.001)
        raise AssertionError(f"{rid} did not finish")

    def settle(self, limit_s: float = 10.0):
        """Polls the connector until nothing is held or loading (the engine loop does this while idle)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and (self.sched.held or self.sched.waiting_for_kv):
            self.sched._poll_connector()
            time.sleep(0.005)
        self.sched._poll_connector()

    @property
    def used_blocks(self) -> int:
        return self.bm.num_blocks - self.bm.num_free_blocks


@pytest.fixture
def trio():
    engines = {"agg": ToyEngine(None), "p": ToyEngine("kv_producer"), "d": ToyEngine("kv_consumer")}
    yield engines
    for e in engines.values():
        e.close()


def pd_run(p: ToyEngine, d: ToyEngine, prompt, max_tokens):
    rid = p.add(prompt, 1, {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                            "remote_block_ids": None, "remote_host": None, "remote_port": None})
    _, final = p.run(rid)
    params = final.kv_transfer_params
    assert params is not None
    drid = d.add(prompt, max_tokens, params)
    toks, dfinal = d.run(drid)
    return toks, dfinal, params, final


@pytest.mark.parametrize("plen", [1, 2, 3, 4, 5, 9, 17])
def test_pd_equals_aggregated(trio, plen):
    agg, p, d = trio["agg"], trio["p"], trio["d"]
    prompt = [(i * 31 + 7) % VOCAB for i in range(plen)]
    want, _ = agg.run(agg.add(prompt, 6))
    got, dfinal, params, pfinal = pd_run(p, d, prompt, 6)
    assert got == want
    assert pfinal.finish_reason == "length" and len(pfinal.new_token_ids) == 1
    assert pfinal.new_token_ids[0] == want[0]   # the producer's token is the same greedy first token
    assert set(params) == {"do_remote_prefill", "do_remote_decode", "remote_block_ids", "remote_engine_id",
                           "remote_request_id", "remote_host", "remote_port", "tp_size"}
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == "toy-kv_producer_dp1" and params["tp_size"] == 1
    assert len(params["remote_block_ids"]) == -(-plen // 4)
    if plen > 1:
        assert dfinal.num_cached_tokens == plen - 1
        assert d.conn.stats["blocks_received"] == -(-(plen - 1) // 4)
    p.settle()
    d.settle()
    assert p.used_blocks == 0 and d.used_blocks == 0 and p.conn.num_held == 0


def test_pd_reads_only_what_the_local_prefix_cache_lacks(trio):
    agg, p, d = trio["agg"], trio["p"], trio["d"]
    prompt = [(i * 5 + 1) % VOCAB for i in range(14)]
    want, _ = agg.run(agg.add(prompt, 4))
    d.run(d.add(prompt[:9], 1))          # caches 2 full blocks of the prompt on the decode side
    got, dfinal, _, _ = pd_run(p, d, prompt, 4)
    assert got == want
    assert d.conn.stats["blocks_received"] == 2   # blocks 2 and 3 (tokens 8..12); 0 and 1 were local
    p.settle()
    d.settle()
    assert p.used_blocks == 0


def test_unread_blocks_are_freed_after_the_timeout():
    p = ToyEngine("kv_producer", timeout_s=0.2)
    try:
        rid = p.add(list(range(10)), 1, {"do_remote_decode": True})
        _, final = p.run(rid)
        assert final.kv_transfer_params and p.used_blocks == 3 and p.sched.held
        time.sleep(0.3)
        p.settle()
        assert p.used_blocks == 0 and p.conn.stats["held_expired"] == 1
    finally:
        p.close()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_read_failure_follows_policy_and_frees_blocks(policy):
    p, d, agg = ToyEngine("kv_producer"), ToyEngine("kv_consumer", policy=policy), ToyEngine(None)
    try:
        prompt = list(range(3, 14))
        want, _ = agg.run(agg.add(prompt, 5))
        rid = p.add(prompt, 1, {"do_remote_decode": True})
        _, final = p.run(rid)
        params = dict(final.kv_transfer_params)
        p.close()                                    # the producer goes away before the read
        toks, dfinal = d.run(d.add(prompt, 5, params))
        if policy == "recompute":
            assert toks == want and dfinal.finish_reason == "length"
        else:
            assert toks == [] and dfinal.finish_reason == "error"
            assert "KV read from 127.0.0.1" in dfinal.error
        assert d.conn.stats["loads_failed"] == 1
        d.settle()
        assert d.used_blocks == 0
    finally:
        for e in (p, d, agg):
            e.close()


def test_stale_engine_id_and_foreign_blocks_are_refused(trio):
    p, d = trio["p"], trio["d"]
    rid = p.add(list(range(9)), 1, {"do_remote_decode": True})
    _, final = p.run(rid)
    prm = final.kv_transfer_params
    t = d.conn.transport
    bufs = [memoryview(bytearray(4 * 3 * 4)) for _ in range(2)]
    with pytest.raises(KVTransferError, match="restarted"):
        t.read_into("127.0.0.1", prm["remote_port"], "other_dp0", prm["remote_request_id"], [prm["remote_block_ids"][0]], bufs)
    with pytest.raises(KVTransferError, match="do not belong"):
        t.read_into("127.0.0.1", prm["remote_port"], prm["remote_engine_id"], prm["remote_request_id"], [63], bufs)
    with pytest.raises(KVTransferError, match="no KV held"):
        t.read_into("127.0.0.1", prm["remote_port"], prm["remote_engine_id"], "nope", [0], bufs)
    # The connection survived the refusals and the real read still works.
    t.read_into("127.0.0.1", prm["remote_port"], prm["remote_engine_id"], prm["remote_request_id"],
                [prm["remote_block_ids"][0]], bufs)
    p.settle()
    assert p.used_blocks == 0


def test_pd_with_fp8_caches_equals_aggregated_fp8():
    """--kv-cache-dtype fp8 on both roles: the e4m3 blocks move as bytes, tokens as in one fp8 engine."""
    fp8 = torch.float8_e4m3fn
    agg, p, d = ToyEngine(None, dtype=fp8), ToyEngine("kv_producer", dtype=fp8), ToyEngine("kv_consumer", dtype=fp8)
    try:
        prompt = [(i * 31 + 7) % VOCAB for i in range(9)]
        want, _ = agg.run(agg.add(prompt, 6))
        got, dfinal, _, _ = pd_run(p, d, prompt, 6)
        assert got == want and dfinal.num_cached_tokens == 8
        assert d.conn.stats["blocks_received"] == 2
    finally:
        for e in (agg, p, d):
            e.close()


@pytest.mark.parametrize("mismatch", ["block_size", "model", "dim", "dtype", "fp8"])
def test_handshake_mismatch_is_a_clear_error_even_with_recompute(mismatch):
    kw = {"block_size": dict(block_size=8), "model": dict(model="other-model"), "dim": dict(dim=2),
          "dtype": dict(dtype=torch.float64), "fp8": dict(dtype=torch.float8_e4m3fn)}[mismatch]
    p, d = ToyEngine("kv_producer"), ToyEngine("kv_consumer", policy="recompute", **kw)
    try:
        _, final = p.run(p.add(list(range(10)), 1, {"do_remote_decode": True}))
        toks, dfinal = d.run(d.add(list(range(10)), 3, final.kv_transfer_params))
        assert dfinal.finish_reason == "error"
        assert "handshake" in dfinal.error and {"block_size": "block size", "model": "model", "dim": "region",
                                                  "dtype": "--kv-cache-dtype",
                                                  "fp8": "--kv-cache-dtype"}[mismatch] in dfinal.error
        p.settle()
        d.settle()
        assert p.used_blocks == 0 and d.used_blocks == 0   # the consumer released the producer's hold
    finally:
        p.close()
        d.close()


def test_abort_while_loading_frees_blocks_on_both_sides(trio):
    p, d = trio["p"], trio["d"]
    prompt = list(range(20))
    _, final = p.run(p.add(prompt, 1, {"do_remote_decode": True}))
    drid = d.add(prompt, 5, final.kv_transfer_params)
    d.sched.schedule()                  # allocates and starts the pull
    assert d.sched.waiting_for_kv
    d.sched.abort(drid)
    d.settle()
    p.settle()
    assert d.used_blocks == 0 and p.used_blocks == 0 and not d.sched.held


def test_consumer_with_one_token_prompt_releases_the_producer_at_once(trio):
    p, d, agg = trio["p"], trio["d"], trio["agg"]
    want, _ = agg.run(agg.add([5], 3))
    got, _, _, _ = pd_run(p, d, [5], 3)
    assert got == want
    p.settle()
    assert p.used_blocks == 0 and p.conn.stats["held_expired"] == 0


def test_kv_both_role_and_plain_requests_untouched():
    e = ToyEngine("kv_both")
    agg = ToyEngine(None)
    try:
        prompt = list(range(7))
        want, _ = agg.run(agg.add(prompt, 4))
        got, final = e.run(e.add(prompt, 4))
        assert got == want and final.kv_transfer_params is None
        e.settle()
        assert e.used_blocks == 0
    finally:
        e.close()
        agg.close()


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="kv_role"):
        KVTransferConfig.from_dict({"kv_role": "kv_sender"})
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        KVTransferConfig.from_dict({"kv_role": "kv_both", "kv_load_failure_policy": "retry"})


def test_bfloat16_cache_round_trips_bit_exact():
    """bf16 has no numpy dtype: the byte views must still carry it exactly, block order kept."""
    from wideep.kv_transfer.kv_cache import PagedKVCaches
    src = PagedKVCaches([torch.randn(10, 4, 6).to(torch.bfloat16) for _ in range(3)])
    dst = PagedKVCaches([torch.zeros(10, 4, 6, dtype=torch.bfloat16) for _ in range(3)])
    scatter = dst.scatterer([0, 9, 4])
    for i, (view, buf) in enumerate(zip(src.gather([7, 2, 5]), scatter.buffers())):
        assert view.nbytes == src.region_nbytes(3)[i]
        buf[:] = view
        scatter.region(i)
    scatter.finish()
    for a, b in zip(src.caches, dst.caches):
        assert torch.equal(a[[7, 2, 5]], b[[0, 9, 4]])
        assert not b[[1, 2, 3]].any()


def test_consumer_abort_before_the_pull_releases_the_producer(trio):
    p, d = trio["p"], trio["d"]
    _, final = p.run(p.add(list(range(12)), 1, {"do_remote_decode": True}))
    drid = d.add(list(range(12)), 4, final.kv_transfer_params)
    d.sched.abort(drid)                   # still waiting: no blocks, no pull yet
    p.settle()
    assert p.used_blocks == 0 and p.conn.stats["held_expired"] == 0 and p.conn.stats["blocks_sent"] == 0
    d.settle()
    assert d.used_blocks == 0


def test_a_finished_pull_wakes_the_engine_loop(trio):
    """The consumer's wakeup fd turns readable when the pull lands (the engine loop sleeps on it, not
    on a timer), the next poll drains it and moves the request back to the queue; producers have none."""
    import select
    p, d = trio["p"], trio["d"]
    assert p.conn.wakeup_fd() is None
    fd = d.conn.wakeup_fd()
    assert fd is not None and not select.select([fd], [], [], 0)[0]
    _, final = p.run(p.add(list(range(20)), 1, {"do_remote_decode": True}))
    drid = d.add(list(range(20)), 3, final.kv_transfer_params)
    d.sched.schedule()                  # allocates and starts the pull
    assert drid in d.sched.waiting_for_kv
    assert select.select([fd], [], [], 20)[0] == [fd]
    d.sched._poll_connector()
    assert drid not in d.sched.waiting_for_kv and d.sched.waiting[0].request_id == drid
    assert not select.select([fd], [], [], 0)[0]
    toks, _ = d.run(drid)
    assert len(toks) == 3
